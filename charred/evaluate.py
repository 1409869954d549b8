r"""Runs a trained run's evaluators once; prints one JSON line.

  python -m charred.evaluate --workdir=DIR [--words_file=F | --prompts_file=F] \
      [--split=validation|test] [--steps=50] [--guidance_scale=G] [--scheduler=ddim] \
      [--guidance_rescale=0.0] [--quantize=int8|int8_dynamic]

Builds the evaluators the run's experiment lists (`Experiment.evaluators`), as training
does, and runs each once on the checkpoint's EMA parameters. The text-rendering evaluator
samples `A sign that says "<word>".` for every held-out word of its split (or one word per
line of F, rendered as written there), reads each image with OCR and reports the metrics
of `charred.evaluation.text_metrics.score` (exact match, NED, character accuracy and error
rate, overall, per word length and per frequency bucket); under `ceiling/` the same
metrics for the target texts rendered as the run's training signs and read by the same
OCR: what a perfect model would score. Guidance defaults to the scale the run's
experiment declares (`SampleEvalConfig.guidance_scale`). The validation loss appears as
`validation/loss`. `--split=test` samples and scores the data's test split instead (the
realism-ladder configs hold out words, templates and a font face there that no choice
of settings has seen). `--quantize=int8` evaluates the model with int8 kernels in its text
encoder, U-Net and VAE (`charred.models.quantize`, weight-only; `int8_dynamic` also
quantises the activations), the validation loss included; the JSON line says which.

With --prompts_file, any prompts instead: each line of F is `<prompt><TAB><expected
text>` (blank lines and `#` lines aside; `charred.evaluation.prompts_file`), the expected
text being what OCR must read (it may hold several words; its frequency bucket is that of
its rarest word, as for the training phrases). A file that does not parse fails with its
line number before the run loads. Prompts longer than the model's text length, and
expected texts with a character the run's ground-truth fonts lack, are skipped: counted
as `num_skipped` (`num_skipped/too_long`, `num_skipped/no_glyph`) and summarised on
stderr; if all are, the command fails (exit 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags

from charred import sampling_flags as sf
from charred.configs import gin_utils

_WORDS_FILE = flags.DEFINE_string('words_file', None, 'One word per line (default: the '
                                  "run's validation words).")
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'Any prompts instead: lines '
                                    '"<prompt><TAB><expected text>".')
_SPLIT = flags.DEFINE_enum('split', None, ('validation', 'test'), 'Held-out split the '
                           "evaluators read (default: each evaluator's own).")
_BATCH = flags.DEFINE_integer('batch_size', 100, 'Prompts sampled at once.')
_SAMPLES = flags.DEFINE_string('samples_png', None, 'Also write a labelled grid here.')
_QUANTIZE = flags.DEFINE_enum('quantize', None, ('int8', 'int8_dynamic'), 'Evaluate with '
                              'int8 kernels: weight-only, or with int8 activations too.')

# --quantize -> charred.models.quantize mode.
QUANTIZE_MODES = {'int8': 'weight_only', 'int8_dynamic': 'dynamic'}


def read_words(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    words = [line.strip() for line in f if line.strip()]
  if not words:
    raise ValueError(f'{path} holds no words.')
  return words


class _NoWriter:
  """Evaluators report to a writer; here the JSON line is the report."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images


def words_targets(path: str):
  """RenderingTargets for the words of `path`, captioned as the training signs are."""
  from charred.datasets import render, words as words_lib  # pylint: disable=g-import-not-at-top
  from charred.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  return [evaluators.RenderingTarget(render.caption(t), t, words_lib.frequency_bucket(t.lower()))
          for t in read_words(path)]


def prompts_targets(pairs):
  """RenderingTargets for (prompt, expected text) pairs. A text of several words gets the
  bucket of its rarest word, as the training phrases do (`signs.phrase_bucket`); one
  word, its own (as `words_targets`)."""
  from charred.datasets import signs  # pylint: disable=g-import-not-at-top
  from charred.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  return [evaluators.RenderingTarget(prompt, text, signs.phrase_bucket(text.split()))
          for prompt, text in pairs]


def screen_prompts(pairs, experiment):
  """`prompts_file.screen` of the pairs against the run's model (its tokenizer and text
  length, as `ImageGenerator.tokenize` checks) and its ground-truth fonts."""
  from charred import tokenizer  # pylint: disable=g-import-not-at-top
  from charred.datasets import render, signs  # pylint: disable=g-import-not-at-top
  from charred.evaluation import prompts_file  # pylint: disable=g-import-not-at-top
  model = experiment.model
  # The fonts do not depend on the image size.
  fonts = signs.ground_truth_config(experiment.data.builder_config, 1, 1).fonts
  return prompts_file.screen(
      pairs, num_tokens=(model.text_tokenizer() or tokenizer).num_tokens,
      text_length=model.text_length,
      codepoints=prompts_file.drawable_codepoints([render.font_path(f) for f in fonts]))


def for_evaluate(config):
  """A text-rendering config as this command samples: every prompt, the flags' sampler
  (guidance: the config's unless --guidance_scale)."""
  return dataclasses.replace(
      config, **sf.generator_kwargs(config.guidance_scale), num_prompts=None,
      seed=sf.SEED.value, batch_size=_BATCH.value, attention_maps=0, ceiling=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from charred.configs import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from charred.configs import runs  # pylint: disable=g-import-not-at-top
  from charred.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  from charred.evaluation import grid  # pylint: disable=g-import-not-at-top
  from charred.evaluation import prompts_file  # pylint: disable=g-import-not-at-top
  from charred.models import schedulers  # pylint: disable=g-import-not-at-top
  from charred.models.generation import PromptTooLongError  # pylint: disable=g-import-not-at-top
  from charred.trainers.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  if not sf.WORKDIR.value:
    gin_utils.exit_with_error('charred.evaluate', ValueError('--workdir is required.'))
  if _WORDS_FILE.value and _PROMPTS_FILE.value:
    gin_utils.exit_with_error('charred.evaluate', ValueError(
        '--words_file and --prompts_file exclude each other: give one.'))
  start = time.time()
  result, rendering = {}, None
  try:
    schedulers.lookup(sf.SCHEDULER.value)  # a bad name fails before the run loads
    # So does a bad prompts file: nothing is sampled for half of one.
    pairs = _PROMPTS_FILE.value and prompts_file.read_prompts(_PROMPTS_FILE.value)
    run = runs.load_run(sf.WORKDIR.value, sf.CHECKPOINT_STEP.value)
    model, params = run.model, run.params
    if _QUANTIZE.value:
      model, params = model.quantized(params, QUANTIZE_MODES[_QUANTIZE.value])
      result['quantize'] = _QUANTIZE.value
    data = experiment_lib.eval_data(run.experiment)
    if _WORDS_FILE.value:
      words = words_targets(_WORDS_FILE.value)
      data = dataclasses.replace(data, targets=lambda split: words)
    if pairs:
      kept, skipped = screen_prompts(pairs, run.experiment)
      summary = prompts_file.skip_summary(skipped, len(pairs))
      if not kept:
        print(f'charred.evaluate: error: no prompt of {_PROMPTS_FILE.value} left to sample. '
              f'{summary}', file=sys.stderr)
        sys.exit(1)
      if len(kept) < len(pairs):
        print(summary, file=sys.stderr)
      targets = prompts_targets(kept)
      data = dataclasses.replace(data, targets=lambda split: targets)
      result.update(prompts_file.skip_counts(skipped))
    for name, config in run.experiment.evaluators.items():
      if isinstance(config, evaluators.SampleEvalConfig):
        config = for_evaluate(config)
      if _SPLIT.value:
        config = dataclasses.replace(config, split=_SPLIT.value)
      evaluator = evaluators.build(name, config, model, data, workdir=None)
      metrics = evaluator(run.step, params, _NoWriter())
      if isinstance(evaluator, evaluators.TextRenderingEvaluator):
        rendering = (evaluator, config)
        metrics = {k.removeprefix('eval/'): v for k, v in metrics.items()}
      result.update((k, v) for k, v in metrics.items() if not k.endswith('seconds'))
  except (PromptTooLongError, FileNotFoundError, ValueError, CheckpointError, ImportError) as e:
    gin_utils.exit_with_error('charred.evaluate', e)
  if rendering:
    evaluator, config = rendering
    if _SAMPLES.value:
      os.makedirs(os.path.dirname(os.path.abspath(_SAMPLES.value)), exist_ok=True)
      grid.save_png(_SAMPLES.value, evaluator.picture)
    result.update(steps=config.num_steps, guidance_scale=config.guidance_scale,
                  scheduler=config.scheduler, guidance_rescale=config.guidance_rescale)
  result.update(step=run.step, seconds=round(time.time() - start, 1))
  print(json.dumps(result, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
