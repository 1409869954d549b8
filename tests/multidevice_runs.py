"""Helper of test_partitioning.py and test_multihost.py: short training runs that need
several JAX devices or processes, each in a process of its own (XLA_FLAGS must be set
before JAX starts, and the pytest process has started it already).

  python tests/multidevice_runs.py meshes WORKDIR         # 8 CPU devices, several meshes
  python tests/multidevice_runs.py single WORKDIR         # 1 device, the whole batch
  python tests/multidevice_runs.py worker WORKDIR ID N PORT  # process ID of N, 2 devices

`meshes` prints one JSON line; `single` and `worker` (process 0) write WORKDIR/state.npz:
the final state read back from the run's checkpoint, one entry per leaf
('params/unet/...', 'opt_state/...'), plus 'position' and 'devices'.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]  # this checkout's charred, and test_trainer

# JAX reads XLA_FLAGS when its backend starts (first use), not on import.
import jax
from jax.experimental import multihost_utils
import numpy as np

from charred.models import diffusion
from charred.models.diffusion_model import DiffusionModel, ObjectiveConfig
from charred.models.t5_encoder import T5EncoderConfig
from charred.models.text_to_image import TextToImageConfig
from charred.models.unet import UNetConfig
from charred.trainers import checkpoints, distributed, trainer
from charred.trainers.monitoring import MonitoringConfig
from charred.trainers.optimizer import OptimizerConfig
from charred.trainers.partitioning import PartitioningConfig
import test_trainer
from conftest import repeated_batches

DEVICES = {'meshes': 8, 'single': 1, 'worker': 2}
# Compile at -O0: these runs compare numbers, not speed, and LLVM's passes dominate.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def env(mode: str) -> dict[str, str]:
  """The environment a `mode` process runs in."""
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES[mode]} '
              f'{FAST_COMPILE}')


STEPS = 2
BATCH = 8
MESHES = {  # name -> (data, fsdp, tensor); 'single' (one device) is the reference
    'single': (1, 1, 1),
    'data8': (-1, 1, 1),
    'data2_fsdp4': (2, 4, 1),
    'fsdp4_tensor2': (1, 4, 2),
}
# A kernel that only 'fsdp' shards (a 3x3x16x16 conv: its conv_in), and one whose 'heads'
# dimension 'tensor' shards (embed x heads).
FSDP_KERNEL = ('unet', 'down_blocks_0', 'resnets_0', 'conv2', 'kernel')
TENSOR_KERNEL = ('text_encoder', 'encoder', 'layers_0', 'attention', 'query', 'kernel')


def nano_model():
  """The smallest TextToImage with every kind of layer (cross-attention included); its
  widths (16) divide 8 devices, so every large weight can be sharded."""
  return TextToImageConfig(
      text_encoder=T5EncoderConfig(d_model=16, num_heads=2, head_dim=8, num_layers=1, d_ff=32),
      unet=UNetConfig(in_channels=12, out_channels=12, block_out_channels=(16,),
                      down_block_types=('CrossAttnDownBlock2D',),
                      up_block_types=('CrossAttnUpBlock2D',), layers_per_block=1,
                      attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8,
                      upcast_attention=False),
      noise_schedule=diffusion.NoiseSchedule('cosine'), prediction_type='sample',
      text_length=16, image_size=(8, 16), patch_size=2)


def train_config(data: int, fsdp: int, tensor: int):
  return trainer.TrainConfig(
      train_steps=STEPS, batch_size=BATCH, log_every=1000,
      checkpointing=checkpoints.CheckpointConfig(every=1000),  # and at the last step
      # SGD: updates proportional to the gradients. (Adam moves every weight by about the
      # learning rate however small its gradient, so the float noise of a near-zero
      # gradient, which differs with the summation order of each mesh, becomes a
      # difference of the order of the update.) Adam's state sharding is tested apart.
      optimizer=OptimizerConfig(kind='sgd', learning_rate=1.0, warmup_steps=0,
                                weight_decay=0.0),
      monitoring=MonitoringConfig(tensorboard=False, count_flops=False),
      partitioning=PartitioningConfig(data=data, fsdp=fsdp, tensor=tensor))


def fixed_batch():
  return test_trainer.fixed_batch(BATCH)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def rel_diff(a, b) -> float:
  """max over leaves of max |a - b| / max(|a|, |b|)."""
  worst = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.max(np.abs(x), initial=0), np.max(np.abs(y), initial=0), 1e-30)
    worst = max(worst, float(np.max(np.abs(x - y), initial=0) / scale))
  return worst


def _device0_fraction(tree) -> float:
  """Bytes of `tree` that device 0 holds / bytes of `tree` (1: all replicated)."""
  d0 = jax.devices()[0]
  leaves = jax.tree_util.tree_leaves(tree)
  held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d0)
  return held / sum(x.nbytes for x in leaves)


def _train(workdir, config, batch):
  model = DiffusionModel(nano_model(), ObjectiveConfig(caption_dropout=0.25))
  return trainer.train(workdir, model, config, repeated_batches(lambda: batch),
                       log=lambda s: None)


def meshes(workdir):
  assert jax.device_count() == 8, jax.devices()
  batch = fixed_batch()
  states = {name: _train(os.path.join(workdir, name), train_config(*shape), batch)
            for name, shape in MESHES.items()}
  ref = states['single']
  out = {}
  for name, state in states.items():
    kernel = _get(state.params, FSDP_KERNEL)
    moments = [x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
          if tuple(getattr(k, 'key', None) for k in p[-len(FSDP_KERNEL):]) == FSDP_KERNEL]
    out[name] = {
        'devices': len(kernel.sharding.device_set),
        'params': rel_diff(state.params, ref.params),
        'ema': rel_diff(state.ema_params, ref.ema_params),
        'opt_state': rel_diff(state.opt_state, ref.opt_state),
        'bias_moved': float(np.max(np.abs(_get(state.params, FSDP_KERNEL[:-1] + ('bias',))))),
        'fsdp_kernel': [str(kernel.sharding.spec), kernel.addressable_shards[0].data.shape],
        'fsdp_kernel_ema': str(_get(state.ema_params, FSDP_KERNEL).sharding.spec),
        'fsdp_kernel_opt': sorted({str(x.sharding.spec) for x in moments}),
        'tensor_kernel': str(_get(state.params, TENSOR_KERNEL).sharding.spec),
        'device0_fraction': {k: _device0_fraction(getattr(state, k))
                             for k in ('params', 'ema_params', 'opt_state')},
    }
  print(json.dumps(out))


def _save_final(workdir, like):
  """The state read back from the run's newest checkpoint, gathered whole, to npz."""
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state, data_state = ckpt.restore(like)  # onto the run's own shardings
  ckpt.close()
  state = multihost_utils.process_allgather(state, tiled=True)
  if jax.process_index() == 0:
    leaves = {jax.tree_util.keystr(p, simple=True, separator='/'): x
              for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    np.savez(os.path.join(workdir, 'state.npz'), **leaves,
             position=np.array(data_state['position']), devices=np.array(jax.device_count()))


def single(workdir):
  _save_final(workdir, _train(workdir, train_config(1, 1, 1), fixed_batch()))


def worker(workdir, process_id, num_processes, port):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # cross-process on CPU
  assert distributed.initialize(f'localhost:{port}', num_processes, process_id)
  assert jax.device_count() == 2 * num_processes, jax.devices()
  rows = BATCH // num_processes
  local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in fixed_batch().items()}
  # 'data' spans the processes, 'fsdp' the two devices of each.
  state = _train(workdir, train_config(-1, 2, 1), local)
  _save_final(workdir, state)


if __name__ == '__main__':
  mode, args = sys.argv[1], sys.argv[2:]
  if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ.update(env(mode))  # before JAX starts
  {'meshes': meshes, 'single': single, 'worker': lambda w, *a: worker(w, *map(int, a))}[
      mode](*args)
