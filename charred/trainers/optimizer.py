"""The optimizer: AdamW, Adafactor or SGD with warm-up and cosine decay, global-norm
clipping, and big_vision-style per-parameter options.

Parameters are named by their '/'-joined path (`unet/down_blocks_0/attentions_0/...`).
`frozen` and `lr_mults` hold regexes matched against the whole name (re.fullmatch); the
first matching `lr_mults` entry wins, as in big_vision's `optax.py`. A frozen parameter
gets no update at all (no weight decay either), no optimizer state, and no part in the
clipping norm.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('adamw', 'adafactor', 'sgd')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-4
  warmup_steps: int = 500  # counted in optimizer updates, as the whole schedule is.
  final_learning_rate_fraction: float = 0.1  # cosine decays to this fraction of the peak.
  kind: str = 'adamw'  # one of OPTIMIZERS
  # First-moment decay: Adam's beta1, SGD's and Adafactor's momentum (0: none).
  b1: float = 0.9
  # Adam's beta2; for Adafactor the cap on its second-moment decay 1 - t^-0.8.
  b2: float = 0.999
  # Decoupled weight decay, scaled by the learning rate as in AdamW; never on biases and
  # norm scales (parameters with fewer than 2 dimensions).
  weight_decay: float = 0.01
  grad_clip_norm: float = 1.0
  # Store the first moment (Adam's mu, the momentum) in this dtype, e.g. 'bfloat16'. The
  # second moment stays float32: its per-step change (1 - b2 = 0.1%) is below bfloat16's
  # resolution (0.4%), so a bfloat16 nu would stop moving.
  mu_dtype: str | None = None
  # Adafactor factors the second moment of matrices whose two largest dims are >= this.
  adafactor_min_dim_size_to_factor: int = 128
  # ((regex, multiplier), ...): the whole update of a matching parameter (its weight decay
  # included, as a per-group AdamW learning rate would) is scaled by the multiplier.
  lr_mults: tuple[tuple[str, float], ...] = ()
  frozen: tuple[str, ...] = ()  # regexes of parameters that never move

  def __post_init__(self):
    # Gin writes lists as lists and a lone string is easy to write: keep hashable tuples.
    frozen = (self.frozen,) if isinstance(self.frozen, str) else tuple(self.frozen)
    object.__setattr__(self, 'frozen', frozen)
    object.__setattr__(self, 'lr_mults', tuple(
        tuple(e) if isinstance(e, list) else e for e in self.lr_mults))
    if self.kind not in OPTIMIZERS:
      raise ValueError(f'Unknown optimizer kind {self.kind!r}; expected one of {OPTIMIZERS}.')
    if self.mu_dtype is not None and self.mu_dtype not in ('bfloat16', 'float32'):
      raise ValueError(f"mu_dtype must be None, 'bfloat16' or 'float32', got {self.mu_dtype!r}.")
    for entry in self.lr_mults:
      if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or
          not isinstance(entry[1], (int, float)) or entry[1] <= 0):
        raise ValueError(f'lr_mults entries must be (regex, multiplier > 0), got {entry!r}; '
                         'freeze parameters with `frozen` instead of a zero multiplier.')
    for pattern in tuple(p for p, _ in self.lr_mults) + tuple(self.frozen):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f'Invalid parameter regex {pattern!r}: {e}.') from None


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """The learning rate after n optimizer updates; `total_steps` counts updates."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=min(config.warmup_steps, max(total_steps - 1, 0)),
      decay_steps=max(total_steps, 1),
      end_value=config.learning_rate * config.final_learning_rate_fraction)


def path_name(path) -> str:
  """A tree_util key path as a '/'-joined name."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def match_first(name: str, patterns: Sequence[str]) -> int | None:
  """Index of the first pattern that matches the whole name, or None."""
  for i, pattern in enumerate(patterns):
    if re.fullmatch(pattern, name):
      return i
  return None


def _check_patterns(params, patterns: Sequence[str], what: str) -> None:
  """A pattern matching no parameter is most likely a typo: say so."""
  names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for pattern in patterns:
    if not any(re.fullmatch(pattern, n) for n in names):
      raise ValueError(f'{what} pattern {pattern!r} matches no parameter (names look like '
                       f'{names[0]!r}).')


def scale_by_name(mults: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies the update of each parameter by its first matching multiplier."""
  patterns = [p for p, _ in mults]

  def update(updates, state, params=None):
    del params

    def scale(path, u):
      i = match_first(path_name(path), patterns)
      return u if i is None else u * jnp.asarray(mults[i][1], u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _base_optimizer(config: OptimizerConfig, schedule: optax.Schedule):
  mu_dtype = jnp.dtype(config.mu_dtype) if config.mu_dtype else None

  def decays(params):  # no weight decay on biases and norm scales
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)

  if config.kind == 'adamw':
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                       mask=decays, mu_dtype=mu_dtype)
  momentum = ([optax.trace(config.b1, accumulator_dtype=mu_dtype)] if config.b1 else [])
  if config.kind == 'sgd':
    return optax.chain(*momentum, optax.add_decayed_weights(config.weight_decay, decays),
                       optax.scale_by_learning_rate(schedule))
  # Adafactor as big_vision's scale_by_adafactor: factored second moment with decay
  # 1 - t^-0.8 capped at b2, then optional momentum (without debiasing).
  cap = config.b2
  rms = optax.scale_by_factored_rms(
      factored=True, min_dim_size_to_factor=config.adafactor_min_dim_size_to_factor,
      decay_rate_fn=lambda t, exponent: jnp.minimum(
          cap, 1.0 - (jnp.asarray(t, jnp.float32) + 1.0)**(-exponent)))
  momentum = ([optax.ema(config.b1, debias=False, accumulator_dtype=mu_dtype)]
              if config.b1 else [])
  return optax.chain(rms, *momentum, optax.add_decayed_weights(config.weight_decay, decays),
                     optax.scale_by_learning_rate(schedule))


def make_optimizer(config: OptimizerConfig, total_steps: int,
                   frozen_prefixes: tuple[str, ...] = (), *,
                   accumulation_steps: int = 1) -> optax.GradientTransformation:
  """The optimizer for `total_steps` updates.

  `frozen_prefixes` (top-level names, e.g. 'text_encoder') freeze like `config.frozen`.
  With `accumulation_steps` k > 1 it is wrapped in optax.MultiSteps: each call adds a
  micro-batch's gradient, and every k-th call applies the update of their mean (clipped
  as a whole); the schedule counts those updates only.
  """
  frozen = tuple(config.frozen) + tuple(f'{re.escape(p)}/.*' for p in frozen_prefixes)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                   _base_optimizer(config, learning_rate_schedule(config, total_steps)),
                   *([scale_by_name(config.lr_mults)] if config.lr_mults else []))
  if accumulation_steps > 1:
    tx = optax.MultiSteps(tx, accumulation_steps).gradient_transformation()
  if not frozen and not config.lr_mults:
    return tx

  def labels(params):
    _check_patterns(params, frozen, 'frozen')
    _check_patterns(params, [p for p, _ in config.lr_mults], 'lr_mults')
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'train' if match_first(path_name(path), frozen) is None else 'frozen',
        params)

  # set_to_zero rather than a zero gradient: weight decay must not shrink frozen params.
  # Accumulation sits inside, so frozen parameters get no accumulator either.
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def num_updates(total_steps: int, accumulation_steps: int) -> int:
  return math.ceil(total_steps / accumulation_steps)


def find_multi_steps_state(opt_state) -> Any:
  """The optax.MultiStepsState inside `opt_state`, or None."""
  is_ms = lambda x: isinstance(x, optax.MultiStepsState)
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_ms) if is_ms(x)]
  return found[0] if found else None
