r"""Scores a trained run's text rendering with OCR; prints one JSON line.

  python -m charred.evaluate --workdir=DIR [--words_file=F] [--steps=50] \
      [--guidance_scale=G] [--scheduler=ddim] [--guidance_rescale=0.0]

Samples `A sign that says "<word>".` for every held-out word (the run's validation words,
or one word per line of F, rendered as written there), reads each image with OCR and
reports the metrics of `charred.evaluation.text_metrics.score` (exact match, NED,
character accuracy and error rate, overall, per word length and per frequency bucket).
Under `ceiling/` it adds the same metrics for the target texts rendered as the run's
training signs and read by the same OCR: what a perfect model would score. Guidance
defaults to the scale the run's experiment declares (`SampleEvalConfig.guidance_scale`).
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags

from charred.configs import gin_utils
from charred.configs import sampling_flags as sf

_WORDS_FILE = flags.DEFINE_string('words_file', None, 'One word per line (default: the '
                                  "run's validation words).")
_BATCH = flags.DEFINE_integer('batch_size', 100, 'Prompts sampled at once.')
_SAMPLES = flags.DEFINE_string('samples_png', None, 'Also write a labelled grid here.')


def read_words(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    words = [line.strip() for line in f if line.strip()]
  if not words:
    raise ValueError(f'{path} holds no words.')
  return words


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from charred.configs import runs  # pylint: disable=g-import-not-at-top
  from charred.datasets import signs  # pylint: disable=g-import-not-at-top
  from charred.evaluation import grid, text_metrics  # pylint: disable=g-import-not-at-top
  from charred.evaluation.ocr import OcrReader  # pylint: disable=g-import-not-at-top
  from charred.models import schedulers  # pylint: disable=g-import-not-at-top
  from charred.models.generation import PromptTooLongError  # pylint: disable=g-import-not-at-top
  from charred.trainers import evaluators  # pylint: disable=g-import-not-at-top
  if not sf.WORKDIR.value:
    gin_utils.exit_with_error('charred.evaluate', ValueError('--workdir is required.'))
  start = time.time()
  try:
    schedulers.lookup(sf.SCHEDULER.value)  # a bad name fails before the run loads
    run = runs.load_run(sf.WORKDIR.value, sf.CHECKPOINT_STEP.value)
    if _WORDS_FILE.value:
      from charred.datasets import render, words as words_lib  # pylint: disable=g-import-not-at-top
      texts = read_words(_WORDS_FILE.value)
      buckets = [words_lib.frequency_bucket(t.lower()) for t in texts]
      prompts = [render.caption(t) for t in texts]
    else:
      from charred.configs import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
      targets = experiment_lib.rendering_targets(run.experiment.data, 'validation')
      prompts = [t['prompt'] for t in targets]
      texts = [t['text'] for t in targets]
      buckets = [t['bucket'] for t in targets]
    generator = run.model.generator(run.params,
                               **sf.generator_kwargs(run.experiment.sample_eval.guidance_scale))
    images = generator(prompts, seed=sf.SEED.value, batch_size=_BATCH.value)
  except (PromptTooLongError, FileNotFoundError, ValueError) as e:
    gin_utils.exit_with_error('charred.evaluate', e)
  ocr = OcrReader()
  result, labels = evaluators.read_and_score(ocr, images, texts, buckets)
  # The OCR misreads some perfect signs too: the ceiling says how much of the
  # model's score is lost to OCR rather than to spelling.
  truth = signs.render_ground_truth(
      texts, signs.ground_truth_config(run.experiment.data.builder_config, *images.shape[1:3]),
      seed=sf.SEED.value)
  ceiling = text_metrics.score(ocr.read(truth), texts, buckets=buckets)
  result.update({f'ceiling/{k}': v for k, v in ceiling.items()})
  if _SAMPLES.value:
    os.makedirs(os.path.dirname(os.path.abspath(_SAMPLES.value)), exist_ok=True)
    grid.save_png(_SAMPLES.value, grid.make_grid(images, labels))
  result.update(step=run.step, steps=sf.STEPS.value, guidance_scale=generator.guidance_scale,
                scheduler=sf.SCHEDULER.value, guidance_rescale=sf.GUIDANCE_RESCALE.value,
                seconds=round(time.time() - start, 1))
  print(json.dumps(result, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
