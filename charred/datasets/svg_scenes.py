"""Captioned SVG scenes (signs, badges, posters, arched and rotated text), rasterised by resvg.

Every scene is a pure function of (seed, index): one `np.random.Generator`
seeded from both draws its kind, words, case, colours and geometry. The SVG is
rasterised by resvg (the `resvg-py` wheel: no system libraries) with system
fonts skipped and only the scene's bundled DejaVu file loaded, so the pixels do
not depend on the host's fonts (see `font_faces.py`). Captions quote every
drawn string exactly as drawn, in drawing order, and name its layout and
colours, e.g. 'A round blue badge with the word "river" in white, and
"since 1987" below it, on a grey background.'. No TensorFlow here.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence
from xml.sax import saxutils

import numpy as np
from PIL import Image
import resvg_py

from charred.datasets import font_faces
from charred.datasets import palette
from charred.datasets import render

SIGN, BADGE, POSTER, ARC, STAMP = "sign", "badge", "poster", "arc", "stamp"
KINDS = (SIGN, BADGE, POSTER, ARC, STAMP)

# Every word a caption contains outside its quoted text, besides colour names.
# Word lists for scenes keep these out of validation (`WordSplitConfig.train_only`)
# so that no validation word is spelled in a training caption.
CAPTION_WORDS = tuple(sorted(set(palette.NAMES) | set("""
    a an and arch at background badge below border clockwise counterclockwise curved
    degrees est gradient hexagonal in it large letters like no on poster rectangular
    rotated round rounded says sign since smile square stamp subtitle that the title
    to top with word words""".split())))


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """Canvas size and the ranges scenes are drawn from.

  Attributes:
    height: image height in pixels.
    width: image width in pixels.
    kinds: scene kinds (see KINDS), drawn uniformly.
    fonts: bundled DejaVu file names, drawn uniformly (one per scene).
    case_weights: probabilities of (lower, Title, UPPER) case of each string.
    min_contrast: minimum luma difference between text and what it lies on.
    min_font_size: smallest font size in pixels text is shrunk to.
  """
  height: int = 128
  width: int = 128
  kinds: tuple[str, ...] = KINDS
  fonts: tuple[str, ...] = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf",
                            "DejaVuSerif.ttf", "DejaVuSansMono-Bold.ttf")
  case_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
  min_contrast: float = 0.45
  min_font_size: int = 6


@dataclasses.dataclass
class _Canvas:
  """What a scene function draws into: SVG defs and elements, and the strings drawn."""
  config: SceneConfig
  face: font_faces.FontFace
  rng: np.random.Generator
  defs: list[str] = dataclasses.field(default_factory=list)
  elements: list[str] = dataclasses.field(default_factory=list)
  texts: list[str] = dataclasses.field(default_factory=list)

  @property
  def w(self) -> int:
    return self.config.width

  @property
  def h(self) -> int:
    return self.config.height

  @property
  def s(self) -> int:
    return min(self.config.width, self.config.height)

  def case(self, words: str) -> str:
    return render.apply_case(words, self.rng, self.config.case_weights)

  def fit(self, text: str, max_width: float, max_size: float) -> int:
    return font_faces.fit_size(self.face, text, max_width, max(1, int(max_size)),
                               self.config.min_font_size)

  def background(self, contrast_with: str | None = None, differ_from: Sequence[str] = ()) -> str:
    """Fills the canvas with one colour or a top-to-bottom gradient of two,
    none of `differ_from`, both contrasting with `contrast_with` if given;
    returns its description for the caption."""
    kw = dict(differ_from=list(differ_from))
    if contrast_with:
      kw.update(contrast_with=[contrast_with], min_contrast=self.config.min_contrast)
    gradient = self.rng.random() < 0.5
    top = palette.pick(self.rng, **kw)
    kw["differ_from"].append(top)
    bottoms = palette.candidates(**kw)
    if contrast_with:  # Lumas blend linearly: the text's must not lie between the stops'.
      side = palette.luma(top) > palette.luma(contrast_with)
      bottoms = [b for b in bottoms if (palette.luma(b) > palette.luma(contrast_with)) == side]
    if not gradient or not bottoms:
      self.rect(0, 0, self.w, self.h, fill=palette.hex_code(top))
      return f"{_a(top)} {top} background"
    bottom = bottoms[int(self.rng.integers(len(bottoms)))]
    self.defs.append(
        f'<linearGradient id="bg" x1="0" y1="0" x2="0" y2="1">'
        f'<stop offset="0" stop-color="{palette.hex_code(top)}"/>'
        f'<stop offset="1" stop-color="{palette.hex_code(bottom)}"/></linearGradient>')
    self.rect(0, 0, self.w, self.h, fill="url(#bg)")
    return f"{_a(top)} {top}-to-{bottom} gradient background"

  def rect(self, x, y, w, h, fill, rx=0.0, stroke=None, stroke_width=0.0, transform=None):
    self.elements.append(
        f'<rect x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" rx="{rx:.2f}" '
        f'fill="{fill}"{_stroke(stroke, stroke_width)}{_transform(transform)}/>')

  def text(self, text: str, x: float, y: float, size: int, colour: str, transform=None):
    """`text` centred on (x, y): anchored in the middle, baseline below y by
    half the cap height (0.73 em in DejaVu)."""
    self.texts.append(text)
    self.elements.append(
        f'<text x="{x:.2f}" y="{y + 0.365 * size:.2f}" {self._font(size)} text-anchor="middle" '
        f'fill="{palette.hex_code(colour)}"{_transform(transform)}>{saxutils.escape(text)}</text>')

  def text_on_path(self, text: str, path_d: str, size: int, colour: str):
    self.texts.append(text)
    self.defs.append(f'<path id="p{len(self.defs)}" d="{path_d}"/>')
    self.elements.append(
        f'<text {self._font(size)} fill="{palette.hex_code(colour)}"><textPath '
        f'href="#p{len(self.defs) - 1}" startOffset="50%" text-anchor="middle">'
        f'{saxutils.escape(text)}</textPath></text>')

  def _font(self, size: int) -> str:
    f = self.face
    return (f'font-family="{f.family}" font-weight="{f.weight}" font-style="{f.style}" '
            f'font-size="{size}"')

  def svg(self) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
            f'viewBox="0 0 {self.w} {self.h}"><defs>{"".join(self.defs)}</defs>'
            f'{"".join(self.elements)}</svg>')


def _stroke(colour, width) -> str:
  return f' stroke="{colour}" stroke-width="{width:.2f}"' if colour else ""


def _transform(transform) -> str:
  return f' transform="{transform}"' if transform else ""


def _a(word: str) -> str:
  return "an" if word[:1] in "aeiou" else "a"


def _the_word(text: str) -> str:
  return f'the {"words" if " " in text else "word"} "{text}"'


def _sign(c: _Canvas, main: str, vocabulary: Sequence[str]) -> str:
  del vocabulary
  text_colour = palette.pick(c.rng)
  plate = palette.pick(c.rng, contrast_with=[text_colour], min_contrast=c.config.min_contrast)
  background = c.background(differ_from=[plate])
  pw, ph = 0.88 * c.w, 0.46 * c.h
  rounded = c.rng.random() < 0.5
  border = c.rng.random() < 0.5
  c.rect((c.w - pw) / 2, (c.h - ph) / 2, pw, ph, fill=palette.hex_code(plate),
         rx=0.18 * ph if rounded else 0.0,
         stroke=palette.hex_code(text_colour) if border else None, stroke_width=0.025 * c.s)
  text = c.case(main)
  c.text(text, c.w / 2, c.h / 2, c.fit(text, 0.8 * pw, 0.5 * ph), text_colour)
  shape = "rounded" if rounded else "rectangular"
  with_border = f" with a {text_colour} border" if border else ""
  return (f"A {shape} {plate} sign{with_border} on {background}, "
          f"with {_the_word(text)} in {text_colour}.")


def _second_line(c: _Canvas, vocabulary: Sequence[str]) -> str:
  """A badge's second line: a year, a number or another word."""
  kind = int(c.rng.integers(4))
  if kind == 0:
    return f"since {int(c.rng.integers(1900, 2025))}"
  if kind == 1:
    return f"est. {int(c.rng.integers(1900, 2025))}"
  if kind == 2:
    return f"no. {int(c.rng.integers(1, 100))}"
  return c.case(vocabulary[int(c.rng.integers(len(vocabulary)))])


def _badge(c: _Canvas, main: str, vocabulary: Sequence[str]) -> str:
  text_colour = palette.pick(c.rng)
  fill = palette.pick(c.rng, contrast_with=[text_colour], min_contrast=c.config.min_contrast)
  background = c.background(differ_from=[fill])
  shape = ("round", "square", "hexagonal")[int(c.rng.integers(3))]
  cx, cy, r = c.w / 2, c.h / 2, 0.46 * c.s
  if shape == "round":
    c.elements.append(f'<circle cx="{cx:.2f}" cy="{cy:.2f}" r="{r:.2f}" '
                      f'fill="{palette.hex_code(fill)}"/>')
    width = 1.45 * r  # Chord at the first line's height, less a margin.
  elif shape == "square":
    c.rect(cx - r, cy - r, 2 * r, 2 * r, fill=palette.hex_code(fill), rx=0.15 * r)
    width = 1.7 * r
  else:  # Pointy-top hexagon: its flat sides are 0.87 r from the centre.
    points = " ".join(f"{cx + r * math.sin(a):.2f},{cy - r * math.cos(a):.2f}"
                      for a in np.arange(6) * math.pi / 3)
    c.elements.append(f'<polygon points="{points}" fill="{palette.hex_code(fill)}"/>')
    width = 1.5 * r
  text, second = c.case(main), _second_line(c, vocabulary)
  size = c.fit(text, width, 0.24 * c.s)
  c.text(text, cx, cy - 0.08 * c.s, size, text_colour)
  c.text(second, cx, cy + 0.2 * c.s, c.fit(second, 0.9 * width, 0.5 * size), text_colour)
  return (f'A {shape} {fill} badge with {_the_word(text)} in {text_colour}, '
          f'and "{second}" below it, on {background}.')


def _poster(c: _Canvas, main: str, vocabulary: Sequence[str]) -> str:
  text_colour = palette.pick(c.rng)
  gradient = c.background(contrast_with=text_colour)
  title = c.case(main)
  subtitle = c.case(" ".join(vocabulary[int(i)] for i in c.rng.integers(len(vocabulary), size=2)))
  size = c.fit(title, 0.86 * c.w, 0.22 * c.s)
  c.text(title, c.w / 2, 0.33 * c.h, size, text_colour)
  c.text(subtitle, c.w / 2, 0.66 * c.h, c.fit(subtitle, 0.86 * c.w, 0.5 * size), text_colour)
  return (f'A poster on {gradient}, with the title "{title}" in large {text_colour} letters '
          f'at the top, and the subtitle "{subtitle}" below it.')


def _quadratic_length(p0, p1, p2, n: int = 64) -> float:
  t = np.linspace(0.0, 1.0, n + 1)[:, None]
  pts = (1 - t) ** 2 * np.asarray(p0) + 2 * t * (1 - t) * np.asarray(p1) + t ** 2 * np.asarray(p2)
  return float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum())


def _arc(c: _Canvas, main: str, vocabulary: Sequence[str]) -> str:
  del vocabulary
  text_colour = palette.pick(c.rng)
  background = c.background(contrast_with=text_colour)
  arch = c.rng.random() < 0.5
  # The path's middle lies at 0.42 H (arch) or 0.72 H (smile); glyphs stand on it.
  ends, control = (0.72 * c.h, 0.12 * c.h) if arch else (0.42 * c.h, 1.02 * c.h)
  p0, p1, p2 = (0.08 * c.w, ends), (0.5 * c.w, control), (0.92 * c.w, ends)
  text = c.case(main)
  size = c.fit(text, 0.8 * _quadratic_length(p0, p1, p2), 0.22 * c.s)
  c.text_on_path(text, f"M {p0[0]:.2f} {p0[1]:.2f} Q {p1[0]:.2f} {p1[1]:.2f} "
                 f"{p2[0]:.2f} {p2[1]:.2f}", size, text_colour)
  curve = "curved in an arch" if arch else "curved like a smile"
  subject = _the_word(text)
  return f"{subject[0].upper()}{subject[1:]} in {text_colour}, {curve}, on {background}."


def _stamp(c: _Canvas, main: str, vocabulary: Sequence[str]) -> str:
  del vocabulary
  ink = palette.pick(c.rng)
  background = c.background(contrast_with=ink)
  degrees = int(c.rng.integers(10, 31)) * (1 if c.rng.random() < 0.5 else -1)
  text = c.case(main)
  cos, sin = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
  size = int(0.24 * c.s)
  while True:  # The rotated frame (text plus padding) fits in 90 % of the canvas.
    bw = font_faces.text_width(c.face, text, size) + 0.6 * size
    bh = 1.5 * size
    if size <= c.config.min_font_size or (bw * cos + bh * sin <= 0.9 * c.w
                                          and bw * sin + bh * cos <= 0.9 * c.h):
      break
    size -= 1
  rotate = f"rotate({degrees} {c.w / 2:.2f} {c.h / 2:.2f})"
  c.rect((c.w - bw) / 2, (c.h - bh) / 2, bw, bh, fill="none", rx=0.1 * size,
         stroke=palette.hex_code(ink), stroke_width=max(1.0, 0.08 * size), transform=rotate)
  c.text(text, c.w / 2, c.h / 2, size, ink, transform=rotate)
  direction = "clockwise" if degrees > 0 else "counterclockwise"  # SVG's y axis points down.
  return (f'{_a(ink).title()} {ink} stamp that says "{text}", rotated {abs(degrees)} degrees '
          f'{direction}, on {background}.')


_SCENES = {SIGN: _sign, BADGE: _badge, POSTER: _poster, ARC: _arc, STAMP: _stamp}


def rasterize(svg: str, fonts: Sequence[str]) -> np.ndarray:
  """Renders SVG markup to uint8 RGB [H, W, 3] with resvg, loading only the
  bundled font files `fonts` (no system fonts)."""
  paths = [font_faces.font_face(f).path for f in fonts]
  png = resvg_py.svg_to_bytes(svg_string=svg, skip_system_fonts=True, font_files=paths)
  with Image.open(io.BytesIO(bytes(png))) as image:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def render_example(main: str, vocabulary: Sequence[str], seed: int, index: int,
                   config: SceneConfig = SceneConfig()) -> dict[str, Any]:
  """Draws scene `index` showing `main` (a word or phrase); a pure function of its arguments.

  Args:
    main: the lowercase word(s) the scene is about (a badge's or poster's main text).
    vocabulary: words that secondary strings (subtitles, second lines) are drawn from.
    seed, index: seed the scene's random stream.
    config: canvas size and ranges.

  Returns:
    A dict with image (uint8 [H, W, 3]), svg (the markup), caption, text (`main`
    as drawn), texts (every drawn string, in order), word (`main` lowercase),
    kind and font (file name).
  """
  rng = np.random.default_rng([seed, index])
  kind = config.kinds[int(rng.integers(len(config.kinds)))]
  face = font_faces.font_face(config.fonts[int(rng.integers(len(config.fonts)))])
  canvas = _Canvas(config, face, rng)
  caption = _SCENES[kind](canvas, main, vocabulary)
  svg = canvas.svg()
  return dict(image=rasterize(svg, [face.file]), svg=svg, caption=caption,
              text=canvas.texts[0], texts=list(canvas.texts), word=main.lower(), kind=kind,
              font=face.file)
