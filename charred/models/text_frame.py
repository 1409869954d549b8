"""The text frame: the box-conditioned model's view of its text at one size and place.

A glyph drawn at 10 px and the same glyph at 22 px are different pictures to a small
convolutional U-Net; resampling the image so that the text box always has one height and
one top-left corner (a similarity transform per example, as a spatial transformer would
learn, here given by the box) hands the U-Net one size and one phase whatever the caller
asked for. `TextToImage.denoise` runs the U-Net twice, on the whole image and on its text
frame, and takes the pixels around the box from the frame pass, resampled back. The frame
is either the noisy image resampled, or (`joint`) a second image diffused beside the
first, in channels of its own.

Resampling is bilinear with zeros outside the source (separable: one interpolation matrix
per axis and example), so it is exact for whole-pixel shifts at scale 1 and for images
that are linear in x and y.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from charred.models.unet import TextLayout


@dataclasses.dataclass(frozen=True)
class TextFrameConfig:
  """Where the text box goes in the frame the U-Net draws it in, in image pixels."""
  line_height: float = 24.0  # the box's height in the frame (R1's 20 px face's line: 24)
  origin: tuple[float, float] = (4.0, 4.0)  # (x, y) of the box's top-left corner
  # Frame pixels around the box that the frame pass also writes (antialiased edges).
  margin: float = 2.0
  # The frame diffused as an image of its own beside the image (its own channels and
  # noise, a clean target resampled from the clean image), instead of the image's noisy
  # pixels resampled: resampling changes the noise's variance and correlation with the
  # scale (x2 halves it between pixels), so the U-Net would see another noise level at
  # every text size; a frame diffused itself has the schedule's noise at every scale.
  joint: bool = False

  def __post_init__(self):
    if self.line_height <= 0 or self.margin < 0 or min(self.origin) < 0:
      raise ValueError(f'TextFrameConfig needs line_height > 0, margin >= 0 and origin >= 0'
                       f', got {self}.')


class Frame(NamedTuple):
  """Per example, in pixels of the array being resampled: frame = (image - corner) *
  scale + origin."""
  scale: jax.Array  # float [B]
  corner: jax.Array  # float [B, 2], (x, y) of the box's top-left corner in the image
  size: jax.Array  # float [B, 2], the box's (width, height) in the frame
  origin: jax.Array  # float [2], (x, y)
  margin: float


def text_frame(layout: TextLayout, size: tuple[int, int], config: TextFrameConfig,
               image_size: tuple[int, int]) -> Frame:
  """The frame of each example's box for an array of `size` (height, width) showing an
  image of `image_size` (a latent array is smaller by the codec's factor). The box's
  height becomes `line_height`, unless its width would then leave the frame (a long
  word is shrunk until it fits, with `origin`'s margin on the right too)."""
  h, w = size
  factor = image_size[0] / h
  origin = jnp.asarray(config.origin, jnp.float32) / factor
  boxes = layout.boxes * jnp.array([w, h, w, h], jnp.float32)
  box_w = jnp.maximum(boxes[:, 2] - boxes[:, 0], 1e-3)
  box_h = jnp.maximum(boxes[:, 3] - boxes[:, 1], 1e-3)
  scale = jnp.minimum(config.line_height / factor / box_h, (w - 2 * origin[0]) / box_w)
  scale = jnp.clip(scale, 1 / 16, 16.0)
  return Frame(scale, boxes[:, :2], jnp.stack([box_w, box_h], axis=1) * scale[:, None],
               origin, config.margin / factor)


def _interpolation(positions, n: int):
  """float [B, m, n]: bilinear weights reading a length-`n` axis at continuous index
  `positions` [B, m] (pixel j's centre is at j), zero beyond the ends."""
  return jax.nn.relu(1.0 - jnp.abs(positions[..., None] - jnp.arange(n, dtype=jnp.float32)))


def _frame_positions(frame: Frame, axis: int, n: int):
  """[B, n]: where each frame pixel's centre lies in the image, as a continuous index."""
  centres = jnp.arange(n, dtype=jnp.float32) + 0.5
  image = frame.corner[:, axis:axis + 1] + (centres[None] - frame.origin[axis]) / frame.scale[:, None]
  return image - 0.5


def _image_positions(frame: Frame, axis: int, n: int):
  """[B, n]: where each image pixel's centre lies in the frame, as a continuous index."""
  centres = jnp.arange(n, dtype=jnp.float32) + 0.5
  return (frame.origin[axis] + (centres[None] - frame.corner[:, axis:axis + 1])
          * frame.scale[:, None]) - 0.5


def _resample(x, rows, columns):
  """x [B, H, W, C] read at rows [B, H'] and columns [B, W'] (continuous indices)."""
  ry = _interpolation(rows, x.shape[1]).astype(x.dtype)
  rx = _interpolation(columns, x.shape[2]).astype(x.dtype)
  return jnp.einsum('bvi,bijc,buj->bvuc', ry, x, rx)


def into_frame(x, frame: Frame):
  """x [B, H, W, C] resampled into each example's text frame (same shape)."""
  _, h, w, _ = x.shape
  return _resample(x, _frame_positions(frame, 1, h), _frame_positions(frame, 0, w))


def from_frame(y, frame: Frame):
  """Inverse of into_frame: the frame [B, H, W, C] resampled back into the image."""
  _, h, w, _ = y.shape
  return _resample(y, _image_positions(frame, 1, h), _image_positions(frame, 0, w))


def frame_region(frame: Frame, size: tuple[int, int]):
  """bool [B, H, W, 1]: the image pixels that take the frame pass's output: those whose
  centre falls in the box (plus `margin`) and inside the frame."""
  def along(axis, n, extent):
    at = _image_positions(frame, axis, n) + 0.5  # frame coordinates of the centres
    lo = jnp.maximum(frame.origin[axis] - frame.margin, 0.5)
    hi = jnp.minimum(frame.origin[axis] + frame.size[:, axis:axis + 1] + frame.margin,
                     extent - 0.5)
    return (at >= lo) & (at <= hi)
  h, w = size
  return (along(1, h, h)[:, :, None] & along(0, w, w)[:, None, :])[..., None]


def frame_layout(layout: TextLayout, frame: Frame, size: tuple[int, int]) -> TextLayout:
  """`layout` with each box where the frame puts it."""
  h, w = size
  x0, y0 = frame.origin[0], frame.origin[1]
  boxes = jnp.stack([jnp.full_like(frame.scale, x0), jnp.full_like(frame.scale, y0),
                     x0 + frame.size[:, 0], y0 + frame.size[:, 1]], axis=1)
  return layout._replace(boxes=boxes / jnp.array([w, h, w, h], jnp.float32))


def labels_into_frame(labels, frame: Frame, fill: int = -1):
  """int [B, H, W] per-pixel labels (e.g. glyph token maps) moved into the frame by
  nearest-pixel lookup; `fill` where the frame reads outside the image."""
  _, h, w = labels.shape
  rows = jnp.floor(_frame_positions(frame, 1, h) + 0.5).astype(jnp.int32)
  cols = jnp.floor(_frame_positions(frame, 0, w) + 0.5).astype(jnp.int32)
  valid = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
  picked = jax.vmap(lambda m, r, c: m[jnp.clip(r, 0, h - 1)[:, None],
                                      jnp.clip(c, 0, w - 1)[None, :]])(labels, rows, cols)
  return jnp.where(valid, picked, fill)
