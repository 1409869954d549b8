"""Mesh sizing, logical axis rules, state shardings, and sharded train steps that equal
the single-device step (8 CPU devices, in a process of their own)."""

import dataclasses
import importlib.util
import json
import subprocess
import sys

import jax
from jax.sharding import AbstractMesh, PartitionSpec as P
import numpy as np
import optax
import pytest

from charred.models import pretrained
from charred.models.diffusion_model import DiffusionModel
from charred.trainers import distributed, partitioning, trainer
from charred.trainers.optimizer import OptimizerConfig
from charred.trainers.partitioning import DEFAULT_RULES, MESH_AXES, PartitioningConfig
from charred.trainers.train_state import TrainState
import multidevice_runs
from multidevice_runs import nano_model


def test_mesh_shape_resolves_minus_one_and_rejects_what_cannot_fit():
  shape = partitioning.mesh_shape
  assert shape(PartitioningConfig(), 8) == (8, 1, 1)
  assert shape(PartitioningConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  assert shape(PartitioningConfig(data=1), 8) == (1, 1, 1)  # the first device only
  with pytest.raises(ValueError, match='the product 3 does not divide the 8 devices'):
    shape(PartitioningConfig(fsdp=3), 8)
  with pytest.raises(ValueError, match='at most one of them -1'):
    shape(PartitioningConfig(data=-1, fsdp=-1), 8)
  with pytest.raises(ValueError, match='positive'):
    shape(PartitioningConfig(tensor=0), 8)
  with pytest.raises(ValueError, match="'xla' or 'mpi'"):
    PartitioningConfig(collectives='nccl')
  with pytest.raises(ValueError, match=r"entry \('embed', 'model'\): expected"):
    PartitioningConfig(logical_axis_rules=(('batch', 'data'), ('embed', 'model')))


def test_make_mesh_on_this_host():
  mesh = partitioning.make_mesh(PartitioningConfig())
  assert mesh.axis_names == MESH_AXES
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1, 'tensor': 1}


def test_rules_shard_what_divides_and_replicate_the_rest():
  sizes = {'data': 2, 'fsdp': 4, 'tensor': 2}
  spec = lambda names, shape, s=sizes: partitioning.logical_to_mesh_spec(
      names, shape, DEFAULT_RULES, s)
  assert spec(('embed', 'heads'), (64, 32)) == P('fsdp', 'tensor')
  assert spec(('heads', 'embed'), (32, 64)) == P('tensor', 'fsdp')
  assert spec(('embed', 'heads'), (6, 32)) == P(None, 'tensor')  # 6 % 4: replicated
  conv = ('conv_height', 'conv_width', 'conv_in', 'conv_out')
  assert spec(conv, (3, 3, 12, 16)) == P(None, None, 'fsdp')
  assert spec(conv, (3, 3, 6, 16)) == P(None, None, None, 'fsdp')  # falls to conv_out
  assert spec(conv, (3, 3, 3, 5)) == P()  # a tiny kernel: nothing divides, no error
  assert spec(('norm',), (64,)) == P()
  assert spec(('batch',), (8,)) == P(('data', 'fsdp'))
  assert spec(('unknown_name', 'embed'), (8, 8)) == P(None, 'fsdp')
  # With tensor = 1, heads and mlp fall back to 'fsdp' when 'embed' could not take it.
  no_tp = {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert spec(('heads', 'embed'), (32, 64), no_tp) == P('fsdp')
  assert spec(('embed', 'mlp'), (6, 64), no_tp) == P(None, 'fsdp')
  assert spec(('embed', 'mlp'), (64, 64), {'data': 8, 'fsdp': 1, 'tensor': 1}) == P()


def _model_axis_names():
  """Every logical axis name the models use, with the optional layers switched on."""
  c = nano_model()
  c = dataclasses.replace(c, unet=dataclasses.replace(
      c.unet, position_embedding=True, encoder_hid_dim=16, cross_attention_dim=24))
  specs = DiffusionModel(c).param_axes()
  return {name for s in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
          for name in s}


def test_every_logical_axis_name_has_a_rule():
  names = _model_axis_names()
  assert {'embed', 'cross_embed', 'heads', 'mlp', 'vocab', 'conv_in', 'norm',
          'height', 'relpos_buckets'} <= names
  assert names <= {name for name, _ in DEFAULT_RULES}


def test_state_shardings_follow_parameters_into_the_optimizer_state():
  """Adam's mu and nu take their parameter's sharding, found by name and shape; the
  step and Adam's count are replicated. No devices needed: an abstract 2x4x1 mesh."""
  mesh = AbstractMesh((2, 4, 1), MESH_AXES)
  params = {'dense': {'kernel': np.zeros((16, 8), np.float32),
                      'bias': np.zeros((8,), np.float32)},
            'norm': {'scale': np.zeros((16,), np.float32)}}
  axes = {'dense': {'kernel': P('embed', 'mlp'), 'bias': P('mlp')},
          'norm': {'scale': P('norm')}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = jax.eval_shape(lambda: TrainState(step=np.int32(0), params=params,
                                            ema_params=params, opt_state=tx.init(params)))
  shardings = partitioning.state_shardings(mesh, DEFAULT_RULES, state, axes)
  assert shardings.params['dense']['kernel'].spec == P('fsdp')
  assert shardings.params['dense']['bias'].spec == P('fsdp')  # mlp falls back to fsdp
  assert shardings.params['norm']['scale'].spec == P()
  assert shardings.ema_params['dense']['kernel'].spec == P('fsdp')
  adam = shardings.opt_state[1][0]
  assert adam.mu['dense']['kernel'].spec == adam.nu['dense']['kernel'].spec == P('fsdp')
  assert adam.count.spec == P() and shardings.step.spec == P()


def test_state_shardings_of_the_model_shard_large_weights():
  mesh = AbstractMesh((1, 8, 1), MESH_AXES)
  config = dataclasses.replace(multidevice_runs.train_config(1, 8, 1),
                               optimizer=OptimizerConfig(kind='adamw'))
  model = DiffusionModel(nano_model())
  shardings = trainer.state_shardings(model, config, trainer.make_tx(config), mesh)
  specs = jax.tree_util.tree_leaves(shardings.params)
  sharded = [s for s in specs if s.spec != P()]
  assert len(sharded) > len(specs) // 2
  flat = jax.tree_util.tree_leaves(shardings.opt_state)
  assert sum(s.spec != P() for s in flat) == 2 * len(sharded)  # Adam's mu and nu


def test_single_process_feeds_the_whole_batch():
  mesh = partitioning.make_mesh(PartitioningConfig())
  sharding = partitioning.batch_sharding(mesh, DEFAULT_RULES)
  assert partitioning.process_batch_shard(sharding) == (0, 1)


def test_mpi_collectives_without_mpi4jax_is_a_clear_error():
  if importlib.util.find_spec('mpi4jax') is not None:
    pytest.skip('mpi4jax is installed')
  with pytest.raises(ImportError,
                     match=r"collectives = 'mpi' needs mpi4jax: .*pip install 'charred\[mpi\]'"):
    distributed.check_collectives('mpi')
  distributed.check_collectives('xla')


def test_single_process_needs_no_coordinator(monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'OMPI_COMM_WORLD_SIZE', 'SLURM_STEP_NUM_TASKS'):
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize() is False
  with pytest.raises(ValueError, match=r'process_id 2 is not in \[0, num_processes=2\)'):
    distributed.initialize('localhost:1', 2, 2)


@pytest.mark.slow
def test_sharded_steps_equal_the_single_device_step(tmp_path):
  proc = subprocess.run([sys.executable, multidevice_runs.__file__, 'meshes', str(tmp_path)],
                        env=multidevice_runs.env('meshes'), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, run in runs.items():
    assert run['devices'] == (1 if name == 'single' else 8), name
    # Only the float summation order differs across meshes. Relative to each leaf's
    # largest value: for a zero-initialised bias, relative to what the steps moved it.
    # The optimizer state is SGD's momentum, i.e. raw gradients: the noisiest part.
    assert run['params'] <= 1e-5 and run['ema'] <= 1e-5, (name, run)
    assert run['opt_state'] <= 5e-5, (name, run)
    assert run['bias_moved'] > 1e-4, (name, run)  # the steps did train
  assert runs['data8']['fsdp_kernel'] == ['P()', [3, 3, 16, 16]]
  for name in ('data2_fsdp4', 'fsdp4_tensor2'):
    run = runs[name]
    # conv_in (16) over fsdp (4): each device holds a quarter, in params, EMA and Adam.
    assert run['fsdp_kernel'] == ["P(None, None, 'fsdp')", [3, 3, 4, 16]], run
    assert run['fsdp_kernel_ema'] == "P(None, None, 'fsdp')"
    assert run['fsdp_kernel_opt'] == ["P(None, None, 'fsdp')"]
    for part in ('params', 'ema_params', 'opt_state'):
      assert run['device0_fraction'][part] < 0.35, (name, part, run)
  assert runs['data2_fsdp4']['tensor_kernel'] == "P('fsdp',)"
  assert runs['fsdp4_tensor2']['tensor_kernel'] == "P('fsdp', 'tensor')"
  assert runs['fsdp4_tensor2']['device0_fraction']['params'] < (
      runs['data2_fsdp4']['device0_fraction']['params'])


def test_sharded_state_starts_from_a_pretrained_unet(tmp_path):
  """Random parts are initialised under jit, the named checkpoint is read on the host and
  placed onto the same shardings; EMA starts equal to it."""
  from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
  from test_pretrained_init import _write_random  # pylint: disable=g-import-not-at-top
  config = nano_model()
  path, unet = _write_random(tmp_path, 'unet', config.unet, 2)
  model = DiffusionModel(config)
  train_config = multidevice_runs.train_config(-1, 1, 1)
  mesh = partitioning.make_mesh(train_config.partitioning)
  state = trainer.create_sharded_state(model, train_config, trainer.make_tx(train_config),
                                       mesh, init=pretrained.InitConfig(unet=path))
  got = flatten_dict(state.params['unet'], sep='/')
  ema = flatten_dict(state.ema_params['unet'], sep='/')
  assert set(got) == set(unet)
  for name, value in unet.items():
    np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
    np.testing.assert_array_equal(np.asarray(ema[name]), value, err_msg=name)
    assert got[name].sharding.mesh == mesh
  assert int(state.step) == 0
