"""Models against references written by other projects (diffusers 0.39 Flax, t5x)."""

import json
import os

from flax import serialization
import flax.linen as nn
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
  ours = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), sample,
                                      jnp.zeros((1,)), jnp.zeros((1, 7, 24)))['params'])
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
  ours = nn.meta.unbox(
      jax.eval_shape(T5Encoder(config).init, jax.random.PRNGKey(0), ids)['params'])
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


def _tiny_unet(**overrides):
  # One level keeps compilation short: every kind of block but the resamplers.
  config = dict(sample_size=8, block_out_channels=(16,), layers_per_block=1,
                down_block_types=('CrossAttnDownBlock2D',), up_block_types=('CrossAttnUpBlock2D',),
                attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8)
  config.update(overrides)
  return UNet(UNetConfig(**config))


def _random_params(model, seed=0):
  """Random float32 parameters of plausible scale, without compiling the initialisers."""
  rng = np.random.default_rng(seed)
  x, t, ctx, _ = _tiny_inputs()
  width = model.config.encoder_hid_dim or ctx.shape[-1]
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t,
                                        jnp.zeros((2, 7, width)))['params'])
  def sample(path, s):
    if path[-1].key == 'kernel':
      return rng.normal(0, np.prod(s.shape[:-1]) ** -0.5, s.shape).astype(np.float32)
    return (float(path[-1].key == 'scale') + 0.1 * rng.normal(size=s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(sample, shapes)


def _tiny_inputs():
  rng = np.random.default_rng(0)
  mask = np.ones((2, 7), np.int32)
  mask[1, 3:] = 0
  return (rng.normal(size=(2, 8, 8, 4)).astype(np.float32), np.array([3, 700]),
          rng.normal(size=(2, 7, 24)).astype(np.float32), mask)


def test_every_parameter_has_a_logical_axis_name_per_dimension():
  model = _tiny_unet(encoder_hid_dim=40, use_linear_projection=False, position_embedding=True)
  x, t, _, mask = _tiny_inputs()
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, jnp.zeros((2, 7, 40)),
                         mask)['params']
  specs = flatten_dict(nn.get_partition_spec(boxed), sep='/')
  shapes = flatten_dict(nn.meta.unbox(boxed), sep='/')
  assert specs.keys() == shapes.keys()
  for name, shape in shapes.items():
    spec = tuple(specs[name])
    assert len(spec) == len(shape.shape) and all(isinstance(a, str) for a in spec), name
  assert tuple(specs['encoder_hid_proj/kernel']) == ('embed', 'cross_embed')
  attn2 = 'down_blocks_0/attentions_0/transformer_blocks_0/attn2'
  assert tuple(specs[f'{attn2}/to_k/kernel']) == ('cross_embed', 'heads')
  assert tuple(specs['conv_in/kernel']) == ('conv_height', 'conv_width', 'conv_in', 'conv_out')


def test_remat_gives_the_same_outputs_and_gradients():
  x, t, ctx, mask = _tiny_inputs()
  plain, remat = _tiny_unet(dropout=0.1), _tiny_unet(dropout=0.1, remat=True)
  params = _random_params(plain)

  def loss(model, p):  # with dropout on: remat must replay the same random masks
    out = model.apply({'params': p}, x, t, ctx, mask, deterministic=False,
                      rngs={'dropout': jax.random.PRNGKey(1)})
    return jnp.mean(out**2), out

  jaxpr = lambda model: str(jax.make_jaxpr(lambda p: loss(model, p))(params))
  assert 'remat' in jaxpr(remat) and 'remat' not in jaxpr(plain)
  (_, out1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(params)
  (_, out2), g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p), has_aux=True))(params)
  np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-6)
  assert jax.tree_util.tree_structure(g1) == jax.tree_util.tree_structure(g2)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters_and_tracks_float32_output():
  x, t, ctx, mask = _tiny_inputs()
  fp32, bf16 = _tiny_unet(), _tiny_unet(dtype=jnp.bfloat16)
  shapes = nn.meta.unbox(jax.eval_shape(bf16.init, jax.random.PRNGKey(0), x, t, ctx, mask))
  assert {p.dtype for p in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  params = _random_params(fp32)
  ref = np.asarray(jax.jit(fp32.apply)({'params': params}, x, t, ctx, mask))
  out = np.asarray(jax.jit(bf16.apply)({'params': params}, x, t, ctx, mask))
  assert out.dtype == np.float32
  assert np.abs(out - ref).max() / np.abs(ref).max() < 3e-2


def test_num_attention_heads_overrides_attention_head_dim():
  a = UNetConfig(attention_head_dim=8, num_attention_heads=(5, 10, 20, 20))
  assert a.heads_per_block == UNetConfig().heads_per_block == (5, 10, 20, 20)
