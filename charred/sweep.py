r"""Runs a sweep of gin bindings as trials of `charred.main` (and `charred.evaluate`).

  python -m charred.sweep --sweep_file=F --workdir=DIR [--parallel=N] [--evaluate=true] \
      [--dry_run] [--plot_metric=exact_match_ci]

F is Python (found in . or charred's gin/, e.g. `sweeps/typography_tiny_smoke.py`) that
defines `GIN_FILES` (gin files, found as `charred.main` finds them) and `get_sweep()`, a
list of dicts from gin names to values, one per trial, e.g.
`{'TRAIN_STEPS': 3000, 'unet.UNetConfig.position_embedding': True}` (names without a dot are
the experiment's macros). Optional: `NAME`, and `EVALUATE_FLAGS`, extra flags for
`charred.evaluate` (e.g. `['--steps=30']`). A value that is a gin reference rather than a
Python literal is written `sweep.GinLiteral('@jnp.bfloat16')`.

Every trial is parsed with gin and its `Experiment` built before anything runs: a bad
sweep file or binding is one line on stderr and exit code 2, with nothing written. Trial i
runs in DIR/trial_<i>_<hash of its bindings>/: `charred.main` (output in train.log), then
`charred.evaluate` (evaluate.log; the last stdout line is its JSON metrics), and writes
result.json (status 'done' or 'failed'). A rerun skips done trials and retries failed
ones (a preempted training resumes from its checkpoints). DIR/results.csv, results.md and
results.png (a bar chart of one metric) gather the trials. The exit code is 1 if any
trial failed.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import types
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags

from charred.configs import gin_utils

PROG = 'charred.sweep'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PLOT_METRIC = 'exact_match_ci'
RESULT_FILE = 'result.json'

_SWEEP_FILE = flags.DEFINE_string('sweep_file', None, "Python sweep file (in . or charred's "
                                  'gin/): GIN_FILES, get_sweep(), optional NAME, EVALUATE_FLAGS.')
_WORKDIR = gin_utils.workdir_flag('The sweep directory: one folder per trial.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Trials run at a time.', lower_bound=1)
_EVALUATE = flags.DEFINE_bool('evaluate', True, 'Run charred.evaluate after each training.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Validate and print the commands; run and '
                             'write nothing.')
_PLOT_METRIC = flags.DEFINE_string('plot_metric', DEFAULT_PLOT_METRIC, 'Metric of results.png '
                                   '(falls back to the first numeric metric).')
_TRAIN_COMMAND = flags.DEFINE_string('train_command', None, 'Command that trains, given '
                                     '--workdir, --gin_file and --gin_bindings (default: '
                                     'python -m charred.main).')
_EVALUATE_COMMAND = flags.DEFINE_string('evaluate_command', None, 'Command that evaluates, '
                                        'given --workdir and EVALUATE_FLAGS, printing JSON '
                                        'metrics last (default: python -m charred.evaluate).')


class SweepError(ValueError):
  """A sweep file or trial that cannot run; its message is one line."""


# Gin values.

@dataclasses.dataclass(frozen=True)
class GinLiteral:
  """Gin text written as is: a reference (`@jnp.bfloat16`, `@f()`) or macro (`%X`)."""
  text: str

  def __post_init__(self):
    if not isinstance(self.text, str) or not self.text.strip() or '\n' in self.text:
      raise SweepError(f'GinLiteral needs one line of gin, got {self.text!r}.')


def gin_value(value: Any) -> str:
  """A Python value as gin text: strings quoted, tuples, lists, dicts, True/False/None."""
  if isinstance(value, GinLiteral):
    return value.text
  if value is None or isinstance(value, (bool, int, str)):
    return repr(value)
  if isinstance(value, float):
    if not math.isfinite(value):
      raise SweepError(f'{value!r} has no gin literal.')
    return repr(value)
  if isinstance(value, tuple):
    items = [gin_value(v) for v in value]
    return '(' + ', '.join(items) + (',)' if len(items) == 1 else ')')
  if isinstance(value, list):
    return '[' + ', '.join(gin_value(v) for v in value) + ']'
  if isinstance(value, dict):
    return '{' + ', '.join(f'{gin_value(k)}: {gin_value(v)}' for k, v in value.items()) + '}'
  raise SweepError(f'a {type(value).__name__} has no gin literal.')


def json_value(value: Any) -> Any:
  """A binding's value as JSON (tuples become lists, gin literals their text)."""
  if isinstance(value, GinLiteral):
    return value.text
  if isinstance(value, (tuple, list)):
    return [json_value(v) for v in value]
  if isinstance(value, dict):
    return {str(k): json_value(v) for k, v in value.items()}
  return value


# Optional scope(s), then a macro (no dot) or configurable.parameter.
_NAME = re.compile(r'([A-Za-z_]\w*/)*[A-Za-z_]\w*(\.[A-Za-z_]\w*)*')


def is_macro(name: str) -> bool:
  return '.' not in name and '/' not in name


# Trials and sweeps.

@dataclasses.dataclass(frozen=True)
class Trial:
  """One set of gin bindings, in the order the sweep file gave them."""
  index: int
  bindings: tuple[tuple[str, Any], ...]

  def __post_init__(self):
    label = f'trial_{self.index:03d}'
    for name, value in self.bindings:
      if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SweepError(f'{label}: {name!r} is not a gin name (MACRO or '
                         'configurable.parameter, without %).')
      try:
        gin_value(value)
      except SweepError as e:
        raise SweepError(f'{label}: {name}: {e}') from None

  @property
  def lines(self) -> tuple[str, ...]:
    """The bindings as gin statements, `name = value`."""
    return tuple(f'{name} = {gin_value(value)}' for name, value in self.bindings)

  @property
  def id(self) -> str:
    digest = hashlib.sha256('\n'.join(sorted(self.lines)).encode()).hexdigest()[:8]
    return f'trial_{self.index:03d}_{digest}'

  def bindings_json(self) -> dict[str, Any]:
    return {name: json_value(value) for name, value in self.bindings}


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  gin_files: tuple[str, ...]
  trials: tuple[Trial, ...]
  evaluate_flags: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise SweepError(f'NAME must be a non-empty string, got {self.name!r}.')
    if not self.gin_files or not all(isinstance(f, str) and f for f in self.gin_files):
      raise SweepError(f'GIN_FILES must be a non-empty list of paths, got '
                       f'{list(self.gin_files)!r}.')
    if not self.trials:
      raise SweepError('get_sweep() returned no trials.')
    for flag in self.evaluate_flags:
      if not isinstance(flag, str) or not flag.startswith('--'):
        raise SweepError(f'EVALUATE_FLAGS entries must be --flags, got {flag!r}.')
      if flag.split('=')[0] == '--workdir':
        raise SweepError('EVALUATE_FLAGS must not set --workdir (the sweep sets it).')


def find_sweep_file(path: str) -> str:
  """`path` as given, else under charred's gin/ (as gin files are found)."""
  for candidate in (path, os.path.join(gin_utils.GIN_DIR, path),
                    os.path.join(os.path.dirname(gin_utils.GIN_DIR), path)):
    if os.path.isfile(candidate):
      return candidate
  raise SweepError(f'sweep file not found: {path} (searched ., {gin_utils.GIN_DIR})')


def _load_module(path: str) -> types.ModuleType:
  """Executes the sweep file as a module (without writing bytecode next to it)."""
  name = '_charred_sweep_' + re.sub(r'\W', '_', os.path.splitext(os.path.basename(path))[0])
  module = types.ModuleType(name)
  module.__file__ = path
  sys.modules[name] = module  # dataclasses in the sweep file look their module up
  try:
    with open(path, encoding='utf-8') as f:
      code = compile(f.read(), path, 'exec')
    exec(code, module.__dict__)  # pylint: disable=exec-used
  except SyntaxError as e:
    raise SweepError(f'{path}:{e.lineno}: does not parse: {e.msg}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'{path}: does not import: {type(e).__name__}: '
                     f'{gin_utils.error_line(e)}') from None
  finally:
    sys.modules.pop(name, None)
  return module


def _as_sequence(value: Any, what: str) -> tuple:
  if isinstance(value, str) or not isinstance(value, (list, tuple)):
    raise SweepError(f'{what} must be a list, got {type(value).__name__}.')
  return tuple(value)


def load_sweep(path: str) -> Sweep:
  """Imports a sweep file and checks its shape (not yet its gin bindings)."""
  path = find_sweep_file(path)
  module = _load_module(path)
  if not hasattr(module, 'GIN_FILES'):
    raise SweepError(f'{path}: defines no GIN_FILES.')
  if not callable(getattr(module, 'get_sweep', None)):
    raise SweepError(f'{path}: defines no get_sweep() function.')
  try:
    trials = module.get_sweep()
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'{path}: get_sweep() raised {type(e).__name__}: '
                     f'{gin_utils.error_line(e)}') from None
  trials = _as_sequence(trials, f'{path}: get_sweep()')
  for i, t in enumerate(trials):
    if not isinstance(t, Mapping):
      raise SweepError(f'{path}: get_sweep()[{i}] (trial_{i:03d}) is a {type(t).__name__}, '
                       'not a dict of gin bindings.')
  try:
    return Sweep(
        name=getattr(module, 'NAME', os.path.splitext(os.path.basename(path))[0]),
        gin_files=_as_sequence(module.GIN_FILES, 'GIN_FILES'),
        trials=tuple(Trial(i, tuple(t.items())) for i, t in enumerate(trials)),
        evaluate_flags=_as_sequence(getattr(module, 'EVALUATE_FLAGS', ()), 'EVALUATE_FLAGS'))
  except SweepError as e:
    raise SweepError(f'{path}: {e}') from None


def validate(sweep: Sweep) -> None:
  """Parses the gin files and each trial's bindings, and builds each trial's Experiment."""
  import gin  # pylint: disable=g-import-not-at-top
  from charred.configs.experiment import Experiment  # pylint: disable=g-import-not-at-top
  try:
    for trial in sweep.trials:
      gin.clear_config()
      try:
        gin_utils.parse(sweep.gin_files)
      except Exception as e:  # pylint: disable=broad-except
        raise SweepError(f'GIN_FILES: {gin_utils.error_line(e)}') from None
      for (name, _), line in zip(trial.bindings, trial.lines):
        if is_macro(name) and not _macro_bound(gin, name):
          raise SweepError(f'{trial.id}: {line}: unknown macro {name!r} (not bound in '
                           f'{", ".join(sweep.gin_files)}).')
        try:
          gin_utils.parse((), [line])
        except Exception as e:  # pylint: disable=broad-except
          message = re.sub(r'\s*In bindings string line \d+\.?$', '', gin_utils.error_line(e))
          raise SweepError(f'{trial.id}: {line}: {message}') from None
      try:
        gin.get_configurable(Experiment)()
      except Exception as e:  # pylint: disable=broad-except
        raise SweepError(f'{trial.id} ({"; ".join(trial.lines)}): '
                         f'{gin_utils.error_line(e)}') from None
  finally:
    gin.clear_config()


def _macro_bound(gin, name: str) -> bool:
  try:
    gin.query_parameter(f'%{name}')
  except ValueError:
    return False
  return True


# Commands and subprocesses.

@dataclasses.dataclass(frozen=True)
class Commands:
  """Command prefixes for training and evaluation; the sweep appends the flags."""
  train: tuple[str, ...] = (sys.executable, '-m', 'charred.main')
  evaluate: tuple[str, ...] = (sys.executable, '-m', 'charred.evaluate')

  def __post_init__(self):
    if not self.train or not self.evaluate:
      raise SweepError('train and evaluate commands must not be empty.')


def train_command(commands: Commands, sweep: Sweep, trial: Trial, trial_dir: str) -> list[str]:
  return [*commands.train, f'--workdir={trial_dir}',
          *(f'--gin_file={f}' for f in sweep.gin_files),
          *(f'--gin_bindings={line}' for line in trial.lines)]


def evaluate_command(commands: Commands, sweep: Sweep, trial_dir: str) -> list[str]:
  return [*commands.evaluate, f'--workdir={trial_dir}', *sweep.evaluate_flags]


@dataclasses.dataclass(frozen=True)
class Completed:
  returncode: int | None
  last_stdout: str
  last_stderr: str


def child_env() -> dict[str, str]:
  """This environment, with the repo importable and output unbuffered into the logs."""
  path = os.environ.get('PYTHONPATH')
  return dict(os.environ, PYTHONUNBUFFERED='1',
              PYTHONPATH=REPO + (os.pathsep + path if path else ''))


def run_logged(cmd: Sequence[str], log_path: str) -> Completed:
  """Runs `cmd`, appending its stdout and stderr to `log_path`; keeps each one's last line."""
  lock = threading.Lock()
  last = {'stdout': '', 'stderr': ''}
  with open(log_path, 'a', encoding='utf-8') as log:
    log.write(f'$ {shlex.join(cmd)}\n')
    log.flush()
    try:
      proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, errors='replace',
                              env=child_env())
    except OSError as e:
      log.write(f'{e}\n')
      return Completed(None, '', f'cannot start {cmd[0]}: {e.strerror or e}')

    def pump(stream, key):
      for line in stream:
        with lock:
          log.write(line)
          log.flush()
          if line.strip():
            last[key] = line.strip()

    threads = [threading.Thread(target=pump, args=(proc.stdout, 'stdout'), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, 'stderr'), daemon=True)]
    for t in threads:
      t.start()
    returncode = proc.wait()
    for t in threads:
      t.join()
    log.write(f'# exit code {returncode}\n')
  return Completed(returncode, last['stdout'], last['stderr'])


def parse_metrics(line: str) -> dict[str, Any]:
  """The JSON object on evaluate's last stdout line."""
  try:
    metrics = json.loads(line)
  except json.JSONDecodeError:
    metrics = None
  if not isinstance(metrics, dict):
    raise SweepError(f'evaluate printed no JSON metrics last (last line: {line[:200]!r}).')
  return metrics


# Results.

def read_result(trial_dir: str) -> dict | None:
  """The trial's result.json, or None if it has none (or an unreadable one)."""
  try:
    with open(os.path.join(trial_dir, RESULT_FILE), encoding='utf-8') as f:
      result = json.load(f)
  except (OSError, ValueError):
    return None
  return result if isinstance(result, dict) else None


def is_done(result: dict | None) -> bool:
  return bool(result) and result.get('status') == 'done'


def write_result(trial_dir: str, result: dict) -> None:
  """Writes result.json atomically; a done result is never overwritten."""
  if is_done(read_result(trial_dir)):
    raise SweepError(f'{trial_dir}: refusing to overwrite a done {RESULT_FILE}.')
  path = os.path.join(trial_dir, RESULT_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(path + '.tmp', path)


def run_trial(sweep: Sweep, trial: Trial, workdir: str, commands: Commands,
              evaluate: bool) -> dict:
  """Trains and evaluates one trial; writes and returns its result."""
  trial_dir = os.path.join(workdir, trial.id)
  os.makedirs(trial_dir, exist_ok=True)
  start = time.time()
  result = dict(trial=trial.id, index=trial.index, sweep=sweep.name,
                gin_files=list(sweep.gin_files), bindings=trial.bindings_json(), metrics={})

  def failed(stage, completed: Completed | None, error: str) -> dict:
    return dict(result, status='failed', stage=stage, error=error,
                returncode=completed.returncode if completed else None,
                wall_seconds=round(time.time() - start, 2))

  train = run_logged(train_command(commands, sweep, trial, trial_dir),
                     os.path.join(trial_dir, 'train.log'))
  if train.returncode != 0:
    result = failed('train', train, train.last_stderr)
  elif not evaluate:
    result = dict(result, status='done', wall_seconds=round(time.time() - start, 2))
  else:
    ev = run_logged(evaluate_command(commands, sweep, trial_dir),
                    os.path.join(trial_dir, 'evaluate.log'))
    if ev.returncode != 0:
      result = failed('evaluate', ev, ev.last_stderr)
    else:
      try:
        metrics = parse_metrics(ev.last_stdout)
      except SweepError as e:
        result = failed('evaluate', ev, str(e))
      else:
        result = dict(result, status='done', metrics=metrics,
                      wall_seconds=round(time.time() - start, 2))
  write_result(trial_dir, result)
  return result


def pending_result(sweep: Sweep, trial: Trial) -> dict:
  return dict(trial=trial.id, index=trial.index, sweep=sweep.name, status='pending',
              bindings=trial.bindings_json(), metrics={})


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def table(results: Sequence[dict]) -> tuple[list[str], list[str], list[dict]]:
  """(columns, metric columns, rows): trial, status, the bindings, wall_seconds, every
  metric seen, then returncode and error where a trial failed."""
  def union(keys_per_row):
    seen = {}
    for keys in keys_per_row:
      seen.update(dict.fromkeys(keys))
    return list(seen)
  bindings = union(r.get('bindings', {}) for r in results)
  metrics = union(r.get('metrics', {}) for r in results)
  extra = [k for k in ('stage', 'returncode', 'error') if any(k in r for r in results)]
  rows = []
  for r in results:
    row = dict(trial=r['trial'], status=r['status'], wall_seconds=r.get('wall_seconds'))
    row.update(r.get('bindings', {}))
    row.update(r.get('metrics', {}))
    row.update({k: r.get(k) for k in extra})
    rows.append(row)
  return ['trial', 'status', *bindings, 'wall_seconds', *metrics, *extra], metrics, rows


def cell(value: Any, digits: int | None = None) -> str:
  if value is None:
    return ''
  if isinstance(value, str):
    return value
  if digits is not None and isinstance(value, float):
    return f'{value:.{digits}f}'
  if isinstance(value, (list, dict)):
    return json.dumps(value)
  return str(value)


def csv_text(results: Sequence[dict]) -> str:
  columns, _, rows = table(results)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(columns)
  for row in rows:
    writer.writerow([cell(row.get(c)) for c in columns])
  return out.getvalue()


def headline(metric: str) -> bool:
  """Metrics shown in results.md and the console: not the per-bucket, per-length or
  ceiling breakdowns (`name/...`), which only results.csv holds."""
  return '/' not in metric


def markdown_text(results: Sequence[dict]) -> str:
  """A Markdown table of the headline metrics; rounded to 3 decimals, wall seconds to 1."""
  columns, metrics, rows = table(results)
  columns = [c for c in columns if c not in metrics or headline(c)]
  digits = {c: 3 for c in metrics}
  digits['wall_seconds'] = 1

  def md(text: str) -> str:
    return text.replace('|', r'\|').replace('\n', ' ')
  lines = ['| ' + ' | '.join(md(c) for c in columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(md(cell(row.get(c), digits.get(c))) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def plot_metric(results: Sequence[dict], requested: str | None) -> str | None:
  """`requested` if some trial has it as a number, else the first numeric metric."""
  _, metrics, rows = table(results)
  numeric = [m for m in metrics if any(_is_number(row.get(m)) for row in rows)]
  if requested in numeric:
    return requested
  return numeric[0] if numeric else None


def write_text(path: str, text: str) -> None:
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def write_plot(path: str, results: Sequence[dict], metric: str, title: str) -> None:
  """A bar per trial (none where the trial has no value), written atomically."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [r['trial'] for r in results]
  values = [r.get('metrics', {}).get(metric) for r in results]
  heights = [v if _is_number(v) else 0.0 for v in values]
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 4))
  try:
    bars = ax.bar(range(len(names)), heights, color='tab:blue')
    for bar, v, r in zip(bars, values, results):
      label = f'{v:.3g}' if _is_number(v) else r['status']
      ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                  ha='center', va='bottom', fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha='right', fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f'{title}: {metric}')
    fig.tight_layout()
    fig.savefig(path + '.tmp', format='png', dpi=100)
  finally:
    plt.close(fig)
  os.replace(path + '.tmp', path)


def write_reports(workdir: str, sweep: Sweep, results: Sequence[dict],
                  requested_metric: str | None, with_plot: bool = True) -> str | None:
  """results.csv, results.md and (if some metric is numeric) results.png; the plotted metric."""
  write_text(os.path.join(workdir, 'results.csv'), csv_text(results))
  write_text(os.path.join(workdir, 'results.md'), markdown_text(results))
  if not with_plot:
    return None
  metric = plot_metric(results, requested_metric)
  png = os.path.join(workdir, 'results.png')
  if metric:
    write_plot(png, results, metric, sweep.name)
  elif os.path.exists(png):
    os.remove(png)  # a chart of metrics no trial has any more
  return metric


# The sweep.

def run_sweep(sweep: Sweep, workdir: str, commands: Commands = Commands(), parallel: int = 1,
              evaluate: bool = True, plot_metric_name: str | None = DEFAULT_PLOT_METRIC,
              log: Callable[[str], None] = print) -> list[dict]:
  """Runs the trials not yet done, `parallel` at a time; returns every trial's result."""
  os.makedirs(workdir, exist_ok=True)
  results = {}
  todo = []
  for trial in sweep.trials:
    previous = read_result(os.path.join(workdir, trial.id))
    if is_done(previous):
      results[trial.id] = previous
      log(f'{trial.id}: done before, skipped')
    else:
      results[trial.id] = pending_result(sweep, trial)
      todo.append(trial)

  def ordered():
    return [results[t.id] for t in sweep.trials]

  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = {}
    for trial in todo:
      log(f'{trial.id}: running ({"; ".join(trial.lines) or "no bindings"})')
      futures[pool.submit(run_trial, sweep, trial, workdir, commands, evaluate)] = trial
    for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
      trial = futures[future]
      try:
        result = future.result()
      except (OSError, SweepError) as e:  # the trial's folder or files, not its commands
        result = dict(pending_result(sweep, trial), status='failed', stage='sweep',
                      returncode=None, error=f'{type(e).__name__}: {e}')
      results[trial.id] = result
      summary = result.get('error') if result['status'] == 'failed' else ', '.join(
          f'{k}={cell(v, 3)}' for k, v in result.get('metrics', {}).items()
          if _is_number(v) and headline(k))
      log(f'[{n}/{len(todo)}] {trial.id}: {result["status"]} after '
          f'{result.get("wall_seconds", 0):.1f} s{": " + summary if summary else ""}')
      write_reports(workdir, sweep, ordered(), plot_metric_name, with_plot=False)
  final = ordered()
  metric = write_reports(workdir, sweep, final, plot_metric_name)
  if plot_metric_name and metric != plot_metric_name:
    log(f'no trial has a numeric {plot_metric_name!r}; '
        + (f'results.png shows {metric!r}' if metric else 'no results.png'))
  return final


def dry_run(sweep: Sweep, workdir: str, commands: Commands, evaluate: bool) -> None:
  for trial in sweep.trials:
    trial_dir = os.path.join(workdir, trial.id)
    if is_done(read_result(trial_dir)):
      print(f'{trial.id}: done, would skip')
      continue
    print(f'{trial.id}: would run')
    print('  ' + shlex.join(train_command(commands, sweep, trial, trial_dir)))
    if evaluate:
      print('  ' + shlex.join(evaluate_command(commands, sweep, trial_dir)))


def commands_from_flags() -> Commands:
  default = Commands()
  return Commands(
      train=tuple(shlex.split(_TRAIN_COMMAND.value)) if _TRAIN_COMMAND.value else default.train,
      evaluate=(tuple(shlex.split(_EVALUATE_COMMAND.value)) if _EVALUATE_COMMAND.value
                else default.evaluate))


def check_workdir(workdir: str) -> None:
  """Fails, writing nothing, if `workdir` is a file or cannot be created."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
    raise SweepError(f'workdir {workdir!r} is not writable ({path} is not a writable '
                     'directory).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    if not _SWEEP_FILE.value:
      raise SweepError('--sweep_file is required.')
    if not _WORKDIR.value:
      raise SweepError('--workdir is required.')
    commands = commands_from_flags()
    sweep = load_sweep(_SWEEP_FILE.value)
    check_workdir(_WORKDIR.value)
    validate(sweep)
  except SweepError as e:
    gin_utils.exit_with_error(PROG, e)
  workdir = os.path.abspath(_WORKDIR.value)
  if _DRY_RUN.value:
    dry_run(sweep, workdir, commands, _EVALUATE.value)
    return
  results = run_sweep(sweep, workdir, commands, _PARALLEL.value, _EVALUATE.value,
                      _PLOT_METRIC.value)
  failed = [r['trial'] for r in results if r['status'] != 'done']
  print(f'{len(results) - len(failed)}/{len(results)} trials done; results in '
        f'{os.path.join(workdir, "results.md")}')
  if failed:
    print(f'{PROG}: failed trials: {", ".join(failed)}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  # Sweep files write references as `from charred import sweep; sweep.GinLiteral(...)`:
  # they get this module, not a second copy (whose flags would clash and whose
  # GinLiteral would be another class).
  sys.modules.setdefault('charred.sweep', sys.modules[__name__])
  app.run(main)
