"""Sampling with classifier-free guidance, the whole loop one `lax.fori_loop`."""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from charred.models import schedulers as schedulers_lib

# denoise(x_t [B,H,W,C], t [B], context [B,L,E], mask [B,L]) -> model output like x_t.
DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = 'trailing',
                   steps_offset: int = 0) -> np.ndarray:
  """Descending timesteps, as diffusers' DDIMScheduler.set_timesteps spaces them."""
  return schedulers_lib.spaced_timesteps(num_train_timesteps, num_steps, spacing, steps_offset)


def rescale_noise_cfg(guided: jax.Array, cond: jax.Array, guidance_rescale: float) -> jax.Array:
  """diffusers' `rescale_noise_cfg` (arXiv 2305.08891, section 3.4): give the guided output
  the per-example std of the conditional one, mixed back in by `guidance_rescale`."""
  axes = tuple(range(1, cond.ndim))
  # torch's std is unbiased; the ratio of two stds over the same axes does not care.
  ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
  return guidance_rescale * (guided * ratio) + (1 - guidance_rescale) * guided


def sample(denoise: DenoiseFn, noise: jax.Array, context: jax.Array, mask: jax.Array,
           uncond_context: jax.Array, uncond_mask: jax.Array, *,
           scheduler: schedulers_lib.Scheduler, num_steps: int, guidance_scale: float,
           guidance_rescale: float = 0.0, rng: jax.Array | None = None,
           progress: bool = False) -> jax.Array:
  """From unit Gaussian `noise` to a sample, as diffusers' pipelines loop.

  The noise is scaled by the scheduler's `init_noise_sigma`. Guidance runs the conditional
  and unconditional branches as one batch of 2B: out = uncond + scale * (cond - uncond),
  then `rescale_noise_cfg` if `guidance_rescale` > 0; scale 1 disables it. Stochastic
  schedulers need `rng` (folded with the step index). Meant to be traced under jit: the
  schedule is numpy at trace time and the loop is one `lax.fori_loop`. `progress` draws a
  tqdm bar from inside the loop (host callbacks; a different program, so a different
  trace, from the one without).
  """
  if scheduler.stochastic and rng is None:
    raise ValueError(f'{type(scheduler).__name__} is stochastic: pass rng.')
  chex.assert_equal_shape([context, uncond_context])
  chex.assert_equal_shape([mask, uncond_mask])
  chex.assert_equal_shape_prefix([noise, context, mask], 1)
  state = scheduler.init_state(num_steps, noise)
  batch = noise.shape[0]
  guided = guidance_scale != 1.0
  if guided:
    both_context = jnp.concatenate([context, uncond_context], axis=0)
    both_mask = jnp.concatenate([mask, uncond_mask], axis=0)

  def body(i, carry):
    x, state = carry
    x_in = scheduler.scale_model_input(state, x, i)
    t = jnp.full((batch,), state.timesteps[i])
    if guided:
      out = denoise(jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t]), both_context,
                    both_mask)
      cond, uncond = out[:batch], out[batch:]
      out = uncond + guidance_scale * (cond - uncond)
      if guidance_rescale > 0:
        out = rescale_noise_cfg(out, cond, guidance_rescale)
    else:
      out = denoise(x_in, t, context, mask)
    step_rng = None if rng is None else jax.random.fold_in(rng, i)
    return scheduler.step(state, out, i, x, step_rng)

  n = state.timesteps.shape[0]
  if progress:
    import jax_tqdm  # pylint: disable=g-import-not-at-top
    body = jax_tqdm.loop_tqdm(n, desc='sampling', leave=False)(body)
  x = noise * scheduler.init_noise_sigma(num_steps)
  x, _ = jax.lax.fori_loop(0, n, body, (x, state))
  return x


@dataclasses.dataclass(frozen=True, eq=False)
class _Table:
  """A bare alpha-bar table standing in for a NoiseSchedule."""
  table: np.ndarray

  @property
  def num_train_timesteps(self) -> int:
    return len(self.table)

  def alphas_cumprod(self) -> np.ndarray:
    return self.table


def ddim_sample(denoise: DenoiseFn, noise: jax.Array, context: jax.Array, mask: jax.Array,
                uncond_context: jax.Array, uncond_mask: jax.Array, *,
                alphas_cumprod: np.ndarray, prediction_type: str, num_steps: int,
                guidance_scale: float, spacing: str = 'trailing',
                clip_sample: float | None = 1.0) -> jax.Array:
  """Deterministic DDIM (eta = 0): `sample` with a `schedulers.DDIM` on this table.

  `clip_sample` clips the predicted x0 (pixel-space models, whose data lies in [-1, 1]).
  """
  scheduler = schedulers_lib.DDIM(
      schedule=_Table(np.asarray(alphas_cumprod)), prediction_type=prediction_type,
      spacing=spacing, clip_sample=clip_sample)
  return sample(denoise, noise, context, mask, uncond_context, uncond_mask,
                scheduler=scheduler, num_steps=num_steps, guidance_scale=guidance_scale)
