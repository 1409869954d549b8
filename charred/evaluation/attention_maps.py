"""Where each letter of a prompt looks: per-letter cross-attention heat maps.

For a sampled image, the U-Net is run once more on it at one noise level with its
cross-attention weights sown (see `unet.Attention`); the weights of the finest attended
resolution, averaged over heads and layers, give each caption token a map over the image.
A picture then shows, per prompt, the sample and one heat-map row per letter of the word:
a model that spells puts each letter's mass on that letter's column.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from charred.evaluation import grid
from charred.models import diffusion
from charred.models import text_frame
from charred.models import unet
from charred.models.text_to_image import TextToImage, text_layout


def cross_attention_maps(model: TextToImage, params, images, tokens, mask, timestep: int,
                         rng, boxes=None) -> jax.Array:
  """[B, h, w, L] head- and layer-averaged cross-attention of the finest attended grid
  (h x w cells), for `images` (model space, [-1, 1]) noised to `timestep`; `boxes` [B, 4]
  for a box-conditioned model."""
  c = model.config
  x0 = jnp.asarray(images, jnp.float32)
  b = x0.shape[0]
  layout = None if boxes is None else text_layout(tokens, mask, boxes, c.image_size)
  if layout is not None and c.text_frame is not None and c.text_frame.joint:
    frame = text_frame.text_frame(layout, x0.shape[1:3], c.text_frame, c.image_size)
    x0 = jnp.concatenate([x0, text_frame.into_frame(x0, frame)], axis=-1)
  noise = jax.random.normal(rng, x0.shape)
  alpha_bar = jnp.asarray(c.noise_schedule.alphas_cumprod())[timestep]
  x_t = diffusion.add_noise(x0, noise, jnp.full((x0.shape[0],), alpha_bar))
  t = jnp.full((x0.shape[0],), timestep, jnp.int32)
  apply = functools.partial(model.apply, {'params': params})
  context = apply(tokens, mask, method='encode_text')
  _, state = apply(x_t, t, context, mask, layout, method='denoise',
                   mutable=['intermediates'])
  # With a text frame the U-Net ran on [image; frame]: the image pass's maps are the ones
  # that lie over the picture.
  maps = [v[:b] for path, value in flax.traverse_util.flatten_dict(state).items()
          if 'cross_attention' in path for v in value]
  if not maps:
    raise ValueError('The U-Net has no cross-attention to show.')
  cells = max(m.shape[2] for m in maps)
  finest = jnp.mean(jnp.stack([m.mean(axis=1) for m in maps if m.shape[2] == cells]), axis=0)
  h, w = unet.attention_grid(cells, *x0.shape[1:3])
  return finest.reshape(b, h, w, -1)


def _heat(values: np.ndarray, size: tuple[int, int]) -> Image.Image:
  """A [h, w] map in [0, 1] as a `size` (W, H) RGB image, dark blue to yellow."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  rgb = (matplotlib.colormaps['viridis'](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)
  return Image.fromarray(rgb).resize(size, Image.NEAREST)


def letter_rows(image: np.ndarray, maps: np.ndarray, text: str, letter_tokens: Sequence[int],
                scale: int = 2, label_width: int = 24) -> np.ndarray:
  """uint8 picture: `image` on top, then one row per letter of `text`, its label and the
  heat map of its token (`letter_tokens[k]`, -1: none), each normalised to its maximum."""
  h, w = image.shape[:2]
  size = (w * scale, h * scale)
  rows = 1 + len(text)
  out = Image.new('RGB', (label_width + size[0], rows * (size[1] + 2)), (255, 255, 255))
  draw = ImageDraw.Draw(out)
  out.paste(Image.fromarray(image).resize(size, Image.NEAREST), (label_width, 0))
  font = grid._font(12)  # pylint: disable=protected-access
  for k, (letter, token) in enumerate(zip(text, letter_tokens)):
    top = (k + 1) * (size[1] + 2)
    draw.text((4, top + size[1] // 2 - 7), letter, fill=(0, 0, 0), font=font)
    if token < 0 or token >= maps.shape[-1]:
      continue
    values = maps[..., token]
    out.paste(_heat(values / max(float(values.max()), 1e-9), size), (label_width, top))
  return np.asarray(out)


def attention_figure(pictures: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
  """`letter_rows` pictures side by side, top-aligned, on white."""
  height = max(p.shape[0] for p in pictures)
  width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
  out = np.full((height, width, 3), 255, np.uint8)
  x = 0
  for p in pictures:
    out[:p.shape[0], x:x + p.shape[1]] = p
    x += p.shape[1] + gap
  return out
