"""Samplers as diffusers' schedulers compute them, functional and jit-friendly.

Each scheduler is a frozen (hashable) dataclass mirroring the diffusers scheduler of the
same config: DDPM, DDIM, Euler, EulerAncestral and DPMSolverPP2M (DPMSolverMultistep
with its defaults). What depends only on the step index (timesteps, sigmas, update
coefficients) is computed in float64 numpy at trace time and kept as float32 tables in a
small `SchedulerState`; `step` indexes them with a possibly traced step index, so a whole
sampling loop is one `lax.fori_loop` (see `sampling.sample`):

  state = scheduler.init_state(num_steps, noise)
  x = noise * scheduler.init_noise_sigma(num_steps)
  for i in range(len(state.timesteps)):
    out = model(scheduler.scale_model_input(state, x, i), state.timesteps[i])
    x, state = scheduler.step(state, out, i, x, rng)

Timesteps are what the model is conditioned on (float for the Euler family, whose
linspace spacing is fractional). `x` lives in the scheduler's own space: x_t for
DDPM/DDIM/DPM++, x_t * sqrt(1 + sigma^2) for the Euler family (hence `scale_model_input`
and `init_noise_sigma`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from charred.models import diffusion

SPACINGS = ('leading', 'trailing', 'linspace')
# diffusers' Euler and DPM-Solver clamp a zero last alpha-bar to this, "close to 0 without
# being 0 so first sigma is not inf".
_MIN_ALPHA_BAR = 2.0**-24


@flax.struct.dataclass
class SchedulerState:
  timesteps: jax.Array  # [n], descending, what the model is conditioned on
  coeffs: dict[str, jax.Array]  # per-step float32 tables, [n] each
  prev_x0: jax.Array | None = None  # DPM-Solver++: the previous step's x0 prediction


def _check_num_steps(num_train: int, num_steps: int) -> None:
  if not 0 < num_steps <= num_train:
    raise ValueError(f'num_steps must be in [1, {num_train}], got {num_steps}.')


def _trailing(num_train: int, num_steps: int) -> np.ndarray:
  # np.arange can yield one value too many (e.g. 61 steps of 1000: a last 1e-13 that
  # rounds to timestep -1); diffusers then takes a step at t=-1. Keep the first n.
  return np.round(np.arange(num_train, 0, -num_train / num_steps))[:num_steps] - 1


def spaced_timesteps(num_train: int, num_steps: int, spacing: str = 'trailing',
                     steps_offset: int = 0) -> np.ndarray:
  """Descending int timesteps as diffusers' DDPM/DDIM set_timesteps space them."""
  _check_num_steps(num_train, num_steps)
  if spacing == 'leading':
    steps = (np.arange(num_steps) * (num_train // num_steps)).round()[::-1] + steps_offset
  elif spacing == 'trailing':
    steps = _trailing(num_train, num_steps)
  elif spacing == 'linspace':
    steps = np.linspace(0, num_train - 1, num_steps).round()[::-1]
  else:
    raise ValueError(f'Unknown timestep spacing {spacing!r}; expected one of {SPACINGS}.')
  return steps.astype(np.int32)


def _f32(**tables) -> dict[str, jax.Array]:
  return {k: jnp.asarray(np.asarray(v, np.float64).astype(np.float32)) for k, v in tables.items()}


def _noise(rng, noise, x):
  if noise is not None:
    return noise
  if rng is None:
    raise ValueError('This scheduler is stochastic: pass rng (or noise).')
  return jax.random.normal(rng, x.shape, x.dtype)


@dataclasses.dataclass(frozen=True)
class Scheduler:
  """Shared config. `schedule` and `prediction_type` are the model's own (a sampler built
  for a model takes them from its config, as diffusers' `from_config` does)."""
  schedule: diffusion.NoiseSchedule = diffusion.NoiseSchedule()
  prediction_type: str = 'epsilon'
  spacing: str = 'leading'
  steps_offset: int = 0  # added to 'leading' timesteps (Stable Diffusion uses 1)

  stochastic: ClassVar[bool] = False

  def __post_init__(self):
    if self.prediction_type not in diffusion.PREDICTION_TYPES:
      raise ValueError(f'Unknown prediction type {self.prediction_type!r}; expected one of '
                       f'{diffusion.PREDICTION_TYPES}.')
    if self.spacing not in SPACINGS:
      raise ValueError(f'Unknown timestep spacing {self.spacing!r}; expected one of '
                       f'{SPACINGS}.')

  def alphas_cumprod(self) -> np.ndarray:
    """The model's float32 alpha-bar table, as float64 for the coefficient arithmetic."""
    return np.asarray(self.schedule.alphas_cumprod(), np.float64)

  def timesteps(self, num_steps: int) -> np.ndarray:
    """Descending integer timesteps, spaced as diffusers' DDPM/DDIM schedulers space them."""
    n = self.schedule.num_train_timesteps
    return spaced_timesteps(n, num_steps, self.spacing, self.steps_offset)

  def init_noise_sigma(self, num_steps: int) -> float:
    """Scale of the initial unit Gaussian noise."""
    del num_steps  # unused here; the Euler family starts at its largest sigma
    return 1.0

  def init_state(self, num_steps: int, x: jax.Array) -> SchedulerState:
    raise NotImplementedError

  def scale_model_input(self, state: SchedulerState, x: jax.Array, i) -> jax.Array:
    """What the model sees at step i."""
    del state, i  # unused here; the Euler family divides by sqrt(sigma^2 + 1)
    return x

  def step(self, state: SchedulerState, model_output: jax.Array, i, x: jax.Array,
           rng: jax.Array | None = None, *, noise: jax.Array | None = None
           ) -> tuple[jax.Array, SchedulerState]:
    """x at step i -> x at step i + 1. Stochastic schedulers draw `noise` from `rng`
    unless it is given."""
    raise NotImplementedError

  def _x0_and_eps(self, state, model_output, i, x):
    return diffusion.predict_x0_and_eps(self.prediction_type, model_output, x,
                                        state.coeffs['alpha_bar'][i])

  def _check_alpha_bar(self, alpha_bar: np.ndarray) -> None:
    if self.prediction_type == 'epsilon' and np.any(alpha_bar == 0):
      raise ValueError('An epsilon model cannot be sampled from alpha-bar 0 (zero terminal '
                       "SNR): x0 is undefined there. Use v_prediction or 'leading' spacing.")


@dataclasses.dataclass(frozen=True)
class DDPM(Scheduler):
  """diffusers' DDPMScheduler (variance_type 'fixed_small'): ancestral sampling."""
  clip_sample: float | None = 1.0  # clip predicted x0 to [-c, c]; None: no clipping

  stochastic: ClassVar[bool] = True

  def init_state(self, num_steps, x):
    ac = self.alphas_cumprod()
    ts = self.timesteps(num_steps)
    # The previous timestep is the next one in the list (not t - ratio, unlike DDIM).
    prev = np.append(ts[1:], -1)
    a_t = ac[ts]
    self._check_alpha_bar(a_t)
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
    alpha = a_t / a_prev
    beta = 1 - alpha
    variance = np.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    return SchedulerState(jnp.asarray(ts), _f32(
        alpha_bar=a_t, c_x0=np.sqrt(a_prev) * beta / (1 - a_t),
        c_x=np.sqrt(alpha) * (1 - a_prev) / (1 - a_t),
        std=np.where(ts > 0, np.sqrt(variance), 0.0)))

  def step(self, state, model_output, i, x, rng=None, *, noise=None):
    x0, _ = self._x0_and_eps(state, model_output, i, x)
    if self.clip_sample is not None:
      x0 = jnp.clip(x0, -self.clip_sample, self.clip_sample)
    c = {k: v[i] for k, v in state.coeffs.items()}
    x_prev = c['c_x0'] * x0 + c['c_x'] * x + c['std'] * _noise(rng, noise, x)
    return x_prev, state


@dataclasses.dataclass(frozen=True)
class DDIM(Scheduler):
  """diffusers' DDIMScheduler (set_alpha_to_one): eta 0 is deterministic DDIM."""
  eta: float = 0.0
  clip_sample: float | None = 1.0  # clip predicted x0 to [-c, c]; None: no clipping

  def __post_init__(self):
    super().__post_init__()
    if self.eta < 0:
      raise ValueError(f'eta must be >= 0, got {self.eta}.')

  @property
  def stochastic(self) -> bool:  # type: ignore[override]
    return self.eta > 0

  def init_state(self, num_steps, x):
    ac = self.alphas_cumprod()
    ts = self.timesteps(num_steps)
    prev = ts - self.schedule.num_train_timesteps // num_steps
    a_t = ac[ts]
    self._check_alpha_bar(a_t)
    # With the final step the previous alpha-bar is 1 (set_alpha_to_one).
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
    std = self.eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return SchedulerState(jnp.asarray(ts), _f32(
        alpha_bar=a_t, sqrt_a_prev=np.sqrt(a_prev), c_eps=np.sqrt(1 - a_prev - std**2),
        std=std))

  def step(self, state, model_output, i, x, rng=None, *, noise=None):
    x0, eps = self._x0_and_eps(state, model_output, i, x)
    if self.clip_sample is not None:
      x0 = jnp.clip(x0, -self.clip_sample, self.clip_sample)
    c = {k: v[i] for k, v in state.coeffs.items()}
    x_prev = c['sqrt_a_prev'] * x0 + c['c_eps'] * eps
    if self.eta > 0:
      x_prev = x_prev + c['std'] * _noise(rng, noise, x)
    return x_prev, state


@dataclasses.dataclass(frozen=True)
class _EulerBase(Scheduler):
  """Shared by the Euler samplers: x = x_t * sqrt(1 + sigma^2), sigma^2 = (1 - a) / a."""
  spacing: str = 'linspace'

  def timesteps(self, num_steps):
    n = self.schedule.num_train_timesteps
    _check_num_steps(n, num_steps)
    if self.spacing == 'linspace':  # fractional: sigmas are interpolated between them
      return np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1].copy()
    if self.spacing == 'leading':
      steps = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + self.steps_offset
      return steps.astype(np.float32)
    return _trailing(n, num_steps).astype(np.float32)

  def sigmas(self, num_steps: int) -> np.ndarray:
    """[n + 1] float32 sigmas (as float64), the last 0, linearly interpolated in t."""
    ac = self.alphas_cumprod()
    if ac[-1] == 0:
      ac[-1] = _MIN_ALPHA_BAR
    full = np.sqrt((1 - ac) / ac)
    sigmas = np.interp(self.timesteps(num_steps), np.arange(len(full)), full)
    return np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)

  def init_noise_sigma(self, num_steps):
    s = self.sigmas(num_steps).max()
    return float(s if self.spacing in ('linspace', 'trailing') else np.sqrt(s**2 + 1))

  def scale_model_input(self, state, x, i):
    return x / state.coeffs['input_norm'][i]

  def _x0(self, c, model_output, x):
    if self.prediction_type == 'epsilon':
      return x - c['sigma'] * model_output
    if self.prediction_type == 'v_prediction':
      return model_output * c['c_out'] + x * c['c_skip']
    return model_output

  def _tables(self, num_steps):
    s = self.sigmas(num_steps)
    sigma = s[:-1]
    return s, dict(sigma=sigma, input_norm=np.sqrt(sigma**2 + 1),
                   c_out=-sigma / np.sqrt(sigma**2 + 1), c_skip=1 / (sigma**2 + 1))


@dataclasses.dataclass(frozen=True)
class Euler(_EulerBase):
  """diffusers' EulerDiscreteScheduler (linear interpolation, no churn, final sigma 0)."""

  def init_state(self, num_steps, x):
    s, tables = self._tables(num_steps)
    return SchedulerState(jnp.asarray(self.timesteps(num_steps)),
                          _f32(ratio=s[1:] / s[:-1], **tables))

  def step(self, state, model_output, i, x, rng=None, *, noise=None):
    c = {k: v[i] for k, v in state.coeffs.items()}
    x0 = self._x0(c, model_output, x)
    # diffusers' x + (x - x0) / sigma * (sigma_next - sigma), rearranged: that form cancels
    # x against nearly -x when sigma_next << sigma (e.g. 4096 at zero terminal SNR).
    return c['ratio'] * x + (1 - c['ratio']) * x0, state


@dataclasses.dataclass(frozen=True)
class EulerAncestral(_EulerBase):
  """diffusers' EulerAncestralDiscreteScheduler; x0 ('sample') outputs, which diffusers
  leaves unimplemented, are taken as the x0 prediction as in Euler."""

  stochastic: ClassVar[bool] = True

  def init_state(self, num_steps, x):
    s, tables = self._tables(num_steps)
    s_from, s_to = s[:-1], s[1:]
    sigma_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
    sigma_down = np.sqrt(s_to**2 - sigma_up**2)
    return SchedulerState(jnp.asarray(self.timesteps(num_steps)),
                          _f32(ratio=sigma_down / s_from, sigma_up=sigma_up, **tables))

  def step(self, state, model_output, i, x, rng=None, *, noise=None):
    c = {k: v[i] for k, v in state.coeffs.items()}
    x0 = self._x0(c, model_output, x)
    # An Euler step to sigma_down (rearranged as in Euler), then noise up to sigma_next.
    x_prev = c['ratio'] * x + (1 - c['ratio']) * x0
    return x_prev + _noise(rng, noise, x) * c['sigma_up'], state


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(Scheduler):
  """diffusers' DPMSolverMultistepScheduler with its defaults: DPM-Solver++ (data
  prediction), order 2, midpoint, first order at the first and (final sigma 0) last step,
  which therefore returns the x0 prediction."""
  spacing: str = 'linspace'

  def timesteps(self, num_steps):
    n = self.schedule.num_train_timesteps
    _check_num_steps(n, num_steps)
    # num_steps + 1 points with the last dropped (lambda_min_clipped = -inf keeps all).
    if self.spacing == 'linspace':
      steps = np.linspace(0, n - 1, num_steps + 1).round()[::-1][:-1]
    elif self.spacing == 'leading':
      ratio = n // (num_steps + 1)
      steps = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1] + self.steps_offset
    else:
      steps = _trailing(n, num_steps)
    return steps.astype(np.int32)

  def init_state(self, num_steps, x):
    ac = self.alphas_cumprod()
    if ac[-1] == 0:
      ac[-1] = _MIN_ALPHA_BAR
    ts = self.timesteps(num_steps)
    s = np.append(np.sqrt((1 - ac) / ac)[ts], 0.0).astype(np.float32).astype(np.float64)
    alpha = 1 / np.sqrt(s**2 + 1)
    sigma = s * alpha
    with np.errstate(divide='ignore'):  # the final sigma 0 has lambda = inf, exp(-h) = 0
      lam = np.log(alpha) - np.log(sigma)
    h = lam[1:] - lam[:-1]
    coef = alpha[1:] * (np.exp(-h) - 1)
    n = len(ts)
    second = (np.arange(n) >= 1) & (np.arange(n) < n - 1)
    h_prev = np.concatenate([[1.0], lam[1:-1] - lam[:-2]])
    inv_r0 = np.where(second, h / h_prev, 0.0)  # D1 = (m0 - m1) / r0, r0 = h_prev / h
    return SchedulerState(jnp.asarray(ts), _f32(
        alpha=alpha[:-1], sigma=sigma[:-1], ratio=sigma[1:] / sigma[:-1], coef=coef,
        inv_r0=inv_r0), prev_x0=jnp.zeros_like(x))

  def step(self, state, model_output, i, x, rng=None, *, noise=None):
    c = {k: v[i] for k, v in state.coeffs.items()}
    if self.prediction_type == 'epsilon':
      x0 = (x - c['sigma'] * model_output) / c['alpha']
    elif self.prediction_type == 'v_prediction':
      x0 = c['alpha'] * x - c['sigma'] * model_output
    else:
      x0 = model_output
    d1 = c['inv_r0'] * (x0 - state.prev_x0)
    x_prev = c['ratio'] * x - c['coef'] * x0 - 0.5 * c['coef'] * d1
    return x_prev, state.replace(prev_x0=x0)


SCHEDULERS = {'ddim': DDIM, 'ddpm': DDPM, 'euler': Euler, 'euler_ancestral': EulerAncestral,
              'dpmpp_2m': DPMSolverPP2M}


def lookup(name: str) -> type[Scheduler]:
  """A scheduler class by its command-line name (see SCHEDULERS)."""
  if name not in SCHEDULERS:
    raise ValueError(f'Unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}.')
  return SCHEDULERS[name]


def make(name: str, **kwargs) -> Scheduler:
  return lookup(name)(**kwargs)
