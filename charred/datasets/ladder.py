"""The realism ladder's renderer: text anywhere, in many faces, colours and captions.

Issue 23's rungs (signs.CONFIGS 'r1'..'r4'), each adding one factor to the one below:
R1 places the word anywhere it fits; R2 draws proportional faces (DejaVu Sans / Serif /
Sans Mono and a handwriting face from a fontpkg wheel) at sizes varying > 2x; R3 adds
colours with a luma contrast floor, gradients, noise and shapes behind the text, and
rotation; R4 adds caption templates (some naming the text's colour or font), 1-3 words,
digits and punctuation. `render.render` comes here for `placement='anywhere'`.

Every random choice comes from the caller's generator, in a fixed order, so an example
is a pure function of (config, split, index). The text is drawn into a coverage mask
(PIL, BASIC layout), rotated as one layer, then composited over the background; the
mask is returned as `text_mask`, and each character's box is its advance cell widened
to its own ink, over the line's ink height (or, with `RenderConfig.line_boxes`, the
font's ascent to descent), rotated with the layer and taken as the axis-aligned bounds
(`boxes`; their union over non-spaces is `text_box`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from charred.datasets import palette
from charred.datasets import render as render_lib

SANS, SERIF, MONO, HANDWRITING = "sans", "serif", "mono", "handwriting"
FAMILIES = (SANS, SERIF, MONO, HANDWRITING)
# What a caption calls each family ({style} in a template).
STYLE_WORDS = {SANS: "sans-serif", SERIF: "serif", MONO: "monospaced",
               HANDWRITING: "handwritten"}
_MIN_FONT_SIZE = 6
# Canvas padding around the image while the text layer is drawn and rotated.
_PAD = 64
_LANGUAGE = 3  # Tags R4's text and template stream of an example's (seed, index).


def family(font: str) -> str:
  """The family of a font name: DejaVu files by name, packaged_fonts.FONTS names are
  handwriting."""
  if font.startswith("DejaVuSansMono"):
    return MONO
  if font.startswith("DejaVuSerif"):
    return SERIF
  if font.startswith("DejaVuSans"):
    return SANS
  return HANDWRITING


@functools.lru_cache(maxsize=None)
def _cmap(path: str) -> frozenset[int]:
  from fontTools import ttLib  # pylint: disable=g-import-not-at-top
  with ttLib.TTFont(path, fontNumber=0, lazy=True) as font:
    return frozenset(font.getBestCmap())


def check_fonts(fonts: Sequence[str], alphabet: str, what: str = "") -> None:
  """Raises, in one line, for the first font that is missing (FileNotFoundError) or
  has no glyph for a character of `alphabet` (ValueError), naming both."""
  for font in dict.fromkeys(fonts):
    path = render_lib.font_path(font)
    cmap = _cmap(path)
    for ch in sorted(set(alphabet) - {" "}):
      if ord(ch) not in cmap:
        raise ValueError(f"Font {font!r} ({path}) has no glyph for {ch!r} (U+{ord(ch):04X})"
                         f", which {what or 'the config'} needs.")


# --- Colours. ---

def _contrasting(rng: np.random.Generator, text_rgb, floor: float, side: int
                 ) -> tuple[int, int, int]:
  """A random colour whose luma is >= `floor` above (side 1) or below (side -1) the
  text's: a uniform RGB colour mixed towards white or black just enough."""
  c = rng.integers(0, 256, size=3).astype(np.float64)
  lc, lt = render_lib.luma(c), render_lib.luma(text_rgb)
  target = lt + side * (floor + 0.01)
  if side > 0 and lc < target:
    a = min(1.0, (target - lc) / max(1.0 - lc, 1e-6))
    c = c * (1 - a) + 255.0 * a
  elif side < 0 and lc > target:
    a = min(1.0, 1.0 - max(target, 0.0) / max(lc, 1e-6))
    c = c * (1 - a)
  return tuple(int(v) for v in np.clip(np.round(c), 0, 255))


def _side(rng: np.random.Generator, text_rgb, floor: float) -> int:
  """Whether backgrounds go lighter (1) or darker (-1) than the text: either where both
  leave room for `floor`, else the side with more room."""
  lt = render_lib.luma(text_rgb)
  up, down = lt + floor <= 1.0, lt - floor >= 0.0
  if up and down:
    return 1 if rng.random() < 0.5 else -1
  return 1 if 1.0 - lt >= lt else -1


def _scene_colours(rng, min_contrast: float, text_colour):
  text = tuple(text_colour) if text_colour is not None else tuple(
      int(c) for c in rng.integers(0, 256, size=3))
  side = _side(rng, text, min_contrast)
  return text, _contrasting(rng, text, min_contrast, side), side


def _scene(rng: np.random.Generator, height: int, width: int, text_rgb, background,
           side: int, floor: float) -> np.ndarray:
  """float [H, W, 3]: `background`, maybe a linear gradient to a second colour, 0-3
  rectangles or ellipses, maybe noise; every colour `floor` luma from the text's on
  the background's side, so the text keeps its contrast everywhere (up to the noise)."""
  image = np.broadcast_to(np.asarray(background, np.float64), (height, width, 3)).copy()
  if rng.random() < 0.5:  # Linear gradient at a random angle.
    other = np.asarray(_contrasting(rng, text_rgb, floor, side), np.float64)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = xs * math.cos(theta) + ys * math.sin(theta)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    image = image * (1 - t[..., None]) + other * t[..., None]
  canvas = Image.fromarray(np.round(image).astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  for _ in range(int(rng.integers(0, 4))):
    colour = _contrasting(rng, text_rgb, floor, side)
    x0, x1 = sorted(rng.integers(-width // 4, width + width // 4, size=2).tolist())
    y0, y1 = sorted(rng.integers(-height // 4, height + height // 4, size=2).tolist())
    shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
    shape((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), fill=colour)
  image = np.asarray(canvas, np.float64)
  if rng.random() < 0.5:
    image = image + rng.normal(0.0, rng.uniform(2.0, 8.0), size=(height, width, 1))
  return image


# --- Fonts and layout. ---

def _pick_font(rng: np.random.Generator, config: render_lib.RenderConfig,
               want: str | None) -> str:
  pool = config.fonts
  if config.held_out_fonts and rng.random() < config.held_out_probability:
    pool = config.held_out_fonts
  if want is not None:
    pool = [f for f in pool if family(f) == want] or [
        f for f in config.fonts if family(f) == want]
    if not pool:
      raise ValueError(f"No {want} font among {config.fonts}.")
  return pool[int(rng.integers(len(pool)))]


def _rotate(points: np.ndarray, centre, degrees: float) -> np.ndarray:
  """Points [N, 2] (x, y down) rotated as PIL's Image.rotate(degrees, center=centre)
  moves pixels (counter-clockwise on screen)."""
  t = math.radians(degrees)
  d = points - np.asarray(centre)
  return np.stack([centre[0] + d[:, 0] * math.cos(t) + d[:, 1] * math.sin(t),
                   centre[1] - d[:, 0] * math.sin(t) + d[:, 1] * math.cos(t)], axis=1)


def _layout(font_name: str, size: int, text: str, angle: float, line_boxes: bool = False):
  """(boxes [N, 4] float relative to the 'ls' origin after rotation about `centre`,
  centre): each character's advance cell widened to its ink, over the line's ink, or,
  with `line_boxes`, over the font's ascent and descent (and any ink beyond them)."""
  font = render_lib.load_font(font_name, size)
  _, top, _, bottom = font.getbbox(text, anchor="ls")
  if line_boxes:
    ascent, descent = font.getmetrics()
    top, bottom = min(top, -ascent), max(bottom, descent)
  edges = [font.getlength(text[:k]) for k in range(len(text) + 1)]
  cells = []
  for k, ch in enumerate(text):
    a, b = edges[k], edges[k + 1]
    if not ch.isspace():
      left, _, right, _ = font.getbbox(ch, anchor="ls")
      a, b = min(a, edges[k] + left), max(b, edges[k] + right)
    cells.append((a, top, b, bottom))
  cells = np.asarray(cells, np.float64).reshape(-1, 4)
  centre = ((cells[:, 0].min() + cells[:, 2].max()) / 2, (top + bottom) / 2)
  if angle:
    corners = np.stack([cells[:, [0, 1]], cells[:, [2, 1]], cells[:, [0, 3]],
                        cells[:, [2, 3]]], axis=1).reshape(-1, 2)
    rotated = _rotate(corners, centre, angle).reshape(-1, 4, 2)
    cells = np.concatenate([rotated.min(axis=1), rotated.max(axis=1)], axis=1)
  return cells, centre


def _offsets(lo: float, hi: float, extent: int, margin: int) -> tuple[int, int]:
  """Integer origins o with floor(o + lo) >= margin and ceil(o + hi) <= extent - margin."""
  return math.ceil(margin - lo), math.floor(extent - margin - hi)


def draw(text: str, rng: np.random.Generator, config: render_lib.RenderConfig
         ) -> tuple[np.ndarray, dict[str, Any]]:
  """`text` drawn by the renderer of `config`'s placement: `render` below for
  'anywhere', `render.render` for the fixed placement of the configs before the ladder."""
  if config.placement == render_lib.ANYWHERE:
    return render(text, rng, config)
  return render_lib.render(text, rng, config)


def render(text: str, rng: np.random.Generator, config: render_lib.RenderConfig,
           text_colour=None, want_family: str | None = None
           ) -> tuple[np.ndarray, dict[str, Any]]:
  """`render.render` for placement 'anywhere': (uint8 [H, W, 3], style). Draws, in order:
  font (`want_family` if given), size, angle, colours (`text_colour` if given), left and
  vertical offsets, background. Style: font, font_size, x, y (the text's 'ls' origin
  before rotation), angle, text_color, background_color, fits, boxes, text_box, text_mask.
  """
  height, width = config.height, config.width
  font_name = _pick_font(rng, config, want_family)
  size = int(rng.integers(config.font_size[0], config.font_size[1] + 1))
  angle = float(rng.uniform(-config.rotation, config.rotation)) if config.rotation else 0.0
  if config.background == render_lib.SCENE:
    text_rgb, background, side = _scene_colours(rng, config.min_contrast, text_colour)
  else:
    text_rgb, background = render_lib._colours(rng, config.min_contrast)  # pylint: disable=protected-access
    if text_colour is not None:
      text_rgb = tuple(text_colour)
      background = _contrasting(rng, text_rgb, config.min_contrast,
                                _side(rng, text_rgb, config.min_contrast))
    if config.colors is not None:
      text_rgb, background = (tuple(int(c) for c in rgb) for rgb in config.colors)

  while True:  # Shrink until the (rotated) text fits.
    boxes, centre = _layout(font_name, size, text, angle, config.line_boxes)
    x_lo, x_hi = _offsets(boxes[:, 0].min(), boxes[:, 2].max(), width, config.margin)
    y_lo, y_hi = _offsets(boxes[:, 1].min(), boxes[:, 3].max(), height, 0)
    fits = x_lo <= x_hi and y_lo <= y_hi
    if fits or size <= _MIN_FONT_SIZE:
      break
    size -= 1
  x = int(rng.integers(x_lo, x_hi + 1)) if x_lo <= x_hi else (x_lo + x_hi) // 2
  y = int(rng.integers(y_lo, y_hi + 1)) if y_lo <= y_hi else (y_lo + y_hi) // 2

  if config.background == render_lib.SCENE:
    image = _scene(rng, height, width, text_rgb, background, side,
                   max(config.min_contrast - 0.1, 0.0))
  else:
    image = np.broadcast_to(np.asarray(background, np.float64), (height, width, 3))
  layer = Image.new("L", (width + 2 * _PAD, height + 2 * _PAD), 0)
  ImageDraw.Draw(layer).text((x + _PAD, y + _PAD), text, fill=255,
                             font=render_lib.load_font(font_name, size), anchor="ls")
  if angle:
    layer = layer.rotate(angle, resample=Image.BICUBIC,
                         center=(x + _PAD + centre[0], y + _PAD + centre[1]))
  mask = np.asarray(layer, np.float64)[_PAD:_PAD + height, _PAD:_PAD + width] / 255.0
  image = image * (1 - mask[..., None]) + np.asarray(text_rgb, np.float64) * mask[..., None]
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)

  out = []
  for x0, y0, x1, y1 in boxes:
    out.append((min(max(int(math.floor(x + x0)), 0), width),
                min(max(int(math.floor(y + y0)), 0), height),
                min(max(int(math.ceil(x + x1)), 0), width),
                min(max(int(math.ceil(y + y1)), 0), height)))
  style = dict(font=font_name, font_size=size, x=x, y=y, angle=angle,
               text_color=tuple(int(c) for c in text_rgb),
               background_color=tuple(int(c) for c in background), fits=fits,
               boxes=out, text_box=union_box(text, out), text_mask=mask > 0)
  return image, style


def union_box(text: str, boxes) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1): the union of the boxes of `text`'s non-space characters."""
  kept = [b for ch, b in zip(text, boxes) if not ch.isspace()]
  if not kept:
    return (0, 0, 0, 0)
  kept = np.asarray(kept)
  return (int(kept[:, 0].min()), int(kept[:, 1].min()), int(kept[:, 2].max()),
          int(kept[:, 3].max()))


# --- Language (R4): templates, several words, digits and punctuation. ---

# Every template quotes the drawn text exactly once, in ASCII double quotes, and the text
# never contains one: models count letter positions from the opening quote. {colour}
# names the text's palette colour, {style} its family (STYLE_WORDS); a template that
# says 'handwritten' (or 'serif', ...) outright draws that family.
TRAIN_TEMPLATES = (
    'A sign that says "{}".',
    'A poster with the words "{}".',
    'It says "{}".',
    'A photo of a shop sign reading "{}".',
    'Text: "{}"',
    'The text "{}" in {colour} letters.',
    '"{}" written in {colour} on a sign.',
    'The words "{}" in a {style} font.',
    'A handwritten note that says "{}".',
    'A label reading "{}", {style} and {colour}.',
)
VALIDATION_TEMPLATES = (
    'A board that reads "{}".',
    'A card with "{}" printed in {colour}.',
)
TEST_TEMPLATES = (
    'A banner that shows "{}" in a {style} font.',
    'The picture shows the text "{}".',
)
DIGITS = string.digits
END_PUNCTUATION = ".!?:"
JOINERS = (" ", "-", " & ")


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
  """How R4 writes texts and captions.

  Attributes:
    templates: the training templates.
    validation_templates: templates only the validation split draws (with
      `held_out_probability`, else a training one); never in `templates`.
    test_templates: the same for the test split.
    held_out_probability: see `validation_templates`.
    max_words: most tokens (words or numbers) in a text; the split's word of the
      example is always one of them.
    max_length: longest text in characters (a token that would pass it is left out).
    number_probability: probability that a further token is a number (1-4 digits).
    numbers_only_probability: probability that a training text is one number alone.
    joiner_weights: weights of a space, a hyphen and ' & ' between tokens.
    punctuation_probability: probability of one of END_PUNCTUATION at the end.
    max_caption_bytes: captions longer than this (UTF-8) are refused.
  """
  templates: tuple[str, ...] = TRAIN_TEMPLATES
  validation_templates: tuple[str, ...] = VALIDATION_TEMPLATES
  test_templates: tuple[str, ...] = TEST_TEMPLATES
  held_out_probability: float = 0.5
  max_words: int = 3
  max_length: int = 12
  number_probability: float = 0.2
  numbers_only_probability: float = 0.03
  joiner_weights: tuple[float, float, float] = (0.8, 0.1, 0.1)
  punctuation_probability: float = 0.25
  max_caption_bytes: int = 95

  def split_templates(self, split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the templates every split draws, the split's held-out ones)."""
    return self.templates, {"validation": self.validation_templates,
                            "test": self.test_templates}.get(split, ())

  @property
  def alphabet(self) -> str:
    return DIGITS + END_PUNCTUATION + "".join(JOINERS)

  def check(self) -> None:
    """Raises ValueError unless every template quotes its text once, the splits are
    disjoint and the longest caption fits `max_caption_bytes`."""
    all_templates = self.templates + self.validation_templates + self.test_templates
    if len({t.lower() for t in all_templates}) != len(all_templates):
      raise ValueError("Caption templates repeat across splits.")
    longest_colour = max(palette.NAMES, key=len)
    longest_style = max(STYLE_WORDS.values(), key=len)
    for t in all_templates:
      if t.count('"') != 2 or t.count('"{}"') != 1:
        raise ValueError(f"Template {t!r} must quote its text exactly once: \"{{}}\".")
      caption = t.format("x" * self.max_length, colour=longest_colour, style=longest_style)
      if len(caption.encode("utf-8")) > self.max_caption_bytes:
        raise ValueError(f"Template {t!r} makes captions over {self.max_caption_bytes} "
                         "bytes.")


def template_family(template: str) -> str | None:
  """The family a template's own words ask for ('handwritten' -> handwriting), if any."""
  lowered = template.lower()
  for fam in (HANDWRITING, MONO, SANS, SERIF):  # 'sans-serif' before 'serif'
    if STYLE_WORDS[fam] in lowered:
      return fam
  return None


def _number(rng: np.random.Generator) -> str:
  return str(int(rng.integers(0, 10 ** int(rng.integers(1, 5)))))


def compose(config: LanguageConfig, rng: np.random.Generator, split: str, word: str,
            split_words: Sequence[str]) -> tuple[str, list[str]]:
  """(lowercase text of 1-`max_words` tokens, its words from the split): `word` and
  maybe further words of the split or numbers, joined by spaces, hyphens or ' & ',
  maybe with closing punctuation; at most `max_length` characters."""
  if split == "train" and rng.random() < config.numbers_only_probability:
    text = _number(rng)
    return (text + END_PUNCTUATION[int(rng.integers(len(END_PUNCTUATION)))]
            if rng.random() < config.punctuation_probability else text), []
  tokens, words = [word], [word]
  num_tokens = int(rng.integers(1, config.max_words + 1))
  joiner = JOINERS[render_lib._choice(rng, config.joiner_weights)]  # pylint: disable=protected-access
  for _ in range(num_tokens - 1):
    if rng.random() < config.number_probability:
      token = _number(rng)
    else:
      token = split_words[int(rng.integers(len(split_words)))]
    at = int(rng.integers(len(tokens) + 1))
    candidate = tokens[:at] + [token] + tokens[at:]
    if len(joiner.join(candidate)) <= config.max_length:
      tokens = candidate
      if token.isalpha():
        words.append(token)
  text = joiner.join(tokens)
  if rng.random() < config.punctuation_probability and len(text) < config.max_length:
    text += END_PUNCTUATION[int(rng.integers(len(END_PUNCTUATION)))]
  return text, words


def example(config: LanguageConfig, render_config: render_lib.RenderConfig, seed: int,
            index: int, split: str, word: str, split_words: Sequence[str]
            ) -> dict[str, Any]:
  """R4's example `index` (the split's offset included) for the split's `word`: the
  text (`compose`), a template of the split (held-out ones with their probability), the
  palette colour or family it names, then case and rendering as `render.render_example`
  draws them. Keys: render_example's, plus template, colour (the named palette colour
  or ''), family (the font's) and words (the split words shown)."""
  rng = np.random.default_rng([seed, index, _LANGUAGE])
  text, words = compose(config, rng, split, word, split_words)
  seen, held_out = config.split_templates(split)
  pool = held_out if held_out and rng.random() < config.held_out_probability else seen
  template = pool[int(rng.integers(len(pool)))]
  colour = palette.NAMES[int(rng.integers(len(palette.NAMES)))] if "{colour}" in template else ""
  want = template_family(template)
  if "{style}" in template:
    fams = sorted({family(f) for f in _split_fonts(render_config)})
    want = fams[int(rng.integers(len(fams)))]
  render_rng = np.random.default_rng([seed, index])
  case = render_lib.CASES[render_lib._choice(render_rng, render_config.case_weights)]  # pylint: disable=protected-access
  text = render_lib.cased(text, case)
  image, style = render(text, render_rng, render_config,
                        text_colour=palette.COLOURS[colour] if colour else None,
                        want_family=want)
  caption = template.format(text, colour=colour, style=STYLE_WORDS[family(style["font"])])
  if '"' in text or caption.count('"') != 2:
    raise ValueError(f"Caption {caption!r} must quote its text once.")
  if len(caption.encode("utf-8")) > config.max_caption_bytes:
    raise ValueError(f"Caption {caption!r} is over {config.max_caption_bytes} bytes.")
  return dict(image=image, caption=caption, text=text, word=text.lower(), case=case,
              template=template, colour=colour, family=family(style["font"]),
              words=words, **style)


def _split_fonts(config: render_lib.RenderConfig) -> tuple[str, ...]:
  """Every face a split can draw: its training faces and held-out ones."""
  return tuple(config.fonts) + tuple(config.held_out_fonts)
