"""Models against references written by other projects (diffusers 0.39 Flax, t5x)."""

import json
import os

from flax import serialization
from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp
import numpy as np

from charred.models.t5_encoder import T5Encoder, T5EncoderConfig
from charred.models.text_to_image import depth_to_space, space_to_depth
from charred.models.unet import UNet, UNetConfig

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
UNET_KEYS = ('sample_size', 'in_channels', 'out_channels', 'down_block_types',
             'up_block_types', 'block_out_channels', 'layers_per_block', 'attention_head_dim',
             'cross_attention_dim', 'use_linear_projection', 'flip_sin_to_cos', 'freq_shift')


def _diffusers_flax_unet():
  d = os.path.join(FIXTURES, 'diffusers_flax')
  with open(os.path.join(d, 'unet', 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(d, 'unet', 'diffusion_flax_model.msgpack'), 'rb') as f:
    params = serialization.msgpack_restore(f.read())
  # diffusers' Flax port used tanh-GELU and GroupNorm eps 1e-5 in its transformer blocks.
  c = UNetConfig(**{k: config[k] for k in UNET_KEYS}, upcast_attention=False,
                 gelu_approximate=True, transformer_norm_eps=1e-5)
  return UNet(c), params, np.load(os.path.join(d, 'unet_reference.npz'))


def test_unet_matches_diffusers_flax_reference_output():
  model, params, ref = _diffusers_flax_unet()
  sample = np.transpose(ref['sample'], (0, 2, 3, 1))  # NCHW -> NHWC
  out = model.apply({'params': params}, sample, ref['timesteps'], ref['encoder_hidden_states'])
  out = np.transpose(np.asarray(out), (0, 3, 1, 2))
  expected = ref['output']
  assert np.abs(out - expected).max() / np.abs(expected).max() <= 1e-5


def test_unet_parameter_tree_is_diffusers_flax_tree():
  model, params, ref = _diffusers_flax_unet()
  sample = np.zeros((1, 8, 8, 4), np.float32)
  ours = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, jnp.zeros((1,)),
                        jnp.zeros((1, 7, 24)))['params']
  theirs = {k: v.shape for k, v in flatten_dict(params).items()}
  assert {k: v.shape for k, v in flatten_dict(ours).items()} == theirs


def test_unet_cross_attention_ignores_masked_text_positions():
  model, params, ref = _diffusers_flax_unet()
  x = np.transpose(ref['sample'], (0, 2, 3, 1))
  ctx = np.asarray(ref['encoder_hidden_states'])
  mask = np.ones(ctx.shape[:2], np.int32)
  mask[:, 4:] = 0
  garbage = ctx.copy()
  garbage[:, 4:] = 100.0  # what padding positions hold must not matter
  apply = lambda c, m: np.asarray(model.apply({'params': params}, x, ref['timesteps'], c, m))
  np.testing.assert_allclose(apply(ctx, mask), apply(garbage, mask), atol=1e-5)
  assert np.abs(apply(ctx, None) - apply(garbage, None)).max() > 1e-2


def test_t5_encoder_has_t5x_parameter_names_and_shapes():
  path = os.path.join(FIXTURES, 't5x', 'test_t5_tiny.checkpoint_0')
  with open(path, 'rb') as f:
    target = serialization.msgpack_restore(f.read())['optimizer']['target']
  theirs = {k: v.shape for k, v in flatten_dict(
      {'encoder': target['encoder'], 'token_embedder': target['token_embedder']}).items()}
  config = T5EncoderConfig(vocab_size=32128, d_model=8, num_heads=4, head_dim=3, num_layers=2,
                           d_ff=16)
  ids = jnp.ones((1, 5), jnp.int32)
  ours = jax.eval_shape(T5Encoder(config).init, jax.random.PRNGKey(0), ids)['params']
  assert {k: v.shape for k, v in flatten_dict(ours).items()} == theirs


def test_t5_encoder_runs_t5x_checkpoint_and_ignores_padding():
  path = os.path.join(FIXTURES, 't5x', 'test_t5_tiny.checkpoint_0')
  with open(path, 'rb') as f:
    target = serialization.msgpack_restore(f.read())['optimizer']['target']
  params = {'encoder': target['encoder'], 'token_embedder': target['token_embedder']}
  config = T5EncoderConfig(vocab_size=32128, d_model=8, num_heads=4, head_dim=3, num_layers=2,
                           d_ff=16)
  ids = np.array([[5, 6, 7, 1, 0, 0]], np.int32)
  more_padding = np.array([[5, 6, 7, 1, 0, 0, 0, 0, 0]], np.int32)
  a = np.asarray(T5Encoder(config).apply({'params': params}, ids))
  b = np.asarray(T5Encoder(config).apply({'params': params}, more_padding))
  assert np.isfinite(a).all()
  np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-6)


def test_space_to_depth_round_trip_and_layout():
  x = np.arange(2 * 4 * 8 * 3, dtype=np.float32).reshape(2, 4, 8, 3)
  y = space_to_depth(x, 2)
  assert y.shape == (2, 2, 4, 12)
  np.testing.assert_array_equal(y[0, 0, 0].reshape(2, 2, 3), x[0, :2, :2])
  np.testing.assert_array_equal(depth_to_space(y, 2), x)
