"""Learning curves: the batch size from an operative config.gin, points from a workdir's
metrics.jsonl or a training log, the plot, and `python -m charred.curves`."""
import json
import os

import pytest

from charred.evaluation import curves
from conftest import run_cli


def _workdir(tmp_path, config_text, rows):
  os.makedirs(tmp_path / 'samples')
  (tmp_path / 'config.gin').write_text(config_text)
  with open(tmp_path / 'samples' / 'metrics.jsonl', 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return str(tmp_path)


@pytest.mark.parametrize('config_text', [
    'BATCH_SIZE = 16\ntrainer.TrainConfig.batch_size = %BATCH_SIZE\n',  # operative config
    'trainer.TrainConfig:\n  train_steps = 3\n  batch_size = 16\n',
])
def test_batch_size_from_a_literal_or_a_macro(tmp_path, config_text):
  assert curves.batch_size(_workdir(tmp_path, config_text, [])) == 16


def test_batch_size_missing_is_one_line(tmp_path):
  with pytest.raises(ValueError, match='binds no TrainConfig.batch_size'):
    curves.batch_size(_workdir(tmp_path, 'trainer.TrainConfig.batch_size = %NOWHERE\n', []))


def test_curves_from_metrics_and_logs_and_the_plot(tmp_path):
  run = _workdir(tmp_path / 'run', 'BATCH_SIZE = 8\n', [
      {'step': 100, 'exact_match_ci': 0.25}, {'step': 200, 'other': 1.0},
      {'step': 300, 'exact_match_ci': 0.5}])
  assert curves.read_curve(run, 'exact_match_ci') == [(100, 0.25), (300, 0.5)]
  log = tmp_path / 'train.log'
  log.write_text('step 5/10 | loss 1.0\n'
                 'eval text_rendering @ 10: exact_match 0.000, exact_match_ci 0.125, ned 0.5\n')
  assert curves.read_curve(str(log), 'exact_match_ci') == [(10, 0.125)]
  out = tmp_path / 'curves.png'
  curves.plot({'bytes': [(800, 0.25), (2400, 0.5)], 'subword': [(800, 0.0)]},
              'exact_match_ci', str(out))
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('command', ['curves', 'evaluation.curves'])
def test_the_command_and_its_alias_draw_a_log(tmp_path, command):
  log = tmp_path / 'train.log'
  log.write_text('eval text_rendering @ 10: exact_match 0.000, exact_match_ci 0.125\n'
                 'eval text_rendering @ 20: exact_match 0.000, exact_match_ci 0.25\n')
  out = tmp_path / 'curves.png'
  proc = run_cli(command, f'--run=bytes={log}@4', f'--output={out}', timeout=120)
  assert proc.stdout.strip() == f'Wrote {out}'
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
