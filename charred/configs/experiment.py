"""What an experiment is: the configs that gin files bind, as plain dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from charred.datasets.bucketing import BucketConfig
from charred.evaluation import evaluators
from charred.models import pretrained
from charred.models.diffusion_model import DiffusionModel, ObjectiveConfig
from charred.models.text_to_image import TextToImageConfig
from charred.trainers.trainer import TrainConfig


SOURCES = ('tfds', 'render')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the model trains on: a prepared TFDS typography config (the default), JPEG XL
  shards from `python -m charred.prepare` streamed in buckets, or an encoder
  cache. Validation and the text-rendering evaluator always read `builder_config`."""
  builder_config: str = 'tiny'
  # Where typography examples come from: 'tfds' (the prepared `typography/<builder_config>`
  # dataset through its SeqIO task) or 'render' (datasets/signs.py renders the plain-sign
  # configs on the fly: no TensorFlow, nothing prepared, the same examples).
  source: str = 'tfds'
  data_dir: str | None = None  # None: TFDS's default (~/tensorflow_datasets)
  seed: int = 0  # shuffling seed of the training stream
  # The rendered source's training mix (validation words never change): the share of
  # random letter strings among the training words (None: the config's), and a length
  # curriculum, the number of training images over which the longest word grows from
  # the shortest length to the longest, one letter at a time (0: none).
  train_random_fraction: float | None = None
  length_curriculum: int = 0
  # A `python -m charred.cache_encoder` output: train on its cached text encoder
  # hidden states and VAE latents instead of encoding raw data every step (the text
  # encoder must be frozen; the cache must be written for this model). A cache of JPEG XL
  # shards (`cache_encoder --shards=DIR`) is read in `buckets`, which must be the ones it
  # was written for. None: raw data.
  encoder_cache: str | None = None
  # A `python -m charred.prepare` output (e.g. LAION-HR or WiT as JPEG XL shards):
  # train on it in aspect-ratio x caption-length buckets; the trainer checkpoints the
  # bucketing iterator's state. None: the typography builder.
  shards: str | None = None
  buckets: BucketConfig = BucketConfig()

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f'DataConfig.source must be one of {SOURCES}, got {self.source!r}.')
    if self.source != 'render' and (self.train_random_fraction is not None or
                                    self.length_curriculum):
      raise ValueError("DataConfig.train_random_fraction and length_curriculum need "
                       "source='render' (the TFDS data is stored with its mix).")
    if not (isinstance(self.length_curriculum, int) and self.length_curriculum >= 0):
      raise ValueError(f'DataConfig.length_curriculum must be an integer >= 0 (training '
                       f'images), got {self.length_curriculum!r}.')
    if self.shards and self.encoder_cache:
      raise ValueError('DataConfig: give shards or encoder_cache, not both.')


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: TextToImageConfig
  train: TrainConfig
  objective: ObjectiveConfig = ObjectiveConfig()
  data: DataConfig = DataConfig()
  # What the weights start from: pretrained text encoder / U-Net, the latent space's VAE.
  init: pretrained.InitConfig = pretrained.InitConfig()
  # Name -> evaluator config; the config's type picks the evaluator, its `every` the
  # cadence and its `split` the data (charred.evaluation.evaluators).
  evaluators: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {
      'validation': evaluators.ValidationConfig(),
      'text_rendering': evaluators.SampleEvalConfig()})

  def __post_init__(self):
    evaluators.check(self.evaluators)
    if not self.model.pixel_space and not self.init.autoencoder:
      raise ValueError('A latent-space model (TextToImageConfig.pixel_space=False) needs '
                       'its VAE: set pretrained.InitConfig.autoencoder (in latent_tiny.gin: '
                       '--gin.AUTOENCODER="\'DIR\'").')


def build_codec(experiment: Experiment):
  """Pixels, or the frozen VAE of `init.autoencoder`: read once per process."""
  return pretrained.make_codec(experiment.model.pixel_space, experiment.init.autoencoder)


def build_model(experiment: Experiment, codec, empty_context=None) -> DiffusionModel:
  """The experiment's model with its objective and its (already built) codec."""
  return DiffusionModel(experiment.model, experiment.objective, codec, empty_context)


def eval_data(experiment: Experiment) -> evaluators.EvalData:
  """The held-out data the experiment's evaluators read: its typography splits."""
  data, model = experiment.data, experiment.model
  text_tokenizer = model.text_tokenizer()

  def batches(split: str, batch_size: int):
    return typography_batches(data, split, batch_size, model.text_length,
                              tokenizer=text_tokenizer, shuffle=False, repeat=False)

  def targets(split: str):
    return [evaluators.RenderingTarget(**t) for t in rendering_targets(data, split)]

  def ground_truth(texts, height: int, width: int, seed: int):
    from charred.datasets import signs  # pylint: disable=g-import-not-at-top
    return signs.render_ground_truth(
        texts, signs.ground_truth_config(data.builder_config, height, width), seed=seed)

  def layouts(texts, height: int, width: int, seed: int):
    from charred.datasets import signs  # pylint: disable=g-import-not-at-top
    return signs.ground_truth_boxes(
        texts, signs.ground_truth_config(data.builder_config, height, width), seed=seed)

  return evaluators.EvalData(batches, targets, experiment.train.batch_size, ground_truth,
                             layouts)


def prepare(data: DataConfig) -> None:
  """Generates the TFDS typography data if `data` reads it and it is not there yet."""
  if data.source == 'tfds':
    from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
    pipeline.prepare(data.builder_config, data.data_dir)


def typography_batches(data: DataConfig, split: str, batch_size: int, text_length: int,
                       tokenizer=None, **kwargs):
  """Batches of the typography examples of `split` from `data.source`; kwargs as
  `pipeline.make_iterator` (seed, start_batch, shuffle, repeat, shard_index, shard_count).
  The rendered source also gives `glyph_tokens` and takes a subword `tokenizer`."""
  if data.source == 'render':
    from charred.datasets import signs  # pylint: disable=g-import-not-at-top
    config = signs.get_config(data.builder_config)
    if data.train_random_fraction is not None:
      config = dataclasses.replace(config, words=dataclasses.replace(
          config.words, train_random_fraction=data.train_random_fraction))
    curriculum = data.length_curriculum if split == 'train' else 0
    return signs.make_iterator(config, split, batch_size, text_length, tokenizer=tokenizer,
                               length_curriculum=curriculum, **kwargs)
  if tokenizer is not None:
    raise ValueError("DataConfig.source='tfds' tokenises with ByT5's bytes only; use "
                     "source='render' for another tokenizer.")
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  task = pipeline.register_task(data.builder_config, data.data_dir)
  return pipeline.make_iterator(task, split, batch_size, text_length, data_dir=data.data_dir,
                                **kwargs)


def rendering_targets(data: DataConfig, split: str = 'validation') -> list[dict[str, str]]:
  """The held-out prompts (`prompt`, `text`, `bucket`) of `split`, in split order."""
  if data.source == 'render':
    from charred.datasets import signs  # pylint: disable=g-import-not-at-top
    return signs.rendering_targets(data.builder_config, split)
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.rendering_targets(data.builder_config, split, data.data_dir)
