"""Small photo-like test images made with numpy + PIL (gradients, blobs, shapes, noise)."""
import io

import numpy as np
from PIL import Image, ImageDraw


def photo(height: int, width: int, seed: int = 0, noise: float = 3.0) -> np.ndarray:
  """uint8 [height, width, 3]: smooth colour gradients, a few shapes and sensor noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  phase = rng.uniform(0, 2 * np.pi, size=3)
  freq = rng.uniform(1, 4, size=(3, 2))
  img = np.stack([np.sin(freq[c, 0] * 3 * x + freq[c, 1] * 2 * y + phase[c])
                  for c in range(3)], -1) * 90 + 128
  pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  for _ in range(4):
    x0, y0 = rng.integers(0, width), rng.integers(0, height)
    r = int(rng.integers(3, max(4, min(height, width) // 3)))
    draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(rng.integers(0, 256, 3).tolist()))
  out = np.asarray(pil).astype(np.float64) + rng.normal(0, noise, (height, width, 3))
  return out.clip(0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "png", **kwargs) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
