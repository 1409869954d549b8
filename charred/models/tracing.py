"""A guard against retracing: each argument signature of a jitted function traces once.

A function that JAX retraces on every call (a jit rebuilt inside a loop, a Python value
that became static) still gives right answers, only slowly: nothing fails. `once_per_signature`
makes it fail, through `chex.assert_max_traces`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import chex
import jax

# chex counts traces per definition site (the wrapped function's name, source and the
# stack that wrapped it), for the whole process: without a name of its own, every wrapper
# from one site would share one count, and two runs in one process would add up.
_wrappers = itertools.count()


def signature(args, kwargs) -> tuple[Any, ...]:
  """The tree structure with each leaf's shape, dtype and weak type (arrays and tracers)
  or type (anything else): what JAX compiles one program for. A leaf's value is not in
  it, so a Python value that JAX treats as static and that changes counts as a retrace."""
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))

  def leaf(x):
    if hasattr(x, 'shape') and hasattr(x, 'dtype'):
      return (tuple(x.shape), str(x.dtype), bool(getattr(x, 'weak_type', False)))
    return type(x).__name__

  return (treedef, tuple(leaf(x) for x in leaves))


def once_per_signature(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
  """`fn` (to be jitted: wrap before jax.jit) that raises AssertionError when it is traced
  twice for one signature (see `signature`); new shapes, e.g. another bucket's batches,
  trace anew. Every call of this function makes a guard with counts of its own."""
  guarded = {}

  def traced(*args, **kwargs):
    key = signature(args, kwargs)
    if key not in guarded:
      guarded[key] = chex.assert_max_traces(_named(fn, f'{name}#{next(_wrappers)}'), 1)
    return guarded[key](*args, **kwargs)

  traced.__name__ = name
  return traced


def _named(fn, name: str):
  def call(*args, **kwargs):
    return fn(*args, **kwargs)
  call.__name__ = name
  return call
