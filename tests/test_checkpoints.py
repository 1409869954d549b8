"""Checkpoints: asynchronous saves, keep policies, other meshes, damaged steps, SIGTERM,
and kill -9 at random moments, each resumed run compared with an uninterrupted one."""

import asyncio
import glob
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from charred.trainers import checkpoints, trainer
from charred.trainers.train_state import TrainState
from conftest import REPO

WORKER = os.path.join(REPO, 'tests', 'checkpoint_worker.py')


def small_state(i: int, n: int = 64) -> TrainState:
  params = {'w': jnp.full((n, 32), float(i)), 'b': jnp.arange(8.0) + i}
  return TrainState(step=jnp.array(i, jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(lambda x: x * 2, params),
                    opt_state=({'count': jnp.array(i, jnp.int32)},
                               jax.tree_util.tree_map(lambda x: x * 3, params)))


def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_same(a, b):
  a, b = leaves(a), leaves(b)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def step_dirs(directory) -> list[int]:
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_keep_last_n_and_every_m(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2, keep_every=4)
  for i in range(1, 11):
    ckpt.save(small_state(i), {'position': i})
  ckpt.wait()
  ckpt.close()
  # The newest two (9, 10) and the multiples of 4 (4, 8).
  assert step_dirs(tmp_path) == [4, 8, 9, 10]
  state, data = checkpoints.Checkpointer(str(tmp_path), read_only=True).restore(
      small_state(0), step=4)
  assert_same(state, small_state(4))
  assert data == {'position': 4}


def test_keep_all_and_bad_policies(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=None)
  for i in range(1, 6):
    ckpt.save(small_state(i), {'position': i})
  ckpt.close()
  assert step_dirs(tmp_path) == [1, 2, 3, 4, 5]
  with pytest.raises(ValueError, match='max_to_keep must be None or an integer >= 1'):
    checkpoints.Checkpointer(str(tmp_path), max_to_keep=0)
  with pytest.raises(ValueError, match=r'multiple of every \(4\)'):
    checkpoints.CheckpointConfig(every=4, keep_every=6)
  with pytest.raises(ValueError, match='opened read-only'):
    checkpoints.Checkpointer(str(tmp_path), read_only=True).save(small_state(6), {})


def _hold_commits(monkeypatch):
  """Holds every checkpoint's commit (the rename into place) until the event is set."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  release = threading.Event()
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def held_finalize(self):
    await asyncio.to_thread(release.wait, 60)
    await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', held_finalize)
  return release


def test_save_returns_before_the_write_and_is_safe_from_donation(tmp_path, monkeypatch):
  """The loop goes on while a save is written; the arrays it donates to the next step
  (overwriting their buffers) must not leak into the checkpoint."""
  release = _hold_commits(monkeypatch)
  state = small_state(3, n=1 << 16)  # 8 MiB per leaf
  expected = leaves(state)
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  try:
    ckpt.save(state, {'position': 3})
    assert not os.path.exists(tmp_path / '3')  # save() returned; the write goes on
    assert ckpt.manager.is_saving_in_progress()
    bump = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x + 1, s), donate_argnums=0)
    for _ in range(3):
      state = bump(state)
    jax.block_until_ready(state)
  finally:
    release.set()
  ckpt.wait()
  assert step_dirs(tmp_path) == [3]
  restored, _ = ckpt.restore(small_state(0, n=1 << 16))
  for got, want in zip(leaves(restored), expected):
    np.testing.assert_array_equal(got, want)
  ckpt.close()


def test_synchronous_save_is_written_on_return(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(small_state(2), {'position': 2})
  assert step_dirs(tmp_path) == [2]
  ckpt.close()


def _run_worker(*args, devices: int):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  proc = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_restore_onto_other_meshes(tmp_path):
  """Saved sharded over 8 devices (2 x 4 mesh); restored bit for bit onto 4 devices and
  onto 1, with other shardings, in fresh processes (and in this one)."""
  import checkpoint_worker  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'ckpt')
  assert 'w shards (8, 2)' in _run_worker('save_sharded', directory, devices=8)
  assert 'restored 11 arrays onto 4 devices; w shards (4, 8)' in _run_worker(
      'restore_sharded', directory, devices=4)
  assert len(jax.devices()) == 1
  checkpoint_worker.restore_sharded(directory)
  # No sharding anywhere (an abstract state from jax.eval_shape): placed on this device.
  expected = checkpoint_worker.sharded_state()
  like = jax.eval_shape(lambda: jax.tree_util.tree_map(jnp.asarray, expected))
  state, _ = checkpoints.Checkpointer(directory, read_only=True).restore(like)
  assert_same(state, expected)


# --- Damaged checkpoints ------------------------------------------------------------------


def _truncate_arrays(step_dir):
  for f in glob.glob(f'{step_dir}/state/**/d/*', recursive=True):
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _delete_arrays(step_dir):
  for f in glob.glob(f'{step_dir}/state/**/d/*', recursive=True):
    os.remove(f)


def _garbage(name):
  def damage(step_dir):
    with open(os.path.join(step_dir, name), 'w') as f:
      f.write('\x00 not json {')
  return damage


def _remove(name):
  return lambda step_dir: os.remove(os.path.join(step_dir, name))


# Failed reads leave Orbax's and tensorstore's asyncio work half-done behind: noise.
READ_ERRORS_NOISE = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning',
    'ignore:coroutine .* was never awaited:RuntimeWarning')

DAMAGES = {'truncated arrays': _truncate_arrays, 'deleted arrays': _delete_arrays,
           'garbage tree metadata': _garbage('state/_METADATA'),
           'garbage data state': _garbage('data/metadata'),
           'missing manifest': _remove('state/manifest.ocdbt')}


def _files(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


@READ_ERRORS_NOISE
@pytest.mark.parametrize('damage', list(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_and_is_kept(tmp_path, caplog, damage):
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  for i in (1, 2, 3):
    ckpt.save(small_state(i), {'position': i})
  ckpt.close()
  DAMAGES[damage](tmp_path / '3')
  damaged = _files(tmp_path / '3')

  with caplog.at_level(logging.WARNING):
    state, data = checkpoints.Checkpointer(str(tmp_path), read_only=True).restore(
        small_state(0))
  assert_same(state, small_state(2))
  assert data == {'position': 2}
  assert any('step 3' in r.getMessage() and 'cannot be restored' in r.getMessage()
             for r in caplog.records), caplog.text
  assert _files(tmp_path / '3') == damaged  # read-only: untouched

  # Training resumes with set_aside: the damaged step moves aside, intact, and can be
  # written again.
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  state, _ = ckpt.restore(small_state(0), set_aside=True)
  assert_same(state, small_state(2))
  assert sorted(os.listdir(tmp_path)) == ['1', '2', '3.unrestorable']
  assert _files(tmp_path / '3.unrestorable') == damaged
  ckpt.save(small_state(3), {'position': 3})
  ckpt.close()
  state, _ = checkpoints.Checkpointer(str(tmp_path), read_only=True).restore(small_state(0))
  assert_same(state, small_state(3))


@READ_ERRORS_NOISE
def test_no_restorable_checkpoint_is_one_clear_error(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  for i in (1, 2):
    ckpt.save(small_state(i), {'position': i})
  ckpt.close()
  _truncate_arrays(tmp_path / '2')
  _garbage('data/metadata')(tmp_path / '1')
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.Checkpointer(str(tmp_path)).restore(small_state(0), set_aside=True)
  message = str(e.value)
  assert '\n' not in message
  assert re.search(r'can be restored: step 2: .*; step 1: JSONDecodeError', message), message
  assert step_dirs(tmp_path) == [1, 2]  # nothing moved when nothing could be restored
  with pytest.raises(checkpoints.CheckpointError, match='step 2 under .* cannot be restored'):
    checkpoints.Checkpointer(str(tmp_path), read_only=True).restore(small_state(0), step=2)
  with pytest.raises(checkpoints.CheckpointError, match='No checkpoint under'):
    checkpoints.Checkpointer(str(tmp_path / 'empty')).restore(small_state(0))


def test_sigterm_handler_lives_only_inside_the_loop():
  before = signal.getsignal(signal.SIGTERM)
  preemption = checkpoints.Preemption()
  for step in preemption.steps(range(1, 10)):
    assert not preemption.reached(step)
    signal.raise_signal(signal.SIGTERM)  # handled: sets the flag
    assert preemption.reached(step)
    break
  assert signal.getsignal(signal.SIGTERM) is before


def test_a_loop_ending_in_an_exception_still_writes_its_saves(tmp_path, monkeypatch):
  """An exception may end the process, and with it Orbax's writer: the loop finishes the
  saves already started (and puts the SIGTERM handler back) before it propagates."""
  before = signal.getsignal(signal.SIGTERM)
  release = _hold_commits(monkeypatch)
  threading.Timer(0.5, release.set).start()
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  with pytest.raises(ZeroDivisionError):
    for step in checkpoints.Preemption(ckpt).steps(range(1, 3)):
      assert signal.getsignal(signal.SIGTERM) is not before
      ckpt.save(small_state(step), {'position': step})
      _ = 1 / 0
  assert step_dirs(tmp_path) == [1]
  assert signal.getsignal(signal.SIGTERM) is before
  ckpt.close()


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step():
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, WORKER, 'preemption', str(i), str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    for proc in procs:
      assert proc.stdout.readline().strip() == 'ready', proc.stderr.read()[-2000:]
    time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    outs = [proc.communicate(timeout=60)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  steps = [re.search(r'stopped at step (\d+)', out) for out in outs]
  assert all(steps), outs
  assert steps[0][1] == steps[1][1]


# --- Interrupted training runs, in subprocesses -------------------------------------------

TRAIN_STEPS = 24
CHECKPOINT_EVERY = 3


def _train(workdir, env):
  """A run of the worker; stderr goes to a file (a pipe nobody reads could fill up)."""
  n = len(glob.glob(f'{workdir}.stderr_*.txt'))
  with open(f'{workdir}.stderr_{n}.txt', 'w') as stderr:
    proc = subprocess.Popen(
        [sys.executable, WORKER, 'train', str(workdir), str(TRAIN_STEPS),
         str(CHECKPOINT_EVERY)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
  proc.stderr_path = stderr.name
  return proc


def _stderr(proc):
  with open(proc.stderr_path) as f:
    return f.read()


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, _stderr(proc)[-3000:]
  return out, _stderr(proc)


def _wait_for_batch(proc, n, lines):
  """Reads the run's output until it asks for batch `n`."""
  for line in proc.stdout:
    lines.append(line)
    if line.strip() == f'batch {n}':
      return
  proc.wait()
  raise AssertionError(f'the run ended before batch {n}:\n{"".join(lines)[-2000:]}\n'
                       f'{_stderr(proc)[-2000:]}')


def _resumed_from(out):
  match = re.search(r'Resumed from step (\d+) \(data position (\d+)\)', out)
  assert match and match[1] == match[2], out[-2000:]
  return int(match[1])


def read_checkpoint(workdir, step):
  """(flat {name: array}, data state) read with plain Orbax, not the code under test."""
  path = os.path.join(workdir, 'checkpoints', str(step))
  with ocp.PyTreeCheckpointer() as reader:
    meta = reader.metadata(os.path.join(path, 'state'))
    meta = getattr(meta, 'item_metadata', None) or getattr(meta, 'tree', meta)
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = reader.restore(os.path.join(path, 'state'),
                          args=ocp.args.PyTreeRestore(restore_args=args))
  with open(os.path.join(path, 'data', 'metadata')) as f:
    data = json.load(f)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}, data


def assert_checkpoints_equal(workdir, reference, step):
  got, data = read_checkpoint(workdir, step)
  want, want_data = read_checkpoint(reference, step)
  assert data == want_data == {'position': step, 'iterator': {'next_index': step}}
  assert got.keys() == want.keys() and len(got) > 10
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=f'step {step} {name}')


@pytest.mark.slow
def test_sigterm_and_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
  """One run interrupted six times, each time resumed by the next process: first a SIGTERM
  (checkpoint of the current step, clean exit), then five kill -9s at seeded random
  moments; before the last resume its newest checkpoint is damaged. Every checkpoint
  complete at a kill survives it, and every checkpoint written, the final one included,
  equals the uninterrupted run's bit for bit (parameters, EMA, optimizer state, step,
  data position)."""
  # One XLA compilation cache for all runs: each process after the first loads the
  # executables instead of compiling them. LLVM's optimisations off: the first compile
  # takes a third of the time, and every run uses the same executables anyway.
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
             ' --xla_llvm_disable_expensive_passes=true')
  reference = tmp_path / 'reference'
  _finish(_train(reference, env))
  everything = list(range(CHECKPOINT_EVERY, TRAIN_STEPS + 1, CHECKPOINT_EVERY))
  assert step_dirs(reference / 'checkpoints') == everything

  workdir = tmp_path / 'run'
  ckpt_dir = workdir / 'checkpoints'
  # SIGTERM while step 4 runs: the loop notices after it, checkpoints it although the
  # cadence (3) does not call for it, and exits cleanly.
  proc = _train(workdir, env)
  lines = []
  _wait_for_batch(proc, 3, lines)
  proc.send_signal(signal.SIGTERM)
  out, _ = _finish(proc, timeout=120)
  match = re.search(r'Stopped at step (\d+) on SIGTERM', out)
  assert match, ''.join(lines) + out
  resumed = int(match[1])
  assert 4 <= resumed < TRAIN_STEPS
  assert step_dirs(ckpt_dir)[-1] == resumed
  assert read_checkpoint(workdir, resumed)[1] == {'position': resumed,
                                                 'iterator': {'next_index': resumed}}

  rng = np.random.default_rng(1234)
  mid_save = 0
  for trial in range(5):
    proc = _train(workdir, env)
    lines = []
    _wait_for_batch(proc, int(rng.integers(3 * trial + 4, 3 * trial + 7)), lines)
    time.sleep(rng.uniform(0.0, 0.2))  # mid-step, mid-save or between
    complete = step_dirs(ckpt_dir)
    assert proc.poll() is None, 'the run ended before its kill'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mid_save += any('orbax-checkpoint-tmp' in n for n in os.listdir(ckpt_dir))
    # Each run went on from the newest checkpoint that the previous one left.
    assert _resumed_from(''.join(lines)) == resumed
    after = step_dirs(ckpt_dir)
    assert set(complete) <= set(after), (complete, after)  # nothing complete is lost
    resumed = after[-1]
  print(f'{mid_save} of 5 kills left a checkpoint half-written')

  # A damaged newest checkpoint: the last run warns, resumes from the one before, and
  # keeps the damaged one aside, as it was.
  *_, previous, newest = step_dirs(ckpt_dir)
  _truncate_arrays(ckpt_dir / str(newest))
  damaged = _files(ckpt_dir / str(newest))
  out, err = _finish(_train(workdir, env))
  assert f'Checkpoint step {newest} under' in err, err[-3000:]
  assert _resumed_from(out) == previous
  assert _files(ckpt_dir / f'{newest}.unrestorable') == damaged

  written = step_dirs(ckpt_dir)
  assert set(everything) <= set(written) and written[-1] == TRAIN_STEPS
  for step in everything:
    assert_checkpoints_equal(workdir, reference, step)
