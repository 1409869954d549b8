r"""Trains a charred model from gin files.

  python -m charred.main --gin_file=gin/experiments/typography_tiny.gin --workdir=DIR \
      [--gin_file=...] [--gin_bindings='NAME=VALUE'] [--gin.NAME=VALUE]

Writes DIR/config.gin (the operative config), DIR/checkpoints/, TensorBoard events,
and DIR/samples/step_<N>.png; resumes from the newest checkpoint in DIR.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import gin

from charred.configs import gin_utils
from charred.configs.experiment import Experiment

DEFAULT_GIN_FILE = 'experiments/typography_tiny.gin'
_GIN_FILES = flags.DEFINE_multi_string('gin_file', [DEFAULT_GIN_FILE],
                                       'Gin files (repeatable), found in . or the repo gin/.')
_GIN_BINDINGS = flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings (repeatable).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.')


def load_experiment(gin_files, gin_bindings=()) -> Experiment:
  """Parses gin and builds the bound `Experiment`."""
  gin_utils.parse(gin_files, gin_bindings)
  return gin.get_configurable(Experiment)()


def check_writable(workdir: str) -> None:
  """Fails early, before anything is written, if `workdir` cannot hold our files."""
  os.makedirs(workdir, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_test'):
    pass


def write_config(workdir: str) -> None:
  """Writes the operative gin config to workdir/config.gin, keeping a differing old one."""
  path = os.path.join(workdir, 'config.gin')
  text = gin.operative_config_str()
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return
    n = 1
    while os.path.exists(f'{path}.{n}'):
      n += 1
    os.replace(path, f'{path}.{n}')
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def run(workdir: str, experiment: Experiment) -> None:
  # The data layer (TensorFlow) is imported here, not by the trainer.
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  from charred.trainers import evaluators, trainer  # pylint: disable=g-import-not-at-top

  data, model, train = experiment.data, experiment.model, experiment.train
  pipeline.prepare(data.builder_config, data.data_dir)
  task = pipeline.register_task(data.builder_config, data.data_dir)

  def batches(start_batch: int):
    return pipeline.make_iterator(task, 'train', train.batch_size, model.text_length,
                                  seed=data.seed, start_batch=start_batch,
                                  data_dir=data.data_dir)

  targets = [evaluators.RenderingTarget(**t) for t in pipeline.rendering_targets(
      data.builder_config, 'validation', data.data_dir)]
  from charred.models.text_to_image import TextToImage  # pylint: disable=g-import-not-at-top
  evaluator = evaluators.TextRenderingEvaluator(TextToImage(model), targets, workdir,
                                                experiment.sample_eval)
  trainer.train(workdir, model, train, batches,
                evaluators={'text_rendering': (train.eval_every, evaluator)})


def main(argv):
  # Orbax narrates every save at INFO; keep the console to progress lines (-v 0 for all).
  if logging.get_verbosity() == logging.INFO and not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    gin_utils.exit_with_error('charred.main', ValueError('--workdir is required.'))
  try:
    experiment = load_experiment(_GIN_FILES.value, _GIN_BINDINGS.value)
  except (ValueError, OSError, TypeError, SyntaxError) as e:
    gin_utils.exit_with_error('charred.main', e)
  try:
    check_writable(_WORKDIR.value)
  except OSError as e:
    gin_utils.exit_with_error('charred.main', OSError(
        f'workdir {_WORKDIR.value!r} is not writable: {e.strerror or e}'))
  write_config(_WORKDIR.value)
  run(_WORKDIR.value, experiment)


if __name__ == '__main__':
  sys.argv = gin_utils.rewrite_gin_shorthand(sys.argv)
  app.run(main)
