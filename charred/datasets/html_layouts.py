"""Captioned HTML/CSS layouts (web banner, menu card, two-column page, table) by headless Chromium.

Every layout is a pure function of (seed, index): one `np.random.Generator`
seeded from both draws the template, words, case, colours and fonts. Text uses
the bundled DejaVu files through @font-face rules, under family names no
system font has, and `chromium.Chromium` refuses to capture a page whose fonts
did not load, so nothing is drawn in a fallback font. Sizes are multiples of
one CSS unit `--u` (1/256 of the shorter side); if any string overflows its
box or the viewport, the page is rendered again with a smaller unit.

Captions name the template, its colours and every drawn string (words quoted,
prices and counts not), e.g. 'A web banner on a navy background with the
centred heading "Quiet River" in white, the line "morning light" below it, and
a yellow button that says "Join".'. No TensorFlow here.
"""
from __future__ import annotations

import atexit
import dataclasses
import html
import pathlib
from typing import Any, Sequence

import numpy as np

from charred.datasets import chromium
from charred.datasets import font_faces
from charred.datasets import palette
from charred.datasets import render

BANNER, MENU, TWO_COLUMN, TABLE = "banner", "menu", "two_column", "table"
TEMPLATES = (BANNER, MENU, TWO_COLUMN, TABLE)

# Every word a caption contains outside its quoted text, besides colour names
# (see `svg_scenes.CAPTION_WORDS`).
CAPTION_WORDS = tuple(sorted(set(palette.NAMES) | set("""
    a aligned an and background banner below button card centred column columns for header
    heading in it left line listing menu on page reading right rows says table that the three
    titled two web with""".split())))

# Each string of a layout is an element of class "t": its text's box (a Range,
# so padding is excluded) and whether it overflows its element.
_MEASURE = """[...document.querySelectorAll('.t')].map(e => {
  const range = document.createRange(); range.selectNodeContents(e);
  const b = range.getBoundingClientRect();
  return [e.textContent, b.left, b.top, b.right, b.bottom,
          e.scrollWidth > e.clientWidth || e.scrollHeight > e.clientHeight];
})"""


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
  """Viewport size and the ranges layouts are drawn from.

  Attributes:
    height: viewport (image) height in pixels.
    width: viewport (image) width in pixels.
    templates: template names (see TEMPLATES), drawn uniformly.
    fonts: (heading, body) pairs of bundled DejaVu file names, drawn uniformly.
    case_weights: probabilities of (lower, Title, UPPER) case of headings.
    min_contrast: minimum luma difference between text and its background.
    max_attempts: renders with a 15 % smaller unit each before an overflowing
      layout is an error.
  """
  height: int = 256
  width: int = 256
  templates: tuple[str, ...] = TEMPLATES
  fonts: tuple[tuple[str, str], ...] = (
      ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf"), ("DejaVuSerif-Bold.ttf", "DejaVuSerif.ttf"),
      ("DejaVuSansMono-Bold.ttf", "DejaVuSansMono.ttf"), ("DejaVuSans-Bold.ttf", "DejaVuSerif.ttf"))
  case_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
  min_contrast: float = 0.45
  max_attempts: int = 6


@dataclasses.dataclass
class Layout:
  """A drawn template: page body and its CSS (sizes in --u), caption and strings."""
  body: str
  css: str
  caption: str
  texts: list[str]


def _t(text: str, tag: str = "div", cls: str = "") -> str:
  return f'<{tag} class="t {cls}">{html.escape(text)}</{tag}>'


def _a(word: str) -> str:
  return "an" if word[:1] in "aeiou" else "a"


def _words(rng: np.random.Generator, vocabulary: Sequence[str], n: int) -> list[str]:
  return [vocabulary[int(i)] for i in rng.integers(len(vocabulary), size=n)]


def _colours(rng: np.random.Generator, min_contrast: float) -> tuple[str, str]:
  """(text, background) colour names that contrast."""
  text = palette.pick(rng)
  return text, palette.pick(rng, contrast_with=[text], min_contrast=min_contrast)


def _banner(rng, main, vocabulary, config) -> Layout:
  fg, bg = _colours(rng, config.min_contrast)
  button_fg, button = _colours(rng, config.min_contrast)
  while button == bg:  # The button stands out from the banner.
    button_fg, button = _colours(rng, config.min_contrast)
  heading = render.apply_case(main, rng, config.case_weights)
  line = " ".join(_words(rng, vocabulary, 2))
  label = render.cased(_words(rng, vocabulary, 1)[0], render.TITLE)
  centred = rng.random() < 0.5
  align = "center" if centred else "flex-start"
  css = f"""
    body {{ background: {palette.hex_code(bg)}; color: {palette.hex_code(fg)};
           display: flex; flex-direction: column; justify-content: center; align-items: {align};
           padding: 0 calc(16 * var(--u)); box-sizing: border-box; }}
    .heading {{ font-family: "charred-heading"; font-size: calc(34 * var(--u)); }}
    .line {{ font-family: "charred-body"; font-size: calc(18 * var(--u));
            margin-top: calc(8 * var(--u)); }}
    .button {{ font-family: "charred-heading"; font-size: calc(16 * var(--u));
              margin-top: calc(18 * var(--u)); background: {palette.hex_code(button)};
              color: {palette.hex_code(button_fg)}; border-radius: calc(6 * var(--u));
              padding: calc(6 * var(--u)) calc(14 * var(--u)); }}"""
  body = _t(heading, cls="heading") + _t(line, cls="line") + _t(label, cls="button")
  where = "centred" if centred else "left-aligned"
  caption = (f'A web banner on {_a(bg)} {bg} background with the {where} heading "{heading}" '
             f'in {fg}, the line "{line}" below it, and {_a(button)} {button} button that says '
             f'"{label}".')
  return Layout(body, css, caption, [heading, line, label])


def _price(rng: np.random.Generator) -> str:
  return f"{int(rng.integers(1, 30))}.{int(rng.integers(0, 20)) * 5:02d}"


def _menu(rng, main, vocabulary, config) -> Layout:
  fg, bg = _colours(rng, config.min_contrast)
  title = render.apply_case(main, rng, config.case_weights)
  items = [render.cased(w, render.TITLE) for w in _words(rng, vocabulary, 3)]
  prices = [_price(rng) for _ in items]
  css = f"""
    body {{ background: {palette.hex_code(bg)}; color: {palette.hex_code(fg)}; }}
    .card {{ position: absolute; inset: calc(8 * var(--u)); padding: calc(14 * var(--u));
            border: calc(2 * var(--u)) solid {palette.hex_code(fg)}; }}
    .title {{ font-family: "charred-heading"; font-size: calc(30 * var(--u)); text-align: center;
             padding-bottom: calc(10 * var(--u)); margin-bottom: calc(10 * var(--u));
             border-bottom: calc(1 * var(--u)) solid {palette.hex_code(fg)}; }}
    .row {{ display: flex; justify-content: space-between; font-family: "charred-body";
           font-size: calc(18 * var(--u)); margin-top: calc(12 * var(--u)); }}"""
  rows = "".join(f'<div class="row">{_t(i, "span")}{_t(p, "span")}</div>'
                 for i, p in zip(items, prices))
  body = f'<div class="card">{_t(title, cls="title")}{rows}</div>'
  listing = ", ".join(f'"{i}" for {p}' for i, p in zip(items[:-1], prices[:-1]))
  caption = (f'A menu card titled "{title}" in {fg} on {_a(bg)} {bg} background, listing '
             f'{listing} and "{items[-1]}" for {prices[-1]}.')
  texts = [title] + [s for pair in zip(items, prices) for s in pair]
  return Layout(body, css, caption, texts)


def _paragraph(rng: np.random.Generator, vocabulary: Sequence[str]) -> str:
  words = _words(rng, vocabulary, int(rng.integers(4, 7)))
  return render.cased(words[0], render.TITLE) + " " + " ".join(words[1:]) + "."


def _two_column(rng, main, vocabulary, config) -> Layout:
  fg, bg = _colours(rng, config.min_contrast)
  heading = render.apply_case(main, rng, config.case_weights)
  left, right = _paragraph(rng, vocabulary), _paragraph(rng, vocabulary)
  css = f"""
    body {{ background: {palette.hex_code(bg)}; color: {palette.hex_code(fg)};
           padding: calc(16 * var(--u)); box-sizing: border-box; }}
    .heading {{ font-family: "charred-heading"; font-size: calc(30 * var(--u));
               margin-bottom: calc(14 * var(--u)); }}
    .columns {{ display: flex; gap: calc(16 * var(--u)); }}
    .columns p {{ flex: 1; margin: 0; font-family: "charred-body"; font-size: calc(15 * var(--u));
                 line-height: 1.35; white-space: normal; overflow-wrap: anywhere; }}"""
  body = (_t(heading, cls="heading") + '<div class="columns">' + _t(left, "p") + _t(right, "p")
          + "</div>")
  caption = (f'A two-column page on {_a(bg)} {bg} background with the heading "{heading}" in '
             f'{fg}, the left column reading "{left}" and the right column reading "{right}".')
  return Layout(body, css, caption, [heading, left, right])


def _table(rng, main, vocabulary, config) -> Layout:
  fg, bg = _colours(rng, config.min_contrast)
  header_fg, header = _colours(rng, config.min_contrast)
  while header == bg:
    header_fg, header = _colours(rng, config.min_contrast)
  columns = [render.apply_case(main, rng, config.case_weights),
             render.cased(_words(rng, vocabulary, 1)[0], render.TITLE)]
  names = _words(rng, vocabulary, 3)
  counts = [str(int(c)) for c in rng.integers(1, 100, size=3)]
  css = f"""
    body {{ background: {palette.hex_code(bg)}; color: {palette.hex_code(fg)};
           display: flex; align-items: center; justify-content: center; }}
    table {{ border-collapse: collapse; font-family: "charred-body";
            font-size: calc(18 * var(--u)); }}
    th {{ font-family: "charred-heading"; background: {palette.hex_code(header)};
         color: {palette.hex_code(header_fg)}; }}
    th, td {{ border: calc(1.5 * var(--u)) solid {palette.hex_code(fg)}; text-align: left;
             padding: calc(7 * var(--u)) calc(12 * var(--u)); font-weight: inherit; }}"""
  head = "<tr>" + "".join(_t(c, "th") for c in columns) + "</tr>"
  rows = "".join(f"<tr>{_t(n, 'td')}{_t(c, 'td')}</tr>" for n, c in zip(names, counts))
  body = f"<table>{head}{rows}</table>"
  listed = ", ".join(f'"{n}" {c}' for n, c in zip(names[:-1], counts[:-1]))
  caption = (f'A table on {_a(bg)} {bg} background with the {header} header "{columns[0]}" and '
             f'"{columns[1]}" and three rows in {fg}: {listed} and "{names[-1]}" {counts[-1]}.')
  texts = columns + [s for pair in zip(names, counts) for s in pair]
  return Layout(body, css, caption, texts)


_TEMPLATES = {BANNER: _banner, MENU: _menu, TWO_COLUMN: _two_column, TABLE: _table}


def page(layout: Layout, faces: Sequence[font_faces.FontFace], width: int, height: int,
         unit: float) -> str:
  """The whole HTML page of `layout` with CSS unit `unit` px.

  `faces` are the (heading, body) faces, declared as the one-face families
  'charred-heading' and 'charred-body'; with `font-synthesis: none` a family of
  one face is drawn as that face whatever weight an element asks for.
  """
  rules = "".join(
      f'@font-face {{ font-family: "charred-{role}"; '
      f'src: url("{pathlib.Path(f.path).as_uri()}") format("truetype"); }}\n'
      for role, f in zip(("heading", "body"), faces))
  return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><style>
{rules}:root {{ --u: {unit:.4f}px; }}
html, body {{ margin: 0; width: {width}px; height: {height}px; overflow: hidden; }}
body {{ font-synthesis: none; }}
.t {{ white-space: nowrap; }}
{layout.css}
</style></head><body>{layout.body}</body></html>"""


def fits(boxes: np.ndarray, overflows: Sequence[bool], width: int, height: int) -> bool:
  """Whether every string box [x0, y0, x1, y1] lies in the viewport, inside its
  element, and apart from the others."""
  inside = ((boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all()
            and (boxes[:, 3] <= height).all())
  x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
  overlap = ((np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]) > 0)
             & (np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]) > 0))
  np.fill_diagonal(overlap, False)
  return bool(inside and not any(overflows) and not overlap.any())


_browser: chromium.Chromium | None = None


def default_browser() -> chromium.Chromium:
  """One Chromium shared by this process, started on first use, closed at exit."""
  global _browser
  if _browser is None or _browser.closed:
    _browser = chromium.Chromium()
    atexit.register(_browser.close)
  return _browser


def render_example(main: str, vocabulary: Sequence[str], seed: int, index: int,
                   config: LayoutConfig = LayoutConfig(),
                   browser: chromium.Chromium | None = None) -> dict[str, Any]:
  """Lays out and screenshots layout `index` about `main`; a pure function of
  (main, vocabulary, seed, index, config) for a given Chromium build.

  Args:
    main: the lowercase word(s) of the main string (heading, title, first column name).
    vocabulary: words the other strings are drawn from.
    seed, index: seed the layout's random stream.
    config: viewport size and ranges.
    browser: the Chromium to use; `default_browser()` if None.

  Returns:
    A dict with image (uint8 [H, W, 3]), html (the page), caption, text (`main`
    as drawn), texts (every drawn string, in document order), boxes (float32
    [len(texts), 4] pixel boxes x0, y0, x1, y1 of the strings), word (`main`
    lowercase), kind (template), font (heading file name) and unit (CSS px).

  Raises:
    FileNotFoundError: a font file or Chromium is missing.
    RuntimeError: a font did not load in Chromium.
    ValueError: the layout still overflows after `config.max_attempts` renders.
  """
  rng = np.random.default_rng([seed, index])
  template = config.templates[int(rng.integers(len(config.templates)))]
  fonts = config.fonts[int(rng.integers(len(config.fonts)))]
  faces = [font_faces.font_face(f) for f in fonts]
  layout = _TEMPLATES[template](rng, main, vocabulary, config)
  browser = browser or default_browser()
  unit = min(config.width, config.height) / 256
  for _ in range(config.max_attempts):
    markup = page(layout, faces, config.width, config.height, unit)
    image, measured = browser.screenshot(markup, config.width, config.height, script=_MEASURE)
    drawn = [m[0] for m in measured]
    if drawn != layout.texts:  # The template and its caption disagree: a bug here.
      raise RuntimeError(f"{template} drew {drawn}, but its caption lists {layout.texts}.")
    boxes = np.array([m[1:5] for m in measured], np.float32)
    if fits(boxes, [m[5] for m in measured], config.width, config.height):
      break
    unit *= 0.85
  else:
    raise ValueError(f"Layout {template!r} of (seed {seed}, index {index}) still overflows a "
                     f"{config.width}x{config.height} viewport at --u={unit / 0.85:.3f}px.")
  return dict(image=image, html=markup, caption=layout.caption, text=layout.texts[0],
              texts=list(layout.texts), boxes=boxes, word=main.lower(), kind=template,
              font=fonts[0], unit=unit)
