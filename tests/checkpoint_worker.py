"""Subprocesses of tests/test_checkpoints.py.

  python tests/checkpoint_worker.py train WORKDIR TRAIN_STEPS CHECKPOINT_EVERY
      A tiny training run on synthetic data (no TensorFlow, no dataset): batch n is drawn
      from a generator seeded with n, so the stream from position k is the stream from 0
      minus k batches. Prints `batch <n>` as each batch is handed over, to time signals.
  python tests/checkpoint_worker.py save_sharded DIRECTORY
      Saves `sharded_state()` laid out over all devices (run with 8).
  python tests/checkpoint_worker.py restore_sharded DIRECTORY
      Restores it onto a mesh of all devices with other shardings, checks every array bit
      for bit against `sharded_state()` and its sharding, prints `restored <n> arrays`.
  python tests/checkpoint_worker.py preemption PROCESS_ID PORT
      One of two jax.distributed processes stepping until `Preemption` says stop.
"""

import sys
import time

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from charred import tokenizer
from charred.datasets import streams
from charred.models import diffusion
from charred.models.diffusion_model import DiffusionModel
from charred.models.t5_encoder import T5EncoderConfig
from charred.models.text_to_image import TextToImageConfig
from charred.models.unet import UNetConfig
from charred.trainers import checkpoints, trainer
from charred.trainers.monitoring import MonitoringConfig
from charred.trainers.optimizer import OptimizerConfig
from charred.trainers.train_state import TrainState

BATCH_SIZE = 2


def model_config() -> TextToImageConfig:
  return TextToImageConfig(
      text_encoder=T5EncoderConfig(d_model=8, num_heads=1, head_dim=8, num_layers=1, d_ff=8),
      unet=UNetConfig(in_channels=3, out_channels=3, block_out_channels=(8,),
                      down_block_types=('DownBlock2D',), up_block_types=('UpBlock2D',),
                      layers_per_block=1, attention_head_dim=1, cross_attention_dim=8,
                      norm_num_groups=4, upcast_attention=False),
      noise_schedule=diffusion.NoiseSchedule('cosine'), prediction_type='sample',
      text_length=8, image_size=(4, 4), patch_size=1)


def train_config(train_steps: int, checkpoint_every: int) -> trainer.TrainConfig:
  return trainer.TrainConfig(
      train_steps=train_steps, batch_size=BATCH_SIZE, log_every=10**6,
      checkpointing=checkpoints.CheckpointConfig(every=checkpoint_every, keep=None),
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
      monitoring=MonitoringConfig(tensorboard=False, count_flops=False))


def batch(n: int):
  rng = np.random.default_rng(n)
  words = [''.join(rng.choice(list('abcdef'), 3)) for _ in range(BATCH_SIZE)]
  tokens, mask = tokenizer.encode_batch(words, 8)
  image = rng.uniform(-1, 1, (BATCH_SIZE, 4, 4, 3)).astype(np.float32)
  return {'image': image, 'text_tokens': tokens, 'text_mask': mask}


def batches(start: int):
  n = start
  while True:
    print(f'batch {n}', flush=True)
    yield batch(n)
    n += 1


def train(workdir: str, train_steps: str, checkpoint_every: str):
  trainer.train(workdir, DiffusionModel(model_config()), train_config(int(train_steps), int(checkpoint_every)),
                lambda: streams.RestartableIterator(batches),
                log=lambda line: print(line, flush=True))


def sharded_state() -> TrainState:
  """Host arrays of a TrainState with leaves of several ranks, shapes and dtypes."""
  rng = np.random.default_rng(0)
  params = {'w': rng.standard_normal((16, 8), np.float32),
            'conv': rng.standard_normal((3, 3, 4, 8), np.float32),
            'b': rng.standard_normal((8,), np.float32)}
  ema = {k: v + 1 for k, v in params.items()}
  opt = ({'count': np.array(7, np.int32)}, {k: v * 2 for k, v in params.items()})
  return TrainState(step=np.array(5, np.int32), params=params, ema_params=ema, opt_state=opt)


def spec(x: np.ndarray, axes: tuple[str, ...]) -> P:
  """Shards the first dimensions over `axes` where they divide, replicates the rest."""
  names, sizes = [], dict(zip(axes, MESH_SIZES[len(jax.devices())]))
  for d, axis in zip(x.shape, axes):
    names.append(axis if d % sizes[axis] == 0 else None)
  return P(*names)


# Mesh shapes by device count: 8 devices as 2 x 4, 4 as 4 x 1 (the other way round).
MESH_SIZES = {8: (2, 4), 4: (4, 1), 1: (1, 1)}


def shardings(state: TrainState, axes=('a', 'b')):
  mesh = Mesh(np.array(jax.devices()).reshape(MESH_SIZES[len(jax.devices())]), axes)
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, spec(x, axes)), state)


def save_sharded(directory: str):
  state = sharded_state()
  placed = jax.tree_util.tree_map(jax.device_put, state, shardings(state))
  print(f"w shards {placed.params['w'].addressable_shards[0].data.shape}")
  ckpt = checkpoints.Checkpointer(directory)
  ckpt.save(placed, {'position': 5})
  ckpt.wait()
  ckpt.close()


def restore_sharded(directory: str):
  """Restores onto this process's devices, with shardings other than the saved ones."""
  expected = sharded_state()
  # Axes swapped: what was split over the 2-way axis is now split over the other one.
  targets = shardings(expected, axes=('b', 'a'))
  like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
  ckpt = checkpoints.Checkpointer(directory, read_only=True)
  state, data = ckpt.restore(like, shardings=targets)
  assert data == {'position': 5}, data
  n = 0
  for got, want, target in zip(jax.tree_util.tree_leaves(state),
                               jax.tree_util.tree_leaves(expected),
                               jax.tree_util.tree_leaves(targets)):
    assert got.sharding == target, (got.sharding, target)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), want)
    n += 1
  print(f"restored {n} arrays onto {len(jax.devices())} devices; w shards "
        f"{state.params['w'].addressable_shards[0].data.shape}")


def preemption(process_id: str, port: str):
  """One of two processes stepping until Preemption says stop; prints the step."""
  jax.distributed.initialize(f'localhost:{port}', 2, int(process_id))
  watch = checkpoints.Preemption()
  print('ready', flush=True)
  for step in watch.steps(range(1, 100_000)):
    time.sleep(0.01)
    if watch.reached(step):
      print(f'stopped at step {step}', flush=True)
      return


if __name__ == '__main__':
  # As on a machine without TensorFlow (clu's writers then skip it): seconds less per run.
  sys.modules['tensorflow'] = None
  {'train': train, 'save_sharded': save_sharded, 'restore_sharded': restore_sharded,
   'preemption': preemption}[sys.argv[1]](*sys.argv[2:])
