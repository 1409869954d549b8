"""Named colours for captioned graphic scenes; no TensorFlow.

Captions name colours ("a blue badge"), so scenes draw from a small palette of
unambiguous names rather than from all RGB values. Text is only placed on a
colour whose Rec. 601 luma differs from its own by at least `min_contrast`,
which keeps it legible (and readable by OCR).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from charred.datasets import render

COLOURS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "red": (200, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (250, 215, 40),
    "green": (40, 150, 60),
    "teal": (0, 128, 128),
    "blue": (30, 80, 200),
    "navy": (20, 30, 90),
    "purple": (120, 50, 160),
    "pink": (245, 150, 185),
    "brown": (120, 70, 30),
}
NAMES = tuple(COLOURS)


def hex_code(name: str) -> str:
  """'#rrggbb' of a palette colour."""
  return "#{:02x}{:02x}{:02x}".format(*COLOURS[name])


def luma(name: str) -> float:
  """Rec. 601 luma of a palette colour, in [0, 1]."""
  return render.luma(COLOURS[name])


def contrast(a: str, b: str) -> float:
  """|luma(a) - luma(b)| of two palette colours, in [0, 1]."""
  return abs(luma(a) - luma(b))


def candidates(*, contrast_with: Sequence[str] = (), min_contrast: float = 0.0,
               differ_from: Sequence[str] = ()) -> list[str]:
  """Colour names that contrast with every colour of `contrast_with` by >=
  `min_contrast` and are not in `differ_from`, in palette order."""
  return [n for n in NAMES if n not in differ_from
          and all(contrast(n, c) >= min_contrast for c in contrast_with)]


def pick(rng: np.random.Generator, **constraints) -> str:
  """A colour name drawn uniformly from `candidates(**constraints)`."""
  names = candidates(**constraints)
  if not names:
    raise ValueError(f"No palette colour satisfies {constraints}.")
  return names[int(rng.integers(len(names)))]
