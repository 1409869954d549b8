"""Multi-process jobs: jax.distributed start-up and the few host-side collectives.

Every process runs the same program; `jax.distributed.initialize` joins them into one
set of global devices, over which the mesh (`partitioning.make_mesh`) and the jitted
train step span. The step's own collectives are XLA's (NCCL, ICI, or gloo on CPU).
Host-side collectives (agreeing on where a resumed run stands) go through JAX as well, or
through MPI (mpi4jax) when `PartitioningConfig.collectives = 'mpi'`, for jobs launched
with mpirun.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping

import jax
import numpy as np

MPI_INSTALL_HINT = ("CUDA_ROOT=/usr/local/cuda pip install 'charred[mpi]' (mpi4jax builds "
                    "against Debian's libopenmpi-dev)")


def _launcher_world_size() -> int:
  """Processes started together by mpirun (Open MPI) or by an srun step (SLURM; not a
  batch script's own process); 1 when not launched by either."""
  for var in ('OMPI_COMM_WORLD_SIZE', 'SLURM_STEP_NUM_TASKS'):
    if os.environ.get(var, '').isdigit():
      return int(os.environ[var])
  return 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed when this is one process of several; True if it did.

  It does when any argument is given, when JAX_COORDINATOR_ADDRESS is set, or when mpirun
  or an srun step started several processes; `jax.distributed.initialize` then fills the
  arguments left None from the environment (Open MPI, SLURM, Kubernetes and Cloud TPU
  detection: e.g. `num_processes` alone on a TPU pod). Otherwise nothing happens: a single
  process needs no coordinator.
  """
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  if not (explicit or os.environ.get('JAX_COORDINATOR_ADDRESS') or
          _launcher_world_size() > 1):
    return False
  if num_processes is not None and process_id is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f'process_id {process_id} is not in [0, num_processes={num_processes}).')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def check_collectives(collectives: str) -> None:
  """Fails early when `collectives` cannot work in this job."""
  if collectives != 'mpi':
    return
  if importlib.util.find_spec('mpi4jax') is None:
    raise ImportError(f"PartitioningConfig.collectives = 'mpi' needs mpi4jax: "
                      f'{MPI_INSTALL_HINT}.')
  from mpi4py import MPI  # pylint: disable=g-import-not-at-top
  size = MPI.COMM_WORLD.Get_size()
  if size != jax.process_count():
    raise RuntimeError(f'MPI has {size} processes but JAX {jax.process_count()}: start '
                       'jax.distributed (charred.main does under mpirun) before training.')


def allgather(x: np.ndarray, collectives: str = 'xla') -> np.ndarray:
  """[process_count, *x.shape]: `x` from every process, in process order."""
  x = np.asarray(x)
  if collectives == 'mpi':
    import mpi4jax  # pylint: disable=g-import-not-at-top
    return np.asarray(jax.jit(mpi4jax.allgather)(x))
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x))


def check_same_on_all_processes(values: Mapping[str, int], collectives: str = 'xla') -> None:
  """Raises unless every process holds the same integer `values` (e.g. the resumed step:
  processes that restored different checkpoints would silently train different models)."""
  if jax.process_count() == 1 and collectives == 'xla':
    return
  names = sorted(values)
  rows = allgather(np.array([int(values[k]) for k in names], np.int32), collectives)
  for j, name in enumerate(names):
    if len(set(rows[:, j].tolist())) > 1:
      raise RuntimeError(f'Processes disagree on {name}: {rows[:, j].tolist()} (process '
                         'order); do they all see the same workdir?')


def barrier(name: str, collectives: str = 'xla') -> None:
  """Waits until every process gets here (no-op in a single process)."""
  if collectives == 'mpi':
    import mpi4jax  # pylint: disable=g-import-not-at-top
    mpi4jax.barrier()
    jax.effects_barrier()  # mpi4jax's ops are ordered effects: wait for it to run
  elif jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
