"""DDIM sampling with classifier-free guidance, jitted as one `lax.fori_loop`."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from charred.models import diffusion

# denoise(x_t [B,H,W,C], t [B], context [B,L,E], mask [B,L]) -> model output like x_t.
DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = 'trailing',
                   steps_offset: int = 0) -> np.ndarray:
  """Descending timesteps, as diffusers' DDIMScheduler.set_timesteps spaces them."""
  if not 0 < num_steps <= num_train_timesteps:
    raise ValueError(f'num_steps must be in [1, {num_train_timesteps}], got {num_steps}.')
  if spacing == 'leading':
    ratio = num_train_timesteps // num_steps
    steps = (np.arange(num_steps) * ratio).round()[::-1] + steps_offset
  elif spacing == 'trailing':
    ratio = num_train_timesteps / num_steps
    steps = np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1
  elif spacing == 'linspace':
    steps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
  else:
    raise ValueError(f"Unknown timestep spacing {spacing!r}; expected 'leading', "
                     "'trailing' or 'linspace'.")
  return steps.astype(np.int32)


def ddim_sample(denoise: DenoiseFn, noise: jax.Array, context: jax.Array, mask: jax.Array,
                uncond_context: jax.Array, uncond_mask: jax.Array, *,
                alphas_cumprod: np.ndarray, prediction_type: str, num_steps: int,
                guidance_scale: float, spacing: str = 'trailing',
                clip_sample: float | None = 1.0) -> jax.Array:
  """Deterministic DDIM (eta = 0) from pure noise to a sample.

  Guidance runs the conditional and unconditional branches as one batch of 2B:
  out = uncond + scale * (cond - uncond); scale 1 disables it. `clip_sample` clips the
  predicted x0 (pixel-space models, whose data lies in [-1, 1]).
  """
  num_train = len(alphas_cumprod)
  timesteps = ddim_timesteps(num_train, num_steps, spacing)
  step = num_train // num_steps
  prev = timesteps - step
  # With the final step the previous alpha-bar is 1 (diffusers' set_alpha_to_one).
  alpha_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], 1.0).astype(np.float32)
  alpha_t = alphas_cumprod[timesteps].astype(np.float32)
  timesteps, alpha_t, alpha_prev = map(jnp.asarray, (timesteps, alpha_t, alpha_prev))

  batch = noise.shape[0]
  guided = guidance_scale != 1.0
  if guided:
    both_context = jnp.concatenate([context, uncond_context], axis=0)
    both_mask = jnp.concatenate([mask, uncond_mask], axis=0)

  def body(i, x):
    t = jnp.full((batch,), timesteps[i])
    if guided:
      out = denoise(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_context, both_mask)
      cond, uncond = out[:batch], out[batch:]
      out = uncond + guidance_scale * (cond - uncond)
    else:
      out = denoise(x, t, context, mask)
    a = jnp.full((batch,), alpha_t[i])
    x0, eps = diffusion.predict_x0_and_eps(prediction_type, out, x, a)
    if clip_sample is not None:
      x0 = jnp.clip(x0, -clip_sample, clip_sample)
    return jnp.sqrt(alpha_prev[i]) * x0 + jnp.sqrt(1 - alpha_prev[i]) * eps

  return jax.lax.fori_loop(0, num_steps, body, noise)
