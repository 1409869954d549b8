"""Image preprocessing on the accelerator, inside the jitted train step.

The host ships uint8 images of one raw size (4x fewer bytes than float32); the step
resizes them to cover the model's image size (antialiased when shrinking, as PIL's
resampling filters are), crops (centred, or at a random place per example), optionally
flips them left-right, and maps [0, 255] to [-1, 1]. Every random choice of example i
comes from its own key, so it does not depend on the batch it sits in.

`jax.image.resize` with `antialias=True` computes what PIL's `Image.resize` computes in
float ('F' images): the same kernels (triangle, Keys cubic a=-0.5, Lanczos-3), widened
by the scale factor when downscaling, normalised at the borders. PIL on uint8 images also
rounds (and clips) after each of its two passes; this module rounds nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Resampling filters by PIL's name -> jax.image's.
RESIZE_METHODS = {'bilinear': 'linear', 'bicubic': 'cubic', 'lanczos': 'lanczos3'}
_CROP, _FLIP = range(2)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """uint8 [B, H, W, 3] of a fixed raw size -> float32 [B, h, w, 3] in [-1, 1].

  Attributes:
    resize_method: 'bilinear', 'bicubic' or 'lanczos' (PIL's filters of those names).
    random_crop: crop at a uniformly random place (per example); False: centred.
    random_flip: flip left-right with probability 1/2 (per example). Off by default:
      mirrored glyphs would teach a text-rendering model to write backwards.
  """
  resize_method: str = 'bicubic'
  random_crop: bool = True
  random_flip: bool = False

  def __post_init__(self):
    if self.resize_method not in RESIZE_METHODS:
      raise ValueError(f'Unknown resize_method {self.resize_method!r}; expected one of '
                       f'{tuple(RESIZE_METHODS)}.')


def cover_size(raw_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
  """(height, width) of `raw_size` scaled, aspect kept, to the smallest size that
  covers `size` = (height, width)."""
  (raw_h, raw_w), (h, w) = raw_size, size
  scale = max(h / raw_h, w / raw_w)
  return max(h, round(raw_h * scale)), max(w, round(raw_w * scale))


def resize(images, size: tuple[int, int], method: str = 'bicubic'):
  """[B, H, W, C] (any real dtype, values in [0, 255]) -> float32 [B, h, w, C] in
  [0, 255]: PIL's `method` filter, clipped as PIL clips uint8 results."""
  images = images.astype(jnp.float32)
  b, height, width, c = images.shape
  if (height, width) == tuple(size):
    return images
  out = jax.image.resize(images, (b, *size, c), RESIZE_METHODS[method], antialias=True)
  return jnp.clip(out, 0.0, 255.0)


def crop_offsets(keys, from_size: tuple[int, int], size: tuple[int, int], random: bool):
  """int32 [B, 2] (top, left) of each example's `size` crop out of `from_size`:
  uniform over all placements with `random`, else centred (rounded down)."""
  spare = jnp.array([from_size[0] - size[0], from_size[1] - size[1]], jnp.int32)
  if not random:
    return jnp.broadcast_to(spare // 2, (keys.shape[0], 2))
  return jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, _CROP), (2,), 0,
                                               spare + 1))(keys)


def flip_flags(keys, random: bool):
  """bool [B]: which examples are flipped left-right (none unless `random`)."""
  if not random:
    return jnp.zeros(keys.shape[:1], bool)
  return jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, _FLIP)))(keys)


def crop(images, offsets, size: tuple[int, int]):
  """[B, H, W, C] -> [B, size..., C]: example i from (top, left) = offsets[i]."""
  c = images.shape[-1]
  return jax.vmap(lambda x, o: jax.lax.dynamic_slice(x, (o[0], o[1], 0), (*size, c)))(
      images, offsets)


def flip(images, flags):
  """Example i mirrored left-right where flags[i]."""
  return jnp.where(flags[:, None, None, None], images[:, :, ::-1], images)


def normalize(images):
  """[0, 255] -> [-1, 1] float32."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def preprocess(images, keys, config: PreprocessConfig, size: tuple[int, int]):
  """uint8 [B, H, W, 3] -> float32 [B, size[0], size[1], 3] in [-1, 1]: resized to cover
  `size`, cropped, maybe flipped, normalised; `keys` [B] are the examples' keys."""
  if images.dtype != jnp.uint8:
    raise TypeError(f'device preprocessing takes uint8 images, got {images.dtype} (the '
                    'host pipeline already normalised them?).')
  size = tuple(size)
  covered = cover_size(images.shape[1:3], size)
  x = resize(images, covered, config.resize_method)
  x = crop(x, crop_offsets(keys, covered, size, config.random_crop), size)
  x = flip(x, flip_flags(keys, config.random_flip))
  return normalize(x)
