"""What an experiment is: the configs that gin files bind, as plain dataclasses."""

from __future__ import annotations

import dataclasses

from charred.datasets.bucketing import BucketConfig
from charred.models.text_to_image import TextToImageConfig
from charred.trainers.evaluators import SampleEvalConfig, ValidationConfig
from charred.trainers.trainer import TrainConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the model trains on: a prepared TFDS typography config (the default), JPEG XL
  shards from `python -m charred.datasets.prepare` streamed in buckets, or an encoder
  cache. Validation and the text-rendering evaluator always read `builder_config`."""
  builder_config: str = 'tiny'
  data_dir: str | None = None  # None: TFDS's default (~/tensorflow_datasets)
  seed: int = 0  # shuffling seed of the training stream
  # A `python -m charred.datasets.encoder_cache` output: train on its cached text encoder
  # hidden states and VAE latents instead of encoding raw data every step (the text
  # encoder must be frozen; the cache must be written for this model). None: raw data.
  encoder_cache: str | None = None
  # A `python -m charred.datasets.prepare` output (e.g. LAION-HR or WiT as JPEG XL shards):
  # train on it in aspect-ratio x caption-length buckets; the trainer checkpoints the
  # bucketing iterator's state. None: the typography builder.
  shards: str | None = None
  buckets: BucketConfig = BucketConfig()

  def __post_init__(self):
    if self.shards and self.encoder_cache:
      raise ValueError('DataConfig: give shards or encoder_cache, not both.')


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: TextToImageConfig
  train: TrainConfig
  data: DataConfig = DataConfig()
  sample_eval: SampleEvalConfig = SampleEvalConfig()
  validation: ValidationConfig = ValidationConfig()
