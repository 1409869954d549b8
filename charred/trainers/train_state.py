"""The trainer's state: everything a checkpoint must hold to resume exactly."""

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # train steps taken (micro-batches, with gradient accumulation)
  params: Any
  ema_params: Any  # exponential moving average of params; what samplers use
  opt_state: Any


def ema_update(ema_params, params, step, max_decay: float):
  """EMA with the usual warm-up, min(max_decay, (1 + n) / (10 + n)): early averages
  must not be dominated by the random initialisation."""
  decay = jax.numpy.minimum(max_decay, (1.0 + step) / (10.0 + step))
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
