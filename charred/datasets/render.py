"""Renders words as small "sign" images with PIL; no TensorFlow.

Fonts are matplotlib's DejaVu family, so rendering needs nothing beyond a pip
dependency. Every random choice is drawn from one `np.random.Generator`, and
`render_example` seeds it from (seed, index), so an example is a pure function
of its index. PIL's BASIC layout engine is forced because raqm (if installed)
may position glyphs differently and break cross-host determinism.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

LOWER, TITLE, UPPER = "lower", "title", "upper"
CASES = (LOWER, TITLE, UPPER)

MONO_FONTS = ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
# The *Display.ttf files ship only a handful of glyphs, so they are never used.
ALL_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
)
DEFAULT_TEMPLATE = 'A sign that says "{}".'
# Placements: 'fixed', the left margin `x_offset` and the centre line +/- `y_jitter` (every
# config before the realism ladder); 'anywhere', the realism ladder's (ladder.py): the text
# anywhere it fits, with its own switches (background, rotation, held-out fonts).
FIXED, ANYWHERE = "fixed", "anywhere"
PLAIN, SCENE = "plain", "scene"
_MIN_FONT_SIZE = 6


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  """Image geometry and the ranges random styles are drawn from.

  Attributes:
    height: image height in pixels.
    width: image width in pixels.
    fonts: DejaVu file names (see `available_fonts()`), drawn uniformly.
    font_size: inclusive (min, max) font size in pixels; shrunk if the text
      would overflow the width.
    x_offset: inclusive (min, max) left margin. Text is left-aligned so that,
      in monospace fonts, a glyph's position depends only on its character
      index, which keeps the task learnable for tiny models.
    y_jitter: max vertical offset (pixels) of the text's centre line.
    case_weights: probabilities of (lower, Title, UPPER) case.
    template: caption template with one `{}` for the rendered text.
    min_contrast: minimum |luma(text) - luma(background)| in [0, 1].
    colors: fixed (text, background) RGB colours instead of random ones (the random
      pair is still drawn, so every other style choice of an example stays the same).
    placement: 'fixed' or 'anywhere' (ladder.py: uniform over every left offset that
      keeps the text `margin` px inside and every vertical offset that keeps its boxes
      inside; `x_offset` and `y_jitter` are then unused). The fields below are read only
      with 'anywhere'.
    margin: the 'anywhere' text's minimum distance from the left and right edges.
    background: 'plain' (one colour) or 'scene' (gradients, noise, shapes behind the text).
    rotation: the text layer's maximum rotation in degrees (uniform in +/- that).
    held_out_fonts: fonts of an evaluation split's held-out faces (set per split by
      signs.SignsSource), drawn with `held_out_probability` instead of `fonts`.
    held_out_probability: see `held_out_fonts`.
    line_boxes: 'anywhere' boxes span the font's ascent to descent (the line a caller
      would mark), not the text's own ink: the box's top is then one distance above the
      baseline whatever the letters, as it is in a layout a user draws.
  """
  height: int = 32
  width: int = 128
  fonts: tuple[str, ...] = MONO_FONTS
  font_size: tuple[int, int] = (16, 20)
  x_offset: tuple[int, int] = (2, 8)
  y_jitter: int = 2
  case_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
  template: str = DEFAULT_TEMPLATE
  min_contrast: float = 0.5
  colors: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
  placement: str = FIXED
  margin: int = 2
  background: str = PLAIN
  rotation: float = 0.0
  held_out_fonts: tuple[str, ...] = ()
  held_out_probability: float = 0.5
  line_boxes: bool = False


def font_dir() -> str:
  return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def available_fonts() -> list[str]:
  """DejaVu font file names shipped with matplotlib."""
  return sorted(f for f in os.listdir(font_dir())
                if f.startswith("DejaVu") and f.endswith(".ttf"))


def font_path(name: str) -> str:
  """The file of a DejaVu file name, or of a `packaged_fonts.FONTS` name (a fontpkg wheel's
  face, e.g. 'caveat'); FileNotFoundError, one line, when it is missing."""
  if not name.endswith((".ttf", ".otf", ".ttc")):
    from charred.datasets import packaged_fonts  # pylint: disable=g-import-not-at-top
    if name not in packaged_fonts.FONTS:
      raise FileNotFoundError(f"Font {name!r} is neither a DejaVu file in {font_dir()} nor "
                              f"one of packaged_fonts.FONTS {sorted(packaged_fonts.FONTS)}")
    return packaged_fonts.font_path(name)
  path = os.path.join(font_dir(), name)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Font {name!r} not found in {font_dir()} (matplotlib's fonts); "
        f"available: {available_fonts()}")
  return path


@functools.lru_cache(maxsize=512)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
  # Loading a TrueType font costs ~ms; examples reuse a few (font, size) pairs.
  return ImageFont.truetype(font_path(name), size, layout_engine=ImageFont.Layout.BASIC)


def apply_case(word: str, rng: np.random.Generator,
               weights: tuple[float, float, float] = (0.4, 0.3, 0.3)) -> str:
  """Returns `word` in lower, Title or UPPER case drawn with `weights`."""
  return cased(word, CASES[_choice(rng, weights)])


def cased(word: str, case: str) -> str:
  if case == LOWER:
    return word.lower()
  if case == UPPER:
    return word.upper()
  if case == TITLE:
    # Not str.title(): that also capitalises after apostrophes ("Don'T").
    return " ".join(w[:1].upper() + w[1:].lower() for w in word.split(" "))
  raise ValueError(f"Unknown case {case!r}; expected one of {CASES}.")


def caption(text: str, template: str = DEFAULT_TEMPLATE) -> str:
  """The prompt for an image showing `text`, e.g. 'A sign that says "Hello".'."""
  return template.format(text)


def _choice(rng: np.random.Generator, weights) -> int:
  p = np.asarray(weights, dtype=np.float64)
  return int(rng.choice(len(p), p=p / p.sum()))


def luma(rgb) -> float:
  """Rec. 601 luma of an sRGB uint8 colour, in [0, 1]."""
  r, g, b = (float(c) / 255.0 for c in rgb)
  return 0.299 * r + 0.587 * g + 0.114 * b


def _colours(rng: np.random.Generator, min_contrast: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(text, background) RGB colours whose luma differs by >= min_contrast."""
  for _ in range(1000):  # Acceptance is ~20% at min_contrast=0.5.
    text, background = rng.integers(0, 256, size=(2, 3))
    if abs(luma(text) - luma(background)) >= min_contrast:
      return tuple(int(c) for c in text), tuple(int(c) for c in background)
  return (0, 0, 0), (255, 255, 255)


def render(text: str, rng: np.random.Generator,
           config: RenderConfig = RenderConfig()) -> tuple[np.ndarray, dict[str, Any]]:
  """Renders already-cased `text` with a random style.

  Returns:
    image: uint8 [config.height, config.width, 3].
    style: the drawn font, font_size, x, y, text_color, background_color and
      whether the text fits in the image.
  """
  if config.placement != FIXED:
    raise ValueError(f"placement {config.placement!r} is drawn by ladder.render "
                     "(ladder.draw picks the renderer of any config).")
  font_name = config.fonts[int(rng.integers(len(config.fonts)))]
  size = int(rng.integers(config.font_size[0], config.font_size[1] + 1))
  x = int(rng.integers(config.x_offset[0], config.x_offset[1] + 1))
  dy = int(rng.integers(-config.y_jitter, config.y_jitter + 1)) if config.y_jitter else 0
  text_color, background = _colours(rng, config.min_contrast)
  if config.colors is not None:
    text_color, background = (tuple(int(c) for c in rgb) for rgb in config.colors)

  # Shrink until the text fits, keeping a right margin equal to the minimum left one.
  available = config.width - x - config.x_offset[0]
  font = load_font(font_name, size)
  while font.getlength(text) > available and size > _MIN_FONT_SIZE:
    size -= 1
    font = load_font(font_name, size)
  fits = font.getlength(text) <= available

  image = Image.new("RGB", (config.width, config.height), background)
  # Anchor "lm": left edge, vertical middle of ascender/descender, so the
  # baseline does not depend on which letters are drawn.
  y = config.height / 2 + dy
  ImageDraw.Draw(image).text((x, y), text, fill=text_color, font=font, anchor="lm")
  style = dict(font=font_name, font_size=size, x=x, y=y, text_color=text_color,
               background_color=background, fits=fits)
  return np.asarray(image, dtype=np.uint8), style


def glyph_boxes(text: str, style: dict[str, Any]) -> list[tuple[int, int, int, int]]:
  """(x0, y0, x1, y1) pixel box of each character of `text` as `render` drew it with
  `style`: its advance cell (kerning-free BASIC layout) over the whole line's ink height,
  so every glyph of a line shares one vertical extent. Styles that carry their boxes
  ('anywhere' placement: widened to the glyph's ink, and rotated) give those."""
  if "boxes" in style:
    return [tuple(b) for b in style["boxes"]]
  font = load_font(style["font"], style["font_size"])
  x, y = style["x"], style["y"]
  _, top, _, bottom = font.getbbox(text, anchor="lm") if text else (0, 0, 0, 0)
  y0, y1 = int(np.floor(y + top)), int(np.ceil(y + bottom))
  edges = [x + font.getlength(text[:k]) for k in range(len(text) + 1)]
  return [(int(np.floor(a)), y0, int(np.ceil(b)), y1) for a, b in zip(edges[:-1], edges[1:])]


def render_example(word: str, seed: int, index: int,
                   config: RenderConfig = RenderConfig(), draw=None) -> dict[str, Any]:
  """Renders example `index` for source `word`; a pure function of its arguments.
  `draw(text, rng, config)` draws the cased text (default `render`; `ladder.draw` also
  draws the realism ladder's placements).

  Returns a dict with image (uint8 [H, W, 3]), caption, text (the cased word
  as drawn), word (lowercase source), case and the style entries of `render`.
  """
  rng = np.random.default_rng([seed, index])
  case = CASES[_choice(rng, config.case_weights)]
  text = cased(word, case)
  image, style = (draw or render)(text, rng, config)
  return dict(image=image, caption=caption(text, config.template), text=text,
              word=word.lower(), case=case, **style)
