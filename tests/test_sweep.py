"""charred.sweep: validation before anything runs, trials as subprocesses, results, reruns.

Only the first test trains for real; the others run `charred.sweep` with stub train and
evaluate commands (scripts written below), the sweep's real gin validation included.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

from charred import sweep
from conftest import MICRO_GIN, REPO

STUB_TRAIN = r'''
import json, os, sys
args = sys.argv[1:]
workdir = [a.split('=', 1)[1] for a in args if a.startswith('--workdir=')][0]
bindings = [a.split('=', 1)[1] for a in args if a.startswith('--gin_bindings=')]
with open(os.path.join(os.path.dirname(workdir), 'invocations.txt'), 'a') as f:
  f.write(os.path.basename(workdir) + '\n')
print('step 2/2 | loss 0.5')
fail = os.environ.get('STUB_FAIL')
if fail and any(fail in b for b in bindings):
  print('Traceback (most recent call last):', file=sys.stderr)
  print('ValueError: stub trainer rejects ' + fail, file=sys.stderr)
  sys.exit(3)
with open(os.path.join(workdir, 'stub_bindings.json'), 'w') as f:
  json.dump(bindings, f)
'''

# Metrics from the trial's learning rate, so each row's numbers are its own.
STUB_EVALUATE = r'''
import json, os, sys
workdir = [a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--workdir=')][0]
with open(os.path.join(workdir, 'stub_bindings.json')) as f:
  lr = [float(b.split('=')[1]) for b in json.load(f) if 'learning_rate' in b][0]
print('noise on stdout')
print('noise on stderr', file=sys.stderr)
if os.environ.get('STUB_NO_JSON'):
  print('no metrics today')
else:
  print(json.dumps({'exact_match_ci': lr * 100, 'ned': 0.123456, 'scheduler': 'ddim',
                    'flags': sys.argv[2:]}))
'''


def write_sweep_file(path, trials, gin_files=(MICRO_GIN,), evaluate_flags=(), body=None):
  """A sweep file returning `trials`; `body` replaces the whole text when given."""
  path.write_text(body if body is not None else
                  f'NAME = {path.stem!r}\n'
                  f'GIN_FILES = {list(gin_files)!r}\n'
                  f'EVALUATE_FLAGS = {list(evaluate_flags)!r}\n\n'
                  f'def get_sweep():\n  return {trials!r}\n')
  return path


def run_sweep_cli(*args, env=None, timeout=900):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env or {}))
  return subprocess.run([sys.executable, '-m', 'charred.sweep', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def stubs(tmp_path):
  """--train_command and --evaluate_command flags that run the stub scripts."""
  train, evaluate = tmp_path / 'stub_train.py', tmp_path / 'stub_evaluate.py'
  train.write_text(STUB_TRAIN)
  evaluate.write_text(STUB_EVALUATE)
  return [f'--train_command={sys.executable} {train}',
          f'--evaluate_command={sys.executable} {evaluate}']


def read_csv(workdir):
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    return list(csv.DictReader(f))


def read_result(workdir, trial_id):
  with open(os.path.join(workdir, trial_id, 'result.json')) as f:
    return json.load(f)


def trial_ids(trials):
  return [sweep.Trial(i, tuple(t.items())).id for i, t in enumerate(trials)]


LR_TRIALS = [{'TRAIN_STEPS': 2, 'optimizer.OptimizerConfig.learning_rate': 1e-3},
             {'TRAIN_STEPS': 2, 'optimizer.OptimizerConfig.learning_rate': -1.0}]


# (1) Two real micro trainings, each evaluated.

@pytest.mark.slow
def test_sweep_trains_and_evaluates_two_micro_trials(tmp_path, micro_data_dir):
  # The data first, so that the two trials running at once do not both generate it.
  subprocess.run([sys.executable, '-c', 'import sys; from charred.datasets import pipeline; '
                  "pipeline.prepare('micro', sys.argv[1])", micro_data_dir],
                 cwd=REPO, check=True, capture_output=True,
                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  words = tmp_path / 'words.txt'
  words.write_text('hello\nWorld\n')
  common = {'TRAIN_STEPS': 2, 'experiment.DataConfig.data_dir': micro_data_dir,
            'evaluators.ValidationConfig.num_batches': 1,
            'evaluators.SampleEvalConfig.num_prompts': 1}
  trials = [dict(common, **{'optimizer.OptimizerConfig.learning_rate': lr})
            for lr in (1e-3, 3e-4)]
  sweep_file = write_sweep_file(tmp_path / 'micro_lr.py', trials,
                                evaluate_flags=[f'--words_file={words}', '--steps=2'])
  workdir = tmp_path / 'sweep'
  proc = run_sweep_cli(f'--sweep_file={sweep_file}', f'--workdir={workdir}', '--parallel=2')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  rows = read_csv(workdir)
  assert [r['trial'] for r in rows] == trial_ids(trials)
  assert [r['status'] for r in rows] == ['done', 'done']
  assert [float(r['optimizer.OptimizerConfig.learning_rate']) for r in rows] == [1e-3, 3e-4]
  for row, trial_id in zip(rows, trial_ids(trials)):
    assert 0.0 <= float(row['exact_match_ci']) <= 1.0 and row['num_words'] == '2'
    result = read_result(workdir, trial_id)
    assert result['status'] == 'done' and result['metrics']['step'] == 2
    trial_dir = workdir / trial_id
    assert (trial_dir / 'checkpoints' / '2').is_dir()
    assert 'step 2/2' in (trial_dir / 'train.log').read_text()
    assert '"exact_match_ci"' in (trial_dir / 'evaluate.log').read_text()
  assert (workdir / 'results.md').read_text().count('| done |') == 2
  assert (workdir / 'results.png').read_bytes().startswith(b'\x89PNG')


# (2) Bad sweep files: one error line, exit code 2, nothing written.

BAD_SWEEPS = {
    'syntax_error': (None, 'GIN_FILES = []\ndef get_sweep(:\n  return []\n',
                     ['bad.py:2', 'does not parse']),
    'unknown_parameter': ([{'TRAIN_STEPS': 2}, {'unet.UNetConfig.no_such_option': 3}], None,
                          ['{id1}', 'unet.UNetConfig.no_such_option = 3', 'no_such_option']),
    'unknown_configurable': ([{'unet.NoSuchConfig.channels': 3}], None,
                             ['{id0}', 'unet.NoSuchConfig.channels = 3']),
    'unknown_macro': ([{'TRAIN_STEPS': 2}, {'NO_SUCH_MACRO': 'x'}], None,
                      ['{id1}', "NO_SUCH_MACRO = 'x'", 'unknown macro']),
    'invalid_config': ([{'TRAIN_STEPS': 7, 'trainer.TrainConfig.accumulation_steps': 2}], None,
                       ['{id0}', 'TRAIN_STEPS = 7', 'multiple of accumulation_steps']),
    'not_a_list_of_dicts': (None, 'GIN_FILES = ["%s"]\ndef get_sweep():\n  return [{}, 3]\n'
                            % MICRO_GIN, ['get_sweep()[1]', 'trial_001', 'not a dict']),
    'missing_get_sweep': (None, 'GIN_FILES = ["%s"]\n' % MICRO_GIN, ['no get_sweep']),
}


@pytest.mark.parametrize('case', sorted(BAD_SWEEPS))
def test_bad_sweep_is_one_error_line_naming_trial_and_binding_and_writes_nothing(
    case, tmp_path, stubs):
  trials, body, expected = BAD_SWEEPS[case]
  sweep_file = write_sweep_file(tmp_path / 'bad.py', trials, body=body)
  workdir = tmp_path / 'sweep'
  proc = run_sweep_cli(f'--sweep_file={sweep_file}', f'--workdir={workdir}', *stubs)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('charred.sweep: error: '), proc.stderr
  ids = trial_ids(trials) if trials else []
  for text in expected:
    assert text.format(**{f'id{i}': t for i, t in enumerate(ids)}) in lines[0]
  assert not workdir.exists()
  assert sorted(os.listdir(tmp_path)) == sorted(['bad.py', 'stub_train.py',
                                                  'stub_evaluate.py'])


# (3) A failed trial is recorded; the others go on.

def test_failed_trial_is_recorded_while_the_other_completes(tmp_path, stubs):
  sweep_file = write_sweep_file(tmp_path / 'lr.py', LR_TRIALS, evaluate_flags=['--steps=2'])
  workdir = tmp_path / 'sweep'
  proc = run_sweep_cli(f'--sweep_file={sweep_file}', f'--workdir={workdir}', '--parallel=2',
                       *stubs, env={'STUB_FAIL': 'learning_rate = -'})
  assert proc.returncode == 1, proc.stdout + proc.stderr
  good, bad = trial_ids(LR_TRIALS)
  assert bad in proc.stderr and good not in proc.stderr

  failed = read_result(workdir, bad)
  assert failed['status'] == 'failed' and failed['stage'] == 'train'
  assert failed['returncode'] == 3
  assert failed['error'] == 'ValueError: stub trainer rejects learning_rate = -'
  assert failed['bindings'] == LR_TRIALS[1] and failed['wall_seconds'] >= 0
  assert not (workdir / bad / 'evaluate.log').exists()
  done = read_result(workdir, good)
  assert done['status'] == 'done' and done['bindings'] == LR_TRIALS[0]
  assert done['metrics']['exact_match_ci'] == pytest.approx(0.1)
  assert done['metrics']['flags'] == ['--steps=2']  # EVALUATE_FLAGS reach the evaluator
  assert 'noise on stderr' in (workdir / good / 'evaluate.log').read_text()
  assert 'step 2/2' in (workdir / bad / 'train.log').read_text()

  rows = read_csv(workdir)
  assert [(r['trial'], r['status']) for r in rows] == [(good, 'done'), (bad, 'failed')]
  assert rows[1]['returncode'] == '3' and rows[1]['exact_match_ci'] == ''
  assert rows[0]['ned'] == '0.123456' and rows[0]['TRAIN_STEPS'] == '2'
  markdown = (workdir / 'results.md').read_text()
  assert '| 0.123 |' in markdown and '0.123456' not in markdown
  assert (workdir / 'results.png').read_bytes().startswith(b'\x89PNG')


# (4) A rerun skips done trials and retries failed ones.

def test_rerun_skips_done_trial_and_retries_failed_one(tmp_path, stubs):
  sweep_file = write_sweep_file(tmp_path / 'lr.py', LR_TRIALS)
  workdir = tmp_path / 'sweep'
  args = [f'--sweep_file={sweep_file}', f'--workdir={workdir}', *stubs]
  assert run_sweep_cli(*args, env={'STUB_FAIL': 'learning_rate = -'}).returncode == 1
  good, bad = trial_ids(LR_TRIALS)
  done_json = workdir / good / 'result.json'
  before = (done_json.read_bytes(), done_json.stat().st_mtime_ns,
            (workdir / good / 'train.log').read_bytes())

  proc = run_sweep_cli(*args)  # the trainer accepts everything now
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f'{good}: done before, skipped' in proc.stdout
  assert (done_json.read_bytes(), done_json.stat().st_mtime_ns,
          (workdir / good / 'train.log').read_bytes()) == before
  assert (workdir / 'invocations.txt').read_text().split() == [good, bad, bad]
  assert read_result(workdir, bad)['status'] == 'done'
  assert [r['status'] for r in read_csv(workdir)] == ['done', 'done']

  proc = run_sweep_cli(*args)  # all done: nothing runs
  assert proc.returncode == 0 and proc.stdout.count('done before, skipped') == 2
  assert (workdir / 'invocations.txt').read_text().split() == [good, bad, bad]


def test_evaluation_without_json_metrics_fails_the_trial(tmp_path, stubs):
  sweep_file = write_sweep_file(tmp_path / 'lr.py', LR_TRIALS[:1])
  workdir = tmp_path / 'sweep'
  proc = run_sweep_cli(f'--sweep_file={sweep_file}', f'--workdir={workdir}', *stubs,
                       env={'STUB_NO_JSON': '1'})
  assert proc.returncode == 1
  result = read_result(workdir, trial_ids(LR_TRIALS)[0])
  assert result['status'] == 'failed' and result['stage'] == 'evaluate'
  assert 'no JSON metrics' in result['error'] and 'no metrics today' in result['error']


def test_evaluate_false_skips_evaluation(tmp_path, stubs):
  sweep_file = write_sweep_file(tmp_path / 'lr.py', LR_TRIALS[:1])
  workdir = tmp_path / 'sweep'
  proc = run_sweep_cli(f'--sweep_file={sweep_file}', f'--workdir={workdir}',
                       '--evaluate=false', *stubs, env={'STUB_NO_JSON': '1'})
  assert proc.returncode == 0, proc.stderr
  trial_id = trial_ids(LR_TRIALS)[0]
  assert read_result(workdir, trial_id)['metrics'] == {}
  assert not (workdir / trial_id / 'evaluate.log').exists()
  assert not (workdir / 'results.png').exists()  # no metric to plot


def test_shipped_smoke_sweep_validates_in_a_dry_run(tmp_path):
  workdir = tmp_path / 'sweep'
  proc = run_sweep_cli('--sweep_file=sweeps/typography_tiny_smoke.py', f'--workdir={workdir}',
                       '--dry_run')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.count('would run') == 2 and proc.stdout.count('-m charred.main') == 2
  assert "'--gin_bindings=optimizer.OptimizerConfig.learning_rate = 0.0003'" in proc.stdout
  assert not workdir.exists()


def test_a_sweep_file_imports_charred_sweep_for_gin_references(tmp_path):
  # As the module docstring says to write them, while charred.sweep runs the file.
  path = write_sweep_file(tmp_path / 'refs.py', [], body=(
      'from charred import sweep\n'
      f'GIN_FILES = [{MICRO_GIN!r}]\n'
      'def get_sweep():\n'
      "  return [{'trainer.TrainConfig.train_steps': sweep.GinLiteral('%CHECKPOINT_EVERY')}]\n"))
  proc = run_sweep_cli(f'--sweep_file={path}', f'--workdir={tmp_path / "s"}', '--dry_run')
  assert proc.returncode == 0, proc.stderr
  assert 'trainer.TrainConfig.train_steps = %CHECKPOINT_EVERY' in proc.stdout


# Pure parts.

def test_gin_values_are_gin_literals():
  assert sweep.gin_value('a "b"') == """'a "b"'"""
  assert sweep.gin_value((16,)) == '(16,)'
  assert sweep.gin_value((1, 2.5, None)) == '(1, 2.5, None)'
  assert sweep.gin_value([True, False]) == '[True, False]'
  assert sweep.gin_value({'a': (1, 2)}) == "{'a': (1, 2)}"
  assert sweep.gin_value(-3e-4) == '-0.0003'
  assert sweep.gin_value(sweep.GinLiteral('@jnp.bfloat16')) == '@jnp.bfloat16'
  for bad in (float('nan'), object()):
    with pytest.raises(sweep.SweepError):
      sweep.gin_value(bad)


def test_trial_ids_are_stable_per_index_and_bindings():
  a = sweep.Trial(3, (('TRAIN_STEPS', 5), ('unet.UNetConfig.remat', True)))
  assert a.id == sweep.Trial(3, (('unet.UNetConfig.remat', True), ('TRAIN_STEPS', 5))).id
  assert a.id.startswith('trial_003_') and len(a.id) == len('trial_003_') + 8
  assert a.id != sweep.Trial(4, a.bindings).id
  assert a.id != sweep.Trial(3, (('TRAIN_STEPS', 6), ('unet.UNetConfig.remat', True))).id
  assert a.lines == ('TRAIN_STEPS = 5', 'unet.UNetConfig.remat = True')
  with pytest.raises(sweep.SweepError, match='trial_002: .*not a gin name'):
    sweep.Trial(2, (('%TRAIN_STEPS', 5),))


def test_reports_take_the_union_of_columns_and_pick_the_plot_metric():
  results = [
      dict(trial='t0', status='done', bindings={'A': 1}, wall_seconds=2.0,
           metrics={'scheduler': 'ddim', 'ned': 0.12345}),
      dict(trial='t1', status='failed', bindings={'B': 'x'}, wall_seconds=1.0, metrics={},
           stage='train', returncode=2, error='boom | bang')]
  columns, metrics, _ = sweep.table(results)
  assert columns == ['trial', 'status', 'A', 'B', 'wall_seconds', 'scheduler', 'ned',
                     'stage', 'returncode', 'error']
  assert metrics == ['scheduler', 'ned']
  assert sweep.csv_text(results).splitlines()[1:] == [
      't0,done,1,,2.0,ddim,0.12345,,,', 't1,failed,,x,1.0,,,train,2,boom | bang']
  markdown = sweep.markdown_text(results).splitlines()
  assert markdown[2] == '| t0 | done | 1 |  | 2.0 | ddim | 0.123 |  |  |  |'
  assert markdown[3].endswith(r'| boom \| bang |')
  assert sweep.plot_metric(results, 'exact_match_ci') == 'ned'
  # Breakdowns by bucket, length or ceiling are in the CSV, not in the Markdown table.
  results[0]['metrics']['ned/len_3'] = 0.5
  assert 'ned/len_3' in sweep.csv_text(results).splitlines()[0]
  assert 'ned/len_3' not in sweep.markdown_text(results)
  assert sweep.plot_metric(results, None) == 'ned'
  assert sweep.plot_metric(results[1:], 'exact_match_ci') is None
