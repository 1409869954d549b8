"""Evaluators and their registry: validation loss, and held-out prompts read with OCR.

An experiment lists its evaluators by name, each as its config (`Experiment.evaluators`,
e.g. {'validation': ValidationConfig(every=250), 'text_rendering': SampleEvalConfig()});
the config's type picks the evaluator (`build`, in the manner of big_vision's
evaluators/common.py), and its `every` and `split` give its cadence and data. Training
wraps each in a `PeriodicEvaluator` (`periodic`); `charred.evaluate` builds the same ones
and runs them once.

An evaluator is `fn(step, params, writer) -> {name: value}`, called with the EMA params;
it writes its own summaries. `PeriodicEvaluator` builds one on first use, so an evaluator
that never runs costs nothing. Evaluators use their own RNGs and never touch training.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from charred import tokenizer
from charred.evaluation import attention_maps, grid, text_metrics
from charred.evaluation.ocr import OcrReader
from charred.models.diffusion_model import DiffusionModel

Evaluator = Callable[[int, Any, Any], Mapping[str, float]]


class PeriodicEvaluator:
  """An evaluator on its own cadence, in the manner of clu's `PeriodicCallback`.

  Call it after every train step: it runs every `every` steps and at the last step
  (`every` 0: never), building the evaluator with `build()` the first time it runs.
  Returns the evaluator's metrics, or None when it did not run.
  """

  def __init__(self, name: str, every: int, build: Callable[[], Evaluator]):
    if not isinstance(every, int) or every < 0:
      raise ValueError(f'Evaluator {name!r}: every must be an integer >= 0 (0: never), '
                       f'got {every!r}.')
    self.name, self.every, self._build = name, every, build
    self._evaluate = None

  def __call__(self, step: int, *, params, writer, last: bool = False):
    if not self.every or (step % self.every and not last):
      return None
    if self._evaluate is None:
      self._evaluate = self._build()
    return self._evaluate(step, params, writer)


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
  every: int = 0  # steps between validation losses; 0: never
  num_batches: int = 4  # the first N batches of `split`, the same each time
  seed: int = 0  # fixes captions' timesteps and noise: losses compare across steps
  split: str = 'validation'

  def __post_init__(self):
    if self.num_batches < 1:
      raise ValueError(f'ValidationConfig.num_batches must be >= 1, got {self.num_batches}.')


class ValidationLossEvaluator:
  """The training loss on fixed held-out batches, with fixed timesteps and noise.

  Captions are never dropped (the conditional model is what is evaluated), so from one
  step to the next only the parameters change. Writes `validation/loss`.
  """

  def __init__(self, model: DiffusionModel, batches: Iterable[Mapping[str, Any]],
               config: ValidationConfig = ValidationConfig()):
    # What the conditional model reads: a box-conditioned one also its boxes.
    keys = ('image', 'text_tokens', 'text_mask', 'text_box')
    self.batches = [{k: np.asarray(b[k]) for k in keys if k in b}
                    for b in itertools.islice(batches, config.num_batches)]
    if not self.batches:
      raise ValueError('ValidationLossEvaluator: the validation batches are empty.')
    self.config = config
    # The diffusion loss alone: comparable across runs with and without glyph losses.
    model = model.replace(objective=model.objective.diffusion_only())

    def loss(params, batch, rng):
      return model.loss_fn(params, batch, jax.random.split(rng)[1])[0]

    self._loss = jax.jit(loss)

  def __call__(self, step: int, params, writer) -> dict[str, float]:
    start = time.time()
    rng = jax.random.PRNGKey(self.config.seed)
    losses = [self._loss(params, batch, jax.random.fold_in(rng, i))
              for i, batch in enumerate(self.batches)]
    sizes = [len(b['image']) for b in self.batches]
    metrics = {'validation/loss': float(np.average(np.asarray(losses), weights=sizes)),
               'validation/seconds': time.time() - start}
    writer.write_scalars(step, metrics)
    return metrics


@dataclasses.dataclass(frozen=True)
class SampleEvalConfig:
  """The text-rendering evaluator; also how `charred.sample` and `charred.evaluate`
  sample a run unless told otherwise."""
  every: int = 1000  # steps between evaluations; 0: never
  num_prompts: int | None = 32  # first N prompts of `split`, a fixed grid; None: all
  num_steps: int = 50
  guidance_scale: float = 3.0
  scheduler: str = 'ddim'  # a name in schedulers.SCHEDULERS
  guidance_rescale: float = 0.0
  seed: int = 0
  split: str = 'validation'
  batch_size: int | None = None  # prompts sampled at once; None: all
  # Per-letter cross-attention heat maps of the first N samples (0: none), taken with the
  # sample noised to `attention_timestep` (None: half the training timesteps).
  attention_maps: int = 4
  attention_timestep: int | None = None
  # Also score ground-truth renders of the same texts with the same OCR (`ceiling/...`):
  # what a perfect model would read, so OCR misses are not counted as misspellings.
  ceiling: bool = False

  def __post_init__(self):
    if not isinstance(self.every, int) or self.every < 0:
      raise ValueError(f'SampleEvalConfig.every must be an integer >= 0, got {self.every!r}.')
    if self.num_prompts is not None and self.num_prompts < 1:
      raise ValueError(f'SampleEvalConfig.num_prompts must be None or >= 1, got '
                       f'{self.num_prompts}.')


@dataclasses.dataclass(frozen=True)
class RenderingTarget:
  """A held-out prompt and the text an OCR engine should read in its image; `box`
  (x0, y0, x1, y1 pixels), where the data drew that text, is what a box-conditioned
  model is told."""
  prompt: str
  text: str
  bucket: str = ''
  box: tuple[int, int, int, int] | None = None


def read_and_score(ocr: OcrReader, images, texts: Sequence[str], buckets: Sequence[str]):
  """OCR the images: (text_metrics.score of the readings, a '✓ target → read' label each)."""
  read = ocr.read(images)
  return (text_metrics.score(read, texts, buckets=buckets),
          [grid.ocr_label(t, r) for t, r in zip(texts, read)])


def target_boxes(targets: Sequence[RenderingTarget], image_size: tuple[int, int], seed: int,
                 layouts: Callable[..., np.ndarray] | None = None) -> np.ndarray:
  """int32 [N, 4]: each target's box; where a target has none, where the data would draw
  its text (`layouts`, seeded as the ceiling's renders, so those show it in that box)."""
  boxes = [t.box for t in targets]
  missing = [i for i, b in enumerate(boxes) if b is None]
  if missing:
    if layouts is None:
      raise ValueError(f'A box-conditioned model needs a box for every prompt; {len(missing)} '
                       f'have none (e.g. {targets[missing[0]].prompt!r}) and the data draws '
                       'no layouts.')
    drawn = layouts([t.text for t in targets], *image_size, seed)
    boxes = [drawn[i] if b is None else b for i, b in enumerate(boxes)]
  return np.array(boxes, np.int32).reshape(-1, 4)


class TextRenderingEvaluator:
  """Samples a fixed grid of held-out prompts and scores them with OCR.

  With a `sample_dir`, writes `step_<N>.png` there (each tile labelled `target -> read`),
  the per-letter cross-attention maps of the first few, `attention_step_<N>.png`, and a
  line of `metrics.jsonl` per evaluation; always image and scalar summaries to `writer`.
  The last grid stays in `picture`. It uses its own RNG, so it never changes training.
  `ground_truth(texts, height, width, seed)`: renders of the texts as the data draws
  them, for `config.ceiling`.
  """

  def __init__(self, model: DiffusionModel, targets: Sequence[RenderingTarget],
               sample_dir: str | None, config: SampleEvalConfig, ocr: OcrReader | None = None,
               ground_truth: Callable[..., np.ndarray] | None = None,
               layouts: Callable[..., np.ndarray] | None = None):
    self.targets = list(targets)[:config.num_prompts]
    if not self.targets:
      raise ValueError('TextRenderingEvaluator: no prompts to sample.')
    if config.ceiling and ground_truth is None:
      raise ValueError('SampleEvalConfig.ceiling needs the data\'s ground-truth renders.')
    self.config = config
    self.sample_dir = sample_dir
    self.generator = model.generator(
        None, num_steps=config.num_steps, guidance_scale=config.guidance_scale,
        scheduler=config.scheduler, guidance_rescale=config.guidance_rescale)
    self.ocr = ocr or OcrReader()
    self.ground_truth = ground_truth
    self.picture = None
    self.boxes = None
    if model.config.box_conditioning:
      self.boxes = target_boxes(self.targets, model.config.image_size, config.seed, layouts)

  def attention_picture(self, params, images: np.ndarray) -> np.ndarray:
    """The per-letter cross-attention rows (attention_maps.letter_rows) of `images`,
    samples of the first targets' prompts, side by side."""
    model, codec = self.generator.model, self.generator.codec
    targets = self.targets[:len(images)]
    tokens, mask = self.generator.tokenize([t.prompt for t in targets])
    timestep = self.config.attention_timestep
    if timestep is None:
      timestep = model.config.noise_schedule.num_train_timesteps // 2
    rng = jax.random.PRNGKey(self.config.seed)
    x0 = codec.encode(images.astype(np.float32) / 127.5 - 1.0)  # the mean, for a VAE
    maps = np.asarray(attention_maps.cross_attention_maps(
        model, params, x0, tokens, mask, timestep, jax.random.fold_in(rng, 1),
        None if self.boxes is None else self.boxes[:len(images)]))
    text_tokenizer = model.config.text_tokenizer() or tokenizer
    pictures = []
    for image, target, m in zip(images, targets, maps):
      start = target.prompt.find(target.text)
      of_char = text_tokenizer.token_of_char(target.prompt)
      letters = [int(of_char[start + k]) if start >= 0 else -1 for k in range(len(target.text))]
      pictures.append(attention_maps.letter_rows(image, m, target.text, letters))
    return attention_maps.attention_figure(pictures)

  def __call__(self, step: int, params, writer) -> dict[str, float]:
    start = time.time()
    self.generator.params = params
    texts, buckets = [t.text for t in self.targets], [t.bucket for t in self.targets]
    images = self.generator([t.prompt for t in self.targets], seed=self.config.seed,
                            batch_size=self.config.batch_size or len(self.targets),
                            boxes=self.boxes)
    scores, labels = read_and_score(self.ocr, images, texts, buckets)
    if self.config.ceiling:
      # The OCR misreads some perfect signs too: the ceiling says how much of the
      # model's score is lost to OCR rather than to spelling.
      truth = self.ground_truth(texts, *images.shape[1:3], self.config.seed)
      ceiling = text_metrics.score(self.ocr.read(truth), texts, buckets=buckets)
      scores.update({f'ceiling/{k}': v for k, v in ceiling.items()})
    self.picture = grid.make_grid(images, labels)
    writer.write_images(step, {'samples': self.picture[None]})
    maps = None
    if self.config.attention_maps:
      maps = self.attention_picture(params, images[:self.config.attention_maps])
      writer.write_images(step, {'cross_attention': maps[None]})
    # Counts (num_words) stay integers; rates become floats.
    metrics = {f'eval/{k}': int(v) if isinstance(v, (int, np.integer)) else float(v)
               for k, v in scores.items()}
    metrics['eval/seconds'] = time.time() - start
    writer.write_scalars(step, metrics)
    if self.sample_dir:
      os.makedirs(self.sample_dir, exist_ok=True)
      grid.save_png(os.path.join(self.sample_dir, f'step_{step}.png'), self.picture)
      if maps is not None:
        grid.save_png(os.path.join(self.sample_dir, f'attention_step_{step}.png'), maps)
      # One JSON line per evaluation: `python -m charred.curves` plots it (no TensorBoard).
      with open(os.path.join(self.sample_dir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
        f.write(json.dumps({'step': step, **{k: float(v) for k, v in scores.items()}}) + '\n')
    return metrics


# The registry: what each evaluator reads, and how its config builds it.


@dataclasses.dataclass(frozen=True)
class EvalData:
  """The experiment's held-out data, as evaluators read it.

  `batches(split, batch_size)`: that split's batches in a fixed order, once through;
  `targets(split)`: its `RenderingTarget`s in order; `ground_truth(texts, height, width,
  seed)`: uint8 renders of the texts as the data draws them (None: not available);
  `layouts(texts, height, width, seed)`: int [N, 4], the box of each text in those renders
  (where the data would draw it: a box-conditioned model's box for a target without one).
  """
  batches: Callable[[str, int], Iterable[Mapping[str, Any]]]
  targets: Callable[[str], Sequence[RenderingTarget]]
  batch_size: int
  ground_truth: Callable[..., np.ndarray] | None = None
  layouts: Callable[..., np.ndarray] | None = None


_BUILDERS: dict[type, Callable[..., Evaluator]] = {}


def register(config_type: type):
  """Makes `fn(config, model, data, workdir) -> evaluator` build `config_type`'s evaluator."""
  def decorate(fn):
    _BUILDERS[config_type] = fn
    return fn
  return decorate


@register(ValidationConfig)
def _validation(config: ValidationConfig, model, data: EvalData, workdir):
  del workdir
  return ValidationLossEvaluator(model, data.batches(config.split, data.batch_size), config)


@register(SampleEvalConfig)
def _text_rendering(config: SampleEvalConfig, model, data: EvalData, workdir):
  return TextRenderingEvaluator(model, data.targets(config.split),
                                workdir and os.path.join(workdir, 'samples'), config,
                                ground_truth=data.ground_truth, layouts=data.layouts)


def check(configs: Mapping[str, Any]) -> None:
  """Fails with one line on a name that is not a string or a config no evaluator takes."""
  if not isinstance(configs, Mapping):
    raise ValueError(f'Evaluators must be a dict of name -> evaluator config, got '
                     f'{type(configs).__name__}.')
  for name, config in configs.items():
    if not isinstance(name, str) or not name:
      raise ValueError(f'Evaluator names must be non-empty strings, got {name!r}.')
    if type(config) not in _BUILDERS:
      known = ', '.join(sorted(t.__name__ for t in _BUILDERS))
      raise ValueError(f'Evaluator {name!r}: {type(config).__name__} is not an evaluator '
                       f'config; expected one of {known}.')


def build(name: str, config, model: DiffusionModel, data: EvalData,
          workdir: str | None) -> Evaluator:
  """The evaluator `config` describes; `workdir` None: it writes no files."""
  check({name: config})
  return _BUILDERS[type(config)](config, model, data, workdir)


def periodic(configs: Mapping[str, Any], model: DiffusionModel, data: EvalData,
             workdir: str) -> list[PeriodicEvaluator]:
  """The experiment's evaluators, each on its own cadence (`config.every`) and built on
  first use. Unknown configs fail here, before training starts."""
  check(configs)
  return [PeriodicEvaluator(name, config.every,
                            functools.partial(build, name, config, model, data, workdir))
          for name, config in configs.items()]


def sampling_config(configs: Mapping[str, Any]) -> SampleEvalConfig:
  """The first text-rendering evaluator's config (how a run samples), or the default."""
  return next((c for c in configs.values() if isinstance(c, SampleEvalConfig)),
              SampleEvalConfig())
