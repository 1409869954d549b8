"""The conversion driver shared by every source format.

A format-specific planner (diffusers.py, t5.py) says, for every parameter of the charred
module, which source tensor it comes from and how to reshape it (a `Rule`). The driver
checks the plan against the module's parameter shapes (computed with `jax.eval_shape`, so
nothing is allocated), then yields the converted tensors one at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from charred.models.convert.sources import CheckpointFormatError, LazyTensor

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def linear_to_dense(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
  return w.T


def conv_to_flax(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out]."""
  return w.transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A charred parameter comes from `source` (the format's own tensor name) via `transform`."""
  source: str
  transform: Transform = identity


@dataclasses.dataclass
class ConversionPlan:
  """Everything needed to convert one model: what it is, where each parameter comes from."""
  kind: str  # a key of charred.models.model_kinds.MODEL_KINDS
  config: Any  # the charred config dataclass of that kind
  source: dict[str, LazyTensor]
  rules: dict[str, Rule]  # '/'-joined charred parameter path -> Rule
  origin: str  # the file or folder read, for messages
  # Source tensors that are expected to stay unused (a t5x decoder, optimizer state).
  ignored_prefixes: tuple[str, ...] = ()


class ParameterMismatchError(ValueError):
  """A checkpoint whose names or shapes do not fit the model config."""


def _shape_after(rule: Rule, tensor: LazyTensor) -> tuple[int, ...]:
  # A zero-strided stand-in has the source's shape and no memory: transposes and
  # squeezes on it are views, so the transformed shape costs nothing to compute.
  stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), tensor.shape,
                                             (0,) * len(tensor.shape), writeable=False)
  return tuple(rule.transform(stand_in).shape)


def check_plan(plan: ConversionPlan, expected: dict[str, tuple[int, ...]]) -> list[str]:
  """Raises naming the first parameter whose source is missing or misshapen; returns the
  names of source tensors that nothing uses (and that no ignored prefix covers)."""
  for path, shape in expected.items():
    rule = plan.rules.get(path)
    if rule is None:
      raise ParameterMismatchError(f'{plan.origin}: no rule gives charred parameter {path} '
                                   f'{tuple(shape)}.')
    tensor = plan.source.get(rule.source)
    if tensor is None:
      raise ParameterMismatchError(f'{plan.origin}: tensor {rule.source} (for {path}, shape '
                                   f'{tuple(shape)}) is not in the checkpoint.')
    got = _shape_after(rule, tensor)
    if got != tuple(shape):
      raise ParameterMismatchError(
          f'{plan.origin}: {rule.source} has shape {tensor.shape} (as {path}: {got}), the '
          f'config needs {tuple(shape)}.')
  used = {plan.rules[p].source for p in expected}
  return [n for n in plan.source
          if n not in used and not any(n.startswith(p) for p in plan.ignored_prefixes)]


def iter_converted(plan: ConversionPlan, expected: dict[str, tuple[int, ...]],
                   dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
  """(charred path, array) one at a time; each source tensor is read when its turn comes."""
  for path, shape in expected.items():
    rule = plan.rules[path]
    try:
      value = rule.transform(np.asarray(plan.source[rule.source].load()))
    except CheckpointFormatError:
      raise
    except Exception as e:  # a corrupt buffer surfaces as a numpy/msgpack error
      raise CheckpointFormatError(f'{plan.origin}: cannot read {rule.source}: {e}') from e
    if tuple(value.shape) != tuple(shape):
      raise ParameterMismatchError(f'{plan.origin}: {rule.source} gives {path} shape '
                                   f'{value.shape}, the config needs {tuple(shape)}.')
    yield path, np.ascontiguousarray(value, dtype=dtype)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `out_dir` to write into, renamed to `out_dir` when the
  block completes and removed if it fails: never a half-written output."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir} exists; pass overwrite to replace it.')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + '.tmp-', dir=parent)
  try:
    yield tmp
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
