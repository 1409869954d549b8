"""Loss weighting and noise for diffusion training."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from charred.models import diffusion
from charred.models import unet


def snr(alpha_bar):
  """SNR(t) = alpha_bar / (1 - alpha_bar): +inf at alpha_bar 1, 0 at alpha_bar 0."""
  alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
  return jnp.where(alpha_bar < 1, alpha_bar / jnp.maximum(1 - alpha_bar, 1e-30), jnp.inf)


def min_snr_weight(alpha_bar, prediction_type: str, gamma: float):
  """Min-SNR-gamma loss weights (Hang et al., arXiv 2303.09556) for each alpha_bar [B].

  The paper weights the x0-space loss by min(SNR, gamma); written for the network's own
  target that is min(SNR, g) for x0, min(SNR, g) / SNR for epsilon and
  min(SNR, g) / (SNR + 1) for v. The forms below are the same quantities without 0/0 or
  inf/inf: epsilon's weight is g / max(SNR, g) (1 at SNR 0, the limit), and v's is
  min(SNR, g) * (1 - alpha_bar). At a zero-terminal-SNR last step (SNR 0) the x0 and v
  weights are 0, as the formula says: that step teaches nothing about x0.
  """
  if gamma <= 0:
    raise ValueError(f'min_snr_gamma must be > 0, got {gamma}.')
  alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
  s = snr(alpha_bar)
  if prediction_type == 'sample':
    return jnp.minimum(s, gamma)
  if prediction_type == 'epsilon':
    return gamma / jnp.maximum(s, gamma)
  if prediction_type == 'v_prediction':
    return jnp.minimum(s, gamma) * (1 - alpha_bar)
  raise ValueError(f'Unknown prediction type {prediction_type!r}; expected '
                   f'{diffusion.PREDICTION_TYPES}.')


def sample_noise(rng, shape, offset_noise: float = 0.0):
  """Gaussian noise for one example [H, W, C]; with offset noise (Guttenberg 2023) plus
  `offset_noise` * N(0, 1) per channel, constant over the image, so that the model can
  learn to change an image's mean (very dark or bright images)."""
  base_rng, offset_rng = jax.random.split(rng)
  noise = jax.random.normal(base_rng, shape, jnp.float32)
  if offset_noise:
    offset = jax.random.normal(offset_rng, (1,) * (len(shape) - 1) + shape[-1:], jnp.float32)
    noise = noise + offset_noise * offset
  return noise


TIMESTEP_SAMPLINGS = ('uniform', 'logit_normal')


def sample_timestep(rng, num_train_timesteps: int, kind: str = 'uniform',
                    logit_mean: float = 0.0, logit_std: float = 1.0):
  """One integer training timestep in [0, num_train_timesteps): uniform, or logit-normal
  (t / T = sigmoid(N(logit_mean, logit_std)), Esser et al. 2024, arXiv 2403.03206)."""
  if kind == 'uniform':
    return jax.random.randint(rng, (), 0, num_train_timesteps)
  if kind == 'logit_normal':
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (), jnp.float32))
    return jnp.clip(jnp.floor(u * num_train_timesteps), 0, num_train_timesteps - 1
                    ).astype(jnp.int32)
  raise ValueError(f'Unknown timestep sampling {kind!r}; expected {TIMESTEP_SAMPLINGS}.')


def per_example_mse(prediction, target, pixel_weights=None):
  """Mean squared error per example [B], in float32 whatever the compute dtype.
  `pixel_weights` [B, H, W] (optional) weighs each pixel's error; the mean is still over
  all values, so weights of 1 give the plain MSE."""
  err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  if pixel_weights is not None:
    err = err * pixel_weights.astype(jnp.float32)[..., None]
  return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def cell_targets(pixel_targets, cells: int):
  """[B, h, w]: `pixel_targets` [B, H, W] at the centre pixel of each of `cells` cells that
  tile the image in a grid of its aspect ratio."""
  _, height, width = pixel_targets.shape
  h, w = unet.attention_grid(cells, height, width)
  rows = ((jnp.arange(h) + 0.5) * height / h).astype(jnp.int32)
  cols = ((jnp.arange(w) + 0.5) * width / w).astype(jnp.int32)
  return pixel_targets[:, rows][:, :, cols]


def glyph_char_loss(logits, glyph_chars, keep):
  """Cross-entropy of a per-cell character head: logits [B, h, w, K] against the
  character (byte value) of the glyph at each cell's centre pixel (`glyph_chars` [B, H, W],
  -1: none), averaged over cells inside glyphs of kept examples."""
  b, h, w, _ = logits.shape
  target = cell_targets(glyph_chars, h * w).reshape(b, h, w)
  valid = (target >= 0) & keep[:, None, None]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def glyph_attention_loss(attention_maps, glyph_tokens, keep, blank_tokens=None):
  """Cross-entropy pulling cross-attention onto each glyph's own caption token.

  attention_maps: cross-attention weights [B, N, T, L] of any number of layers, whose T
    query cells tile the image at any resolution (h x w cells of the same aspect ratio).
  glyph_tokens: int [B, H, W] pixels -> the caption token whose glyph covers them, -1
    where none does (from the renderer; see datasets/signs.py).
  keep: bool [B], False for examples whose caption was dropped.
  blank_tokens: optional int [B], the token that cells outside every glyph are pulled
    onto (e.g. the closing quote after the drawn text; -1: none for that example).
  Each layer's loss is -log of the head-averaged weight on the target token at the cells
  whose centre pixel lies in a glyph, averaged over such cells; layers are averaged.
  Heads are averaged, not each held to the target: a layer may keep heads for other work.
  """
  attention_maps = list(attention_maps)
  if not attention_maps:
    raise ValueError('glyph_attention_loss: no cross-attention maps (does the U-Net have '
                     'cross-attention blocks?).')
  b = glyph_tokens.shape[0]
  total = 0.0
  for weights in attention_maps:
    cells = weights.shape[2]
    target = cell_targets(glyph_tokens, cells).reshape(b, cells)
    if blank_tokens is not None:
      target = jnp.where(target >= 0, target, blank_tokens[:, None])
    valid = (target >= 0) & keep[:, None]
    probs = jnp.mean(weights.astype(jnp.float32), axis=1)  # [B, T, L]
    p = jnp.take_along_axis(probs, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
    nll = -jnp.log(p + 1e-6)
    total = total + jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
  return total / len(attention_maps)
