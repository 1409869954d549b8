"""The bundled DejaVu files as font faces for SVG and CSS renderers; no TensorFlow.

SVG (resvg) and CSS (Chromium) select fonts by (family, weight, style), and
both silently fall back to another font, or draw nothing, when no loaded face
matches. Reading the triple from the file's own name table, and giving the
renderer that one file alone, makes the match certain; a missing file raises
`FileNotFoundError` (from `render.font_path`) before anything is drawn.
Text is measured with FreeType (PIL) on the same file, to fit it in its box.
"""
from __future__ import annotations

import dataclasses

from charred.datasets import render


@dataclasses.dataclass(frozen=True)
class FontFace:
  """One font file and the attributes that select it.

  Attributes:
    file: file name in `render.font_dir()`, e.g. 'DejaVuSans-Bold.ttf'.
    path: absolute path of the file.
    family: family name from the file, e.g. 'DejaVu Sans'.
    weight: CSS/SVG font-weight, 'normal' or 'bold'.
    style: CSS/SVG font-style, 'normal', 'italic' or 'oblique'.
  """
  file: str
  path: str
  family: str
  weight: str
  style: str


def font_face(file: str) -> FontFace:
  """The face of a bundled font file; raises FileNotFoundError if it is absent."""
  path = render.font_path(file)
  family, subfamily = render.load_font(file, 16).getname()
  subfamily = subfamily.lower()
  weight = "bold" if "bold" in subfamily else "normal"
  style = "italic" if "italic" in subfamily else "oblique" if "oblique" in subfamily else "normal"
  return FontFace(file=file, path=path, family=family, weight=weight, style=style)


def text_width(face: FontFace, text: str, size: int) -> float:
  """Advance width of `text` in pixels at `size` px."""
  return render.load_font(face.file, size).getlength(text)


def fit_size(face: FontFace, text: str, max_width: float, max_size: int,
             min_size: int = 6) -> int:
  """Largest font size <= `max_size` (and >= `min_size`) at which `text` is
  at most `max_width` pixels wide."""
  size = max_size
  width = text_width(face, text, size)
  if width > max_width:  # Advance widths scale about linearly with the size.
    size = max(min_size, min(max_size, int(max_size * max_width / width)))
  while size > min_size and text_width(face, text, size) > max_width:
    size -= 1
  return size
