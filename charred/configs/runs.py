"""A finished or running training run, rebuilt from its workdir."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import gin

from charred.configs import gin_utils
from charred.configs.experiment import Experiment, build_codec, build_model
from charred.models.diffusion_model import DiffusionModel
from charred.trainers import checkpoints, trainer


@dataclasses.dataclass
class Run:
  experiment: Experiment
  model: DiffusionModel  # with its codec (pixels, or the frozen VAE: built once per run)
  state: trainer.TrainState
  data_state: dict[str, Any]

  @property
  def params(self):
    """The EMA parameters: what sampling uses."""
    return self.state.ema_params

  @property
  def step(self) -> int:
    return int(self.state.step)


def load_run(workdir: str, step: int | None = None) -> Run:
  """Parses workdir/config.gin and restores the train state of `step` (default: newest)."""
  config = os.path.join(workdir, 'config.gin')
  if not os.path.exists(config):
    raise FileNotFoundError(f'{config} not found: is {workdir!r} a charred workdir?')
  gin.clear_config()
  gin_utils.parse([config])
  experiment = gin.get_configurable(Experiment)()
  # Read-only: the run may still be training (and writing a checkpoint right now).
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint under {workdir}/checkpoints.')
  model = build_model(experiment, build_codec(experiment))
  tx = trainer.make_tx(experiment.train, model.frozen)
  state, data_state = ckpt.restore(trainer.abstract_state(model, experiment.train, tx), step)
  ckpt.close()
  return Run(experiment, model, state, data_state)
