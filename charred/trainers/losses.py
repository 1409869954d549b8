"""Loss weighting and noise for diffusion training."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from charred.models import diffusion


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


def per_example_mse(prediction, target):
  """Mean squared error per example [B], in float32 whatever the compute dtype."""
  err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(err, axis=tuple(range(1, err.ndim)))
