"""Multi-process training on localhost, per-host data shards, and the MPI path."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import multidevice_runs


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(mode, workdir, *args):
  return subprocess.Popen([sys.executable, multidevice_runs.__file__, mode, str(workdir),
                           *map(str, args)], env=multidevice_runs.env(mode),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
  assert proc.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_train_like_one_on_the_global_batch(tmp_path):
  """Two processes (2 CPU devices each: 'data' across them, 'fsdp' within) train on
  their halves of a fixed batch, checkpoint together, and end where one process on one
  device ends with the whole batch."""
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  port = _free_port()
  procs = [_start('worker', multi, i, 2, port) for i in range(2)]
  procs.append(_start('single', single))  # meanwhile, the reference
  for proc in procs:
    _finish(proc)
  a, b = np.load(multi / 'state.npz'), np.load(single / 'state.npz')
  assert int(a['devices']) == 4 and int(b['devices']) == 1
  assert int(a['position']) == int(b['position']) == multidevice_runs.STEPS
  leaves = [k for k in b.files if k.startswith(('params/', 'ema_params/', 'opt_state/'))]
  assert len(leaves) > 100 and sorted(a.files) == sorted(b.files)
  worst = {part: max(multidevice_runs.rel_diff(a[k], b[k]) for k in leaves
                     if k.startswith(part)) for part in ('params', 'ema_params', 'opt_state')}
  # As across meshes (test_partitioning): float summation order only.
  assert worst['params'] <= 1e-5 and worst['ema_params'] <= 1e-5, worst
  assert worst['opt_state'] <= 5e-5, worst
  # A zero-initialised bias has moved far more than that: the steps did train.
  bias = 'params/' + '/'.join(multidevice_runs.FSDP_KERNEL[:-1]) + '/bias'
  assert np.max(np.abs(b[bias])) > 1e-4
  # The checkpoint was written once, by the two processes together.
  assert sorted(os.listdir(multi / 'checkpoints')) == [str(multidevice_runs.STEPS)]


@pytest.fixture(scope='module')
def micro_task(micro_data_dir):
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.prepare('micro', micro_data_dir)
  return pipeline.register_task('micro', micro_data_dir)


def test_host_shards_concatenate_to_the_one_host_stream(micro_task):
  """Shard i of n yields rows [i*b, (i+1)*b) of every global batch of n*b rows, across
  epoch boundaries and from any resume point, and every shard stops together."""
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  make = lambda b, **kw: pipeline.make_iterator(micro_task, 'train', b, 16, seed=3, **kw)
  # 256 examples / 24 = 10.7 batches per epoch: batch 10 straddles epochs 0 and 1.
  whole = make(24)
  expected = [next(whole) for _ in range(12)]
  shards = [make(8, shard_index=i, shard_count=3) for i in range(3)]
  for k in range(12):
    parts = [next(s) for s in shards]
    for key in expected[k]:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                    expected[k][key], err_msg=f'batch {k} {key}')
  resumed = make(8, shard_index=2, shard_count=3, start_batch=10)
  for k in (10, 11):
    np.testing.assert_array_equal(next(resumed)['caption'], expected[k]['caption'][16:])
  # Without repeat, each shard yields the complete global batches only: 32 // 12 = 2.
  ends = [list(pipeline.make_iterator(micro_task, 'validation', 4, 16, shuffle=False,
                                      repeat=False, shard_index=i, shard_count=3))
          for i in range(3)]
  assert [len(e) for e in ends] == [2, 2, 2]
  with pytest.raises(ValueError, match=r'shard_index 3 is not in \[0, shard_count=3\)'):
    next(make(8, shard_index=3, shard_count=3))


@pytest.mark.skipif(importlib.util.find_spec('mpi4jax') is None or not shutil.which('mpirun'),
                    reason='needs mpi4jax and mpirun: pip install charred[mpi]')
def test_mpi_collectives_under_mpirun():
  """Under mpirun, charred.trainers.distributed joins the processes (Open MPI detection)
  and gathers over MPI with mpi4jax."""
  script = ('import numpy as np, jax\n'
            'from charred.trainers import distributed\n'
            'assert distributed.initialize()\n'
            'distributed.check_collectives("mpi")\n'
            'rows = distributed.allgather(np.array([jax.process_index()]), "mpi")\n'
            'assert rows.ravel().tolist() == [0, 1], rows\n'
            'distributed.check_same_on_all_processes({"step": 7}, "mpi")\n'
            'try:\n'
            '  distributed.check_same_on_all_processes({"step": jax.process_index()}, "mpi")\n'
            'except RuntimeError as e:\n'
            '  print(e)\n'
            'distributed.barrier("end", "mpi")\n')
  env = dict(multidevice_runs.env('single'), OMPI_ALLOW_RUN_AS_ROOT='1',
             OMPI_ALLOW_RUN_AS_ROOT_CONFIRM='1')
  proc = subprocess.run(['mpirun', '-n', '2', '--oversubscribe', sys.executable, '-c', script],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count('Processes disagree on step: [0, 1]') == 2, proc.stdout
