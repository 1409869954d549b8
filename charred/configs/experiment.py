"""What an experiment is: the configs that gin files bind, as plain dataclasses."""

from __future__ import annotations

import dataclasses

from charred.models.text_to_image import TextToImageConfig
from charred.trainers.evaluators import SampleEvalConfig, ValidationConfig
from charred.trainers.trainer import TrainConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which prepared TFDS typography config to train on, and where it lives."""
  builder_config: str = 'tiny'
  data_dir: str | None = None  # None: TFDS's default (~/tensorflow_datasets)
  seed: int = 0  # shuffling seed of the training stream


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: TextToImageConfig
  train: TrainConfig
  data: DataConfig = DataConfig()
  sample_eval: SampleEvalConfig = SampleEvalConfig()
  validation: ValidationConfig = ValidationConfig()
