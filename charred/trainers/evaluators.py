"""Periodic evaluators: validation loss, and samples of held-out prompts read with OCR.

An evaluator is `fn(step, params, writer) -> {name: value}`, called with the EMA params;
it writes its own summaries. `PeriodicEvaluator` gives one its cadence and builds it on
first use, so an evaluator that never runs costs nothing (big_vision's lazy evaluators).
Evaluators use their own RNGs and never touch the training state.
"""

from __future__ import annotations

import dataclasses
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
  num_batches: int = 4  # the first N batches of the validation split, the same each time
  seed: int = 0  # fixes captions' timesteps and noise: losses compare across steps

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
    keys = ('image', 'text_tokens', 'text_mask')
    self.batches = [{k: np.asarray(b[k]) for k in keys}
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
  num_prompts: int = 32  # first N held-out words, a fixed grid across the run
  num_steps: int = 50  # DDIM steps
  guidance_scale: float = 3.0
  seed: int = 0
  # Per-letter cross-attention heat maps of the first N samples (0: none), taken with the
  # sample noised to `attention_timestep` (None: half the training timesteps).
  attention_maps: int = 4
  attention_timestep: int | None = None


@dataclasses.dataclass(frozen=True)
class RenderingTarget:
  """A held-out prompt and the text an OCR engine should read in its image."""
  prompt: str
  text: str
  bucket: str = ''


def read_and_score(ocr: OcrReader, images, texts: Sequence[str], buckets: Sequence[str]):
  """OCR the images: (text_metrics.score of the readings, a '✓ target → read' label each)."""
  read = ocr.read(images)
  return (text_metrics.score(read, texts, buckets=buckets),
          [grid.ocr_label(t, r) for t, r in zip(texts, read)])


class TextRenderingEvaluator:
  """Samples a fixed grid of held-out prompts and scores them with OCR.

  Writes `workdir/samples/step_<N>.png` (each tile labelled `target -> read`), the
  per-letter cross-attention maps of the first few, `attention_step_<N>.png`, a line of
  `samples/metrics.jsonl` per evaluation, and image and scalar summaries. It uses its own
  RNG, so it never changes training.
  """

  def __init__(self, model: DiffusionModel, targets: Sequence[RenderingTarget], workdir: str,
               config: SampleEvalConfig, ocr: OcrReader | None = None):
    self.targets = list(targets)[:config.num_prompts]
    self.config = config
    self.sample_dir = os.path.join(workdir, 'samples')
    self.generator = model.generator(None, num_steps=config.num_steps,
                                     guidance_scale=config.guidance_scale)
    self.ocr = ocr or OcrReader()

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
        model, params, x0, tokens, mask, timestep, jax.random.fold_in(rng, 1)))
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
    images = self.generator([t.prompt for t in self.targets], seed=self.config.seed,
                            batch_size=len(self.targets))
    scores, labels = read_and_score(self.ocr, images, [t.text for t in self.targets],
                                    [t.bucket for t in self.targets])
    picture = grid.make_grid(images, labels)
    os.makedirs(self.sample_dir, exist_ok=True)
    grid.save_png(os.path.join(self.sample_dir, f'step_{step}.png'), picture)
    writer.write_images(step, {'samples': picture[None]})
    if self.config.attention_maps:
      maps = self.attention_picture(params, images[:self.config.attention_maps])
      grid.save_png(os.path.join(self.sample_dir, f'attention_step_{step}.png'), maps)
      writer.write_images(step, {'cross_attention': maps[None]})
    metrics = {f'eval/{k}': float(v) for k, v in scores.items()}
    metrics['eval/seconds'] = time.time() - start
    writer.write_scalars(step, metrics)
    # One JSON line per evaluation: learning curves without TensorBoard (curves.py).
    with open(os.path.join(self.sample_dir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': step, **{k: float(v) for k, v in scores.items()}}) + '\n')
    return metrics

