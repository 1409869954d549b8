"""Image grids with per-tile captions, for looking at what the evaluator read."""
from __future__ import annotations

import functools
import os
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from charred.evaluation import text_metrics

CORRECT, INCORRECT = "\u2713", "\u2717"  # Check and ballot marks.
_BACKGROUND = 255
_TEXT, _WRONG_TEXT = (0, 0, 0), (200, 0, 0)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
  """DejaVu Sans from matplotlib (has arrows and check marks), else PIL's default."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    return ImageFont.truetype(path, size)
  except (ImportError, OSError):
    return ImageFont.load_default()


def ocr_label(target: str, prediction: str, correct: bool | None = None) -> str:
  """E.g. '✓ Hello → Hello' or '✗ Hello → He11o'.

  `correct` defaults to a case-sensitive exact match after
  `text_metrics.normalize`, i.e. what `text_metrics.score` counts.
  """
  if correct is None:
    correct = text_metrics.normalize(prediction) == text_metrics.normalize(target)
  return f"{CORRECT if correct else INCORRECT} {target} \u2192 {prediction}"


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
  """Truncates `text` with an ellipsis so it is at most `width` pixels wide."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "\u2026", font=font) > width:
    text = text[:-1]
  return text + "\u2026"


def make_grid(images: np.ndarray | Sequence[np.ndarray],
              labels: Sequence[str] | None = None, ncols: int = 8,
              scale: int = 2, margin: int = 4, font_size: int = 12) -> np.ndarray:
  """Tiles uint8 images [N, H, W, 3] into one uint8 RGB image on white.

  Args:
    images: N images of equal size, uint8 [H, W, 3] (or [H, W] grey).
    labels: optional caption per image, written under its tile (truncated to
      the tile width), e.g. from `ocr_label`; red if it starts with INCORRECT.
    ncols: tiles per row.
    scale: nearest-neighbour upscaling of each tile, so small signs stay crisp.
    margin: pixels between tiles and around the grid.
    font_size: caption font size in pixels.

  Returns:
    uint8 [rows * (scale*H + label + margin) + margin, ..., 3].
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = np.repeat(images[..., None], 3, axis=-1)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"Expected uint8 [N, H, W, 3], got {images.dtype} {images.shape}.")
  if labels is not None and len(labels) != len(images):
    raise ValueError(f"{len(labels)} labels for {len(images)} images.")
  n, h, w, _ = images.shape
  th, tw = h * scale, w * scale
  ncols = max(1, min(ncols, n))
  nrows = max(1, -(-n // ncols))
  label_h = int(font_size * 1.4) if labels is not None else 0
  cell_h, cell_w = th + label_h + margin, tw + margin
  grid = Image.new("RGB", (ncols * cell_w + margin, nrows * cell_h + margin),
                   (_BACKGROUND,) * 3)
  draw = ImageDraw.Draw(grid)
  font = _font(font_size) if labels is not None else None
  for i, image in enumerate(images):
    row, col = divmod(i, ncols)
    x, y = margin + col * cell_w, margin + row * cell_h
    tile = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    grid.paste(Image.fromarray(tile), (x, y))
    if labels is not None:
      colour = _WRONG_TEXT if labels[i].startswith(INCORRECT) else _TEXT
      draw.text((x, y + th + 1), _fit(draw, labels[i], font, tw), fill=colour, font=font)
  return np.asarray(grid)


def save_png(path: str, image: np.ndarray) -> None:
  """Writes uint8 image [H, W, 3] (or [H, W]) to `path` atomically.

  The PNG goes to a temporary file in the same directory first and is then
  renamed over `path`, so readers never see a partial file. Parent
  directories are created.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format="PNG")
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
