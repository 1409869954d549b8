"""Shared fixtures: the micro dataset and a trained micro run, built once per worker."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_GIN = 'experiments/typography_micro.gin'


def repeated_batches(make_batch):
  """A trainer.BatchesFn whose iterator yields make_batch() forever, checkpointable as the
  trainer needs (state: the batch count)."""
  import itertools  # pylint: disable=g-import-not-at-top
  from charred.datasets import streams  # pylint: disable=g-import-not-at-top
  return lambda: streams.RestartableIterator(
      lambda start: (make_batch() for _ in itertools.count()))


def run_cli(module, *args, timeout=600, check=True, env=None):
  """Runs `python -m charred.<module> args...` from the repo root (`env`: extra variables)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env or {}))
  proc = subprocess.run([sys.executable, '-m', f'charred.{module}', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=env)
  if check and proc.returncode != 0:
    raise AssertionError(f'charred.{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return proc


def micro_args(workdir, data_dir, *extra):
  return [f'--gin_file={MICRO_GIN}', f'--workdir={workdir}',
          f"--gin.experiment.DataConfig.data_dir='{data_dir}'", *extra]


@pytest.fixture(scope='session')
def micro_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def micro_run(tmp_path_factory, micro_data_dir):
  """A workdir trained by `charred.main` on typography_micro (20 steps)."""
  workdir = str(tmp_path_factory.mktemp('micro_run'))
  run_cli('main', *micro_args(workdir, micro_data_dir))
  return workdir
