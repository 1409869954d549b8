"""The three commands end to end, and what they do with bad input."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from charred.configs import runs
from conftest import REPO, micro_args, run_cli

pytestmark = pytest.mark.slow


def test_main_writes_config_checkpoints_samples_and_events(micro_run):
  files = os.listdir(micro_run)
  assert 'config.gin' in files
  assert any(f.startswith('events.out.tfevents') for f in files)
  assert sorted(os.listdir(os.path.join(micro_run, 'checkpoints')))[-1] == '20'
  assert os.path.exists(os.path.join(micro_run, 'samples', 'step_20.png'))
  with open(os.path.join(micro_run, 'config.gin')) as f:
    config = f.read()
  assert 'TRAIN_STEPS = 20' in config and 'BATCH_SIZE = 4' in config


def test_cache_encoder_needs_exactly_one_model_source(tmp_path):
  proc = run_cli('cache_encoder', f'--out={tmp_path / "cache"}', check=False)
  assert 'exactly one of --workdir or --gin_file' in _one_error_line(proc)
  assert not (tmp_path / 'cache').exists()


def test_entry_points_import_together():
  """A launcher (or a test, in one pytest worker) may import every command in one process:
  no flag is defined twice at import."""
  package = pathlib.Path(REPO) / 'charred'
  commands = sorted(
      '.'.join(path.relative_to(REPO).with_suffix('').parts)
      for path in package.rglob('*.py')
      if re.search(r"^if __name__ == ['\"]__main__['\"]:", path.read_text(), re.M))
  assert {'charred.main', 'charred.evaluate', 'charred.sample', 'charred.sweep',
          'charred.cache_encoder', 'charred.convert', 'charred.prepare', 'charred.curves',
          'charred.export', 'charred.subword', 'charred.datasets.prepare', 'charred.evaluation.curves',
          'charred.models.convert.__main__'} <= set(commands)
  proc = subprocess.run([sys.executable, '-c', f'import {", ".join(commands)}'],
                        capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-500:]


def test_load_pretrained_reads_a_run_without_its_gin_files(micro_run):
  import charred.models  # pylint: disable=import-outside-toplevel
  module, params = charred.models.load_pretrained(micro_run)
  run = runs.load_run(micro_run)  # the other path: gin config + the trainer's restore
  assert module.config == run.experiment.model
  want = jax.tree_util.tree_leaves_with_path(run.params)
  got = dict(jax.tree_util.tree_leaves_with_path(params))
  assert len(got) == len(want)
  for path, value in want:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value))


def test_sample_writes_png_of_the_model_size(micro_run, tmp_path):
  out = tmp_path / 'out.png'
  proc = run_cli('sample', f'--workdir={micro_run}', '--prompt=A sign that says "hello".',
                 f'--output={out}', '--steps=3', '--seed=1', '--guidance_scale=2')
  assert 'Wrote' in proc.stdout
  with Image.open(out) as image:
    assert image.size == (128, 32) and image.mode == 'RGB'


def test_evaluate_prints_one_json_line(micro_run, tmp_path):
  words = tmp_path / 'words.txt'
  words.write_text('hello\nWorld\n')
  proc = run_cli('evaluate', f'--workdir={micro_run}', f'--words_file={words}', '--steps=2')
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  result = json.loads(lines[-1])
  assert result['num_words'] == 2
  for key in ('exact_match', 'exact_match_ci', 'ned', 'ceiling/exact_match'):
    assert 0.0 <= result[key] <= 1.0
  # Every evaluator the experiment lists runs once, the validation loss included.
  assert result['validation/loss'] > 0 and result['steps'] == 2
  # No --guidance_scale: the scale the run's experiment declares in its gin file.
  with open(os.path.join(REPO, 'gin', 'experiments', 'typography_tiny.gin')) as f:
    declared = re.search(r'^\s+guidance_scale = ([0-9.]+)', f.read(), re.M).group(1)
  assert result['guidance_scale'] == float(declared)


def test_evaluate_quantized_to_int8(micro_run, tmp_path):
  words = tmp_path / 'words.txt'
  words.write_text('hello\n')
  proc = run_cli('evaluate', f'--workdir={micro_run}', f'--words_file={words}', '--steps=2',
                 '--quantize=int8')
  result = json.loads([l for l in proc.stdout.splitlines() if l.strip()][-1])
  assert result['quantize'] == 'int8' and result['num_words'] == 1
  assert 0.0 <= result['exact_match'] <= 1.0 and result['validation/loss'] > 0


def _one_error_line(proc):
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if ': error: ' in l]
  assert len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


@pytest.fixture
def precious_workdir(tmp_path):
  """A workdir holding files that a failed command must leave alone."""
  workdir = tmp_path / 'wd'
  workdir.mkdir()
  (workdir / 'config.gin').write_text('# an earlier run\n')
  (workdir / 'notes.txt').write_text('keep me')
  return workdir


def _unchanged(workdir):
  return (sorted(os.listdir(workdir)) == ['config.gin', 'notes.txt'] and
          (workdir / 'config.gin').read_text() == '# an earlier run\n' and
          (workdir / 'notes.txt').read_text() == 'keep me')


def test_unknown_gin_binding(precious_workdir, micro_data_dir):
  proc = run_cli('main', *micro_args(precious_workdir, micro_data_dir,
                                     '--gin.trainer.TrainConfig.no_such_option=3'), check=False)
  assert 'no_such_option' in _one_error_line(proc)
  assert _unchanged(precious_workdir)


def test_missing_gin_file(precious_workdir):
  proc = run_cli('main', '--gin_file=experiments/no_such_experiment.gin',
                 f'--workdir={precious_workdir}', check=False)
  assert 'no_such_experiment.gin' in _one_error_line(proc)
  assert _unchanged(precious_workdir)


def test_unwritable_workdir(tmp_path, micro_data_dir):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  proc = run_cli('main', *micro_args(blocker / 'wd', micro_data_dir), check=False)
  assert 'not writable' in _one_error_line(proc)
  assert blocker.read_text() == 'not a directory'


def test_prompt_longer_than_maximum(micro_run, tmp_path):
  out = tmp_path / 'out.png'
  proc = run_cli('sample', f'--workdir={micro_run}', '--prompt=' + 'x' * 200,
                 f'--output={out}', check=False)
  assert 'longer than' in _one_error_line(proc)
  assert not out.exists()


def test_resume_after_kill_9_and_sigterm_equals_uninterrupted_run(tmp_path, micro_data_dir):
  steps = ['--gin.TRAIN_STEPS=40', '--gin.CHECKPOINT_EVERY=20', '--gin.EVAL_EVERY=1000']
  straight = tmp_path / 'straight'
  run_cli('main', *micro_args(straight, micro_data_dir, *steps))

  killed = tmp_path / 'killed'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'charred.main', *micro_args(killed, micro_data_dir, *steps)],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Kill -9 as soon as the step-20 checkpoint is committed (Orbax renames it into place).
  deadline = time.time() + 500
  while not (killed / 'checkpoints' / '20').exists():
    assert proc.poll() is None and time.time() < deadline, 'run ended before checkpoint 20'
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / 'checkpoints' / '40').exists(), 'killed too late to test a resume'
  # The resumed run is preempted (SIGTERM) once it trains again: it checkpoints the step
  # it is at and exits with 143, so a scheduler knows to start it again.
  proc = subprocess.Popen(
      [sys.executable, '-m', 'charred.main', *micro_args(killed, micro_data_dir, *steps)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('Resumed from step 20'):
      break
  assert lines and lines[-1].startswith('Resumed from step 20'), ''.join(lines)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 143, ''.join(lines) + out
  assert 'on SIGTERM (preemption)' in out, out
  preempted = max(int(d) for d in os.listdir(killed / 'checkpoints') if d.isdigit())
  assert 20 < preempted < 40, out
  run_cli('main', *micro_args(killed, micro_data_dir, *steps))

  run_a, run_b = runs.load_run(str(straight)), runs.load_run(str(killed))
  a, b = run_a.state, run_b.state
  assert run_a.step == run_b.step == 40
  # The rendered signs' Grain iterator counts batches from the stream's start too.
  assert run_a.data_state == run_b.data_state == {'position': 40,
                                                  'iterator': {'next_index': 40}}
  for x, y in zip(jax.tree_util.tree_leaves((a.params, a.ema_params, a.opt_state)),
                  jax.tree_util.tree_leaves((b.params, b.ema_params, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
