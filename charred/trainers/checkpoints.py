"""Orbax checkpoints of the train state and the data iterator's position."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from charred.trainers.train_state import TrainState


class Checkpointer:
  """Saves `TrainState` plus a JSON data-iterator state under `directory/<step>/`."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        # A run killed mid-save leaves a *.orbax-checkpoint-tmp directory: remove it on
        # start, so that the resumed run can save that step again.
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True),
        item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: dict[str, Any]) -> None:
    step = int(jax.device_get(state.step))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, like: TrainState, step: int | None = None):
    """(state, data_state) at `step` (default: newest), shaped like `like`."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
