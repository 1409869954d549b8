"""AdamW with linear warm-up, cosine decay and global-norm clipping."""

from __future__ import annotations

import dataclasses

import flax
import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-4
  warmup_steps: int = 500
  final_learning_rate_fraction: float = 0.1  # cosine decays to this fraction of the peak.
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.01
  grad_clip_norm: float = 1.0


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=min(config.warmup_steps, max(total_steps - 1, 0)),
      decay_steps=max(total_steps, 1),
      end_value=config.learning_rate * config.final_learning_rate_fraction)


def make_optimizer(config: OptimizerConfig, total_steps: int,
                   frozen_prefixes: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """The optimizer; parameters whose top-level name is in `frozen_prefixes` never move
  (set_to_zero rather than a zero gradient, so weight decay does not shrink them)."""

  def decays(params):  # no weight decay on biases and norm scales
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)

  tx = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                  weight_decay=config.weight_decay, mask=decays))
  if not frozen_prefixes:
    return tx

  def labels(params):
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {k: 'frozen' if k[0] in frozen_prefixes else 'train' for k in flat})

  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
