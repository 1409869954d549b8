"""Orbax checkpoints of the train state and the data iterator's position.

A checkpoint is `directory/<step>/` holding two items: `state` (the TrainState: step,
parameters, EMA, optimizer state) and `data` (a JSON dict: the batch count and the data
iterator's state, `{'position': n, 'iterator': {...}}`).
Saves are asynchronous: `save` returns once the arrays are copied off the devices, and a
background thread writes them under a temporary name that is renamed to `<step>` only
when complete, so a run killed at any moment leaves whole checkpoints or none.

Restoring places every array onto the shardings asked for, whatever mesh wrote it, and
falls back from a newest checkpoint that cannot be read to the one before it (with a
warning). Only the keep policy deletes checkpoints; a killed run's half-written one (still
under its temporary name) is removed when training starts again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from typing import Any, Iterable, Iterator

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from charred.trainers.train_state import TrainState

# Where an unreadable step directory is moved (`<step>.unrestorable`) so that the resumed
# run can write that step again: Orbax only lists directories named by a bare integer.
UNRESTORABLE_SUFFIX = '.unrestorable'


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When a run saves and what it keeps: the newest `keep` checkpoints (None: all),
  plus every multiple of `keep_every` steps (a multiple of `every`). Saves are
  asynchronous unless `asynchronous` is False; a SIGTERM also saves (and stops) at the
  current step."""
  every: int = 1000
  keep: int | None = 3
  keep_every: int | None = None
  asynchronous: bool = True

  def __post_init__(self):
    if not (isinstance(self.every, int) and self.every >= 1):
      raise ValueError(f'CheckpointConfig.every must be an integer >= 1, got {self.every!r}.')
    if self.keep is not None and not (isinstance(self.keep, int) and self.keep >= 1):
      raise ValueError(f'CheckpointConfig.keep must be None or an integer >= 1, got '
                       f'{self.keep!r}.')
    if self.keep_every is not None and (
        not isinstance(self.keep_every, int) or self.keep_every < 1 or
        self.keep_every % self.every):
      raise ValueError(f'CheckpointConfig.keep_every ({self.keep_every!r}) must be None or a '
                       f'positive multiple of every ({self.every}).')

  def checkpointer(self, directory: str) -> Checkpointer:
    return Checkpointer(directory, self.keep, self.keep_every, self.asynchronous)


class CheckpointError(RuntimeError):
  """No checkpoint could be restored."""


class Checkpointer:
  """Saves `TrainState` plus a JSON data-iterator state under `directory/<step>/`.

  Keeps the newest `max_to_keep` checkpoints (None: all) and, beyond those, every step
  that is a multiple of `keep_every`. `read_only` opens a run that may still be training
  (e.g. to sample from it): nothing is saved, deleted or cleaned up.
  """

  def __init__(self, directory: str, max_to_keep: int | None = 3,
               keep_every: int | None = None, async_save: bool = True,
               read_only: bool = False):
    for name, value in (('max_to_keep', max_to_keep), ('keep_every', keep_every)):
      if value is not None and not (isinstance(value, int) and value >= 1):
        raise ValueError(f'{name} must be None or an integer >= 1, got {value!r}.')
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    policies = [checkpoint_managers.LatestN(n=max_to_keep)]
    if keep_every is not None:
      policies.append(checkpoint_managers.EveryNSteps(interval_steps=keep_every))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            read_only=read_only, create=not read_only,
            # A run killed mid-save leaves `<step>.orbax-checkpoint-tmp`: remove it on start,
            # so that the resumed run can save that step again. Never while reading: the
            # run being read may be writing it right now.
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
            preservation_policy=None if read_only else
            checkpoint_managers.AnyPreservationPolicy(policies)),
        item_names=('state', 'data'))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: dict[str, Any], step: int | None = None):
    """Starts saving `state` at `step` (default: `state.step`, which waits for it) and
    returns once the arrays are copied off the devices; `wait` for the write."""
    if self.read_only:
      raise ValueError(f'{self.directory} was opened read-only: cannot save.')
    json.dumps(data_state)  # fail here, not in the background writer
    step = int(jax.device_get(state.step)) if step is None else step
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, like: TrainState, step: int | None = None, shardings=None,
              set_aside: bool = False):
    """(state, data_state) at `step`, or at the newest step that can be read.

    `like`: a TrainState of arrays or ShapeDtypeStructs giving the structure, shapes and
    dtypes. Arrays are placed on `shardings` (a matching tree of `jax.sharding.Sharding`,
    or one for all) if given, else on each leaf's `.sharding`, else replicated over all
    devices; the mesh that saved them does not matter.

    A newest step that fails to restore (truncated or missing files, bad metadata) is
    skipped with a warning naming it; with `set_aside`, it is renamed
    `<step>.unrestorable` (kept, not deleted) so that training can write that step again.
    An explicit `step` has no fallback. Raises CheckpointError if nothing can be restored.
    """
    abstract = _abstract_state(like, shardings)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              data=ocp.args.JsonRestore())
    if step is not None:
      try:
        restored = self.manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f'Checkpoint step {step} under {self.directory} cannot be '
                              f'restored: {_one_line(e)}') from e
      return restored['state'], restored['data']
    candidates = self.steps()[::-1]
    if not candidates:
      raise CheckpointError(f'No checkpoint under {self.directory}.')
    failures = []
    for s in candidates:
      try:
        restored = self.manager.restore(s, args=args)
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f'step {s}: {_one_line(e)}')
        if s != candidates[-1]:
          logging.warning('Checkpoint step %d under %s cannot be restored (%s); trying the '
                          'one before.', s, self.directory, _one_line(e))
        continue
      if failures and set_aside:
        self._set_aside(candidates[:len(failures)])
      return restored['state'], restored['data']
    raise CheckpointError(f'No checkpoint under {self.directory} can be restored: '
                          + '; '.join(failures))

  def _set_aside(self, steps: Iterable[int]) -> None:
    if jax.process_index() == 0:
      for s in steps:
        path = os.path.join(self.directory, str(s))
        target, n = path + UNRESTORABLE_SUFFIX, 1
        while os.path.exists(target):
          target, n = f'{path}{UNRESTORABLE_SUFFIX}-{n}', n + 1
        os.rename(path, target)
        logging.warning('Moved unrestorable checkpoint %s to %s.', path, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('charred_checkpoints_set_aside')
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is written (and raises if one failed)."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _one_line(e: Exception, limit: int = 300) -> str:
  text = ' '.join(str(e).split())
  text = f'{type(e).__name__}: {text}'
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _abstract_state(like, shardings):
  """ShapeDtypeStructs of `like`, each carrying the sharding to restore onto."""
  default = None

  def leaf(x, sharding=None):
    nonlocal default
    sharding = sharding or getattr(x, 'sharding', None)
    if sharding is None:
      if default is None:
        mesh = jax.sharding.Mesh(jax.devices(), ('all',))
        default = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      sharding = default
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  if shardings is None:
    return jax.tree_util.tree_map(leaf, like)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: leaf(x, shardings), like)
  return jax.tree_util.tree_map(leaf, like, shardings)


class Preemption:
  """Notices a preemption (SIGTERM) between train steps.

  One process: a SIGTERM handler sets a flag, read once per step. Several processes: JAX's
  preemption sync point (jax.distributed's coordination service catches SIGTERM and agrees
  on a step), so that every process checkpoints the same step.
  """

  def __init__(self, ckpt: Checkpointer | None = None):
    self.ckpt = ckpt
    self.requested = False
    self._installed = False
    self._mode = 'jax' if jax.process_count() > 1 else 'signal'

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  @contextlib.contextmanager
  def handling(self) -> Iterator[None]:
    """The SIGTERM handler installed for the block (a SIGTERM during start-up, restore or
    compilation is then noticed at the first step). However the block ends, the previous
    handler comes back and the saves already started are written: at interpreter exit
    Orbax's writer could no longer finish them."""
    install = (self._mode == 'signal' and not self._installed and
               threading.current_thread() is threading.main_thread())
    previous = signal.signal(signal.SIGTERM, self._handle) if install else None
    self._installed |= install
    try:
      yield
    finally:
      if install:
        signal.signal(signal.SIGTERM, previous)
        self._installed = False
      if self.ckpt:
        self.ckpt.wait()

  def steps(self, steps: Iterable[int]) -> Iterator[int]:
    """`steps`, with the SIGTERM handler installed (see `handling`) while the loop runs."""
    with self.handling():
      yield from steps

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop. Every process must ask at every step."""
    if self._mode == 'signal':
      return self.requested
    if self._mode == 'jax':
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # no preemption service (jax_enable_preemption_service off)
        logging.warning('Preemptions will not be noticed: %s', e)
        self._mode = 'off'
    return False
