"""Noise schedules, training targets and the conversions between model outputs.

Conventions follow diffusers' schedulers: `alphas_cumprod[t]` is alpha-bar at integer
timestep t in [0, num_train_timesteps), x_t = sqrt(a) x0 + sqrt(1 - a) eps.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'scaled_linear', 'cosine')
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """A discrete-time variance schedule (diffusers' `beta_schedule` names)."""
  kind: str = 'scaled_linear'
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  # Rescale so that the last alpha-bar is exactly 0 (arXiv 2305.08891): training then sees
  # pure noise at the last timestep, as sampling starts from it. Pair it with v_prediction:
  # an epsilon model's x0 is undefined there (see `predict_x0_and_eps`).
  rescale_zero_terminal_snr: bool = False

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f'Unknown noise schedule {self.kind!r}; expected one of {SCHEDULES}.')

  def betas(self) -> np.ndarray:
    t = self.num_train_timesteps
    if self.kind == 'linear':
      betas = np.linspace(self.beta_start, self.beta_end, t, dtype=np.float64)
    elif self.kind == 'scaled_linear':  # Stable Diffusion's schedule.
      betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, t, dtype=np.float64)**2
    else:  # 'cosine' (Nichol & Dhariwal 2021; diffusers' squaredcos_cap_v2).
      alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2)**2
      betas = np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999)
                        for i in range(t)], dtype=np.float64)
    return rescale_zero_terminal_snr(betas) if self.rescale_zero_terminal_snr else betas

  def alphas_cumprod(self) -> np.ndarray:
    """alpha-bar_t, float32 as diffusers stores it, shape [num_train_timesteps].

    Computed in float64 first, so it differs from diffusers' (float32 betas and cumprod)
    by their rounding: up to ~1e-5 relative where alpha-bar is tiny.
    """
    return np.cumprod(1.0 - self.betas()).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Algorithm 1 of arXiv 2305.08891 (diffusers' function of the same name), in float64:
  shift and scale sqrt(alpha-bar) so the first is kept and the last becomes exactly 0."""
  sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  alpha_bar = sqrt_ab**2
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return 1.0 - alphas


def _bcast(a, x):
  """Per-example scalars [B] -> broadcastable against x [B, ...]."""
  return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def add_noise(x0, noise, alpha_bar):
  return _bcast(jnp.sqrt(alpha_bar), x0) * x0 + _bcast(jnp.sqrt(1 - alpha_bar), x0) * noise


def training_target(prediction_type: str, x0, noise, alpha_bar):
  """What the network is trained to output."""
  if prediction_type == 'epsilon':
    return noise
  if prediction_type == 'v_prediction':
    return (_bcast(jnp.sqrt(alpha_bar), x0) * noise -
            _bcast(jnp.sqrt(1 - alpha_bar), x0) * x0)
  if prediction_type == 'sample':
    return x0
  raise ValueError(f'Unknown prediction type {prediction_type!r}; expected {PREDICTION_TYPES}.')


def predict_x0_and_eps(prediction_type: str, model_output, x_t, alpha_bar):
  """Invert the parameterisation: (x0, eps) implied by the model output at x_t.

  At alpha-bar 0 (the last timestep of a zero-terminal-SNR schedule) an epsilon output
  says nothing about x0 and this divides by 0, as diffusers' DDPM/DDIM do; the samplers
  in `schedulers` refuse that case (DDPM/DDIM) or clamp alpha-bar to 2^-24 (Euler, DPM++)
  as diffusers does. v and x0 outputs are well defined there.
  """
  sa, s1a = _bcast(jnp.sqrt(alpha_bar), x_t), _bcast(jnp.sqrt(1 - alpha_bar), x_t)
  if prediction_type == 'epsilon':
    eps = model_output
    return (x_t - s1a * eps) / sa, eps
  if prediction_type == 'v_prediction':
    return sa * x_t - s1a * model_output, sa * model_output + s1a * x_t
  if prediction_type == 'sample':
    x0 = model_output
    return x0, (x_t - sa * x0) / s1a
  raise ValueError(f'Unknown prediction type {prediction_type!r}; expected {PREDICTION_TYPES}.')
