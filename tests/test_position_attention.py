"""Position-addressable cross-attention and the glyph attention loss, against closed forms.

With every switch off the U-Net is diffusers' (tests/test_models.py holds that parity).
"""
import math

import flax.linen as nn
from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred.models import unet as unet_lib
from charred.models.unet import UNet, UNetConfig
from charred.models import losses

TINY = dict(in_channels=4, out_channels=4, block_out_channels=(8, 16),
            down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
            up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1,
            attention_head_dim=(2, 2), cross_attention_dim=12, norm_num_groups=4)


def _run(config, seed=0, mutable=False):
  model = UNet(config)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 16, 4))
  ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 12))
  t = jnp.array([3, 500])
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), x, t, ctx)['params'])
  out = model.apply({'params': params}, x, t, ctx, mutable=['intermediates'] if mutable else False)
  return params, out


def test_rotate_is_complex_multiplication():
  """RoPE rotates pair (x_i, x_{i+H/2}) by angle p * 10000^(-i/(H/2)), as a complex product."""
  x = np.random.default_rng(0).normal(size=(1, 3, 2, 8)).astype(np.float32)
  positions = np.array([0.0, 1.5, 7.0], np.float32)
  got = np.asarray(unet_lib.rotate(jnp.asarray(x), jnp.asarray(positions)))
  z = x[..., :4] + 1j * x[..., 4:]
  freqs = 10000.0 ** (-np.arange(4) / 4)
  z = z * np.exp(1j * positions[None, :, None, None] * freqs)
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-5)


def test_rotary_logits_depend_only_on_the_offset():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
  dot = lambda p, s: float(jnp.sum(unet_lib.rotate(q, jnp.array([p])) *
                                   unet_lib.rotate(k, jnp.array([s]))))
  assert dot(3.0, 1.0) == pytest.approx(dot(10.0, 8.0), abs=1e-4)
  assert dot(3.0, 1.0) != pytest.approx(dot(3.0, 2.0), abs=1e-3)


def test_sinusoids_of_shifted_positions_are_a_fixed_rotation():
  """PE(u + d) = R(d) PE(u): a linear query projection can align image coordinates with
  text positions offset by d, which is why both sides share one coordinate system."""
  dim, d = 8, 17.75
  u = jnp.linspace(0, 12, 9)
  pe, shifted = unet_lib.sinusoidal_positions(u, dim), unet_lib.sinusoidal_positions(u + d, dim)
  freqs = np.exp(-math.log(10000.0) * np.arange(dim // 2) / (dim // 2))
  c, s = np.cos(d * freqs), np.sin(d * freqs)
  sin, cos = np.asarray(pe[:, :dim // 2]), np.asarray(pe[:, dim // 2:])
  expected = np.concatenate([sin * c + cos * s, cos * c - sin * s], axis=1)
  np.testing.assert_allclose(np.asarray(shifted), expected, atol=1e-5)


def test_column_coordinates_span_the_width():
  coords = np.asarray(unet_lib.column_coordinates(2, 4, span=8.0))
  np.testing.assert_allclose(coords, [1, 3, 5, 7, 1, 3, 5, 7])


def test_switches_add_only_their_tables_and_change_the_output():
  base_params, base_out = _run(UNetConfig(**TINY))
  for switches, added in (
      (dict(text_positions='sinusoidal'), {}),
      (dict(query_positions='sinusoidal', position_span=4.0), {}),
      (dict(cross_attention_rope=True), {}),
      (dict(text_positions='learned'), {('text_position_embedding',): (6, 12)}),
      (dict(query_positions='learned'), {
          ('down_blocks_0', 'attentions_0', 'query_position_embedding'): (16, 8),
          ('up_blocks_1', 'attentions_0', 'query_position_embedding'): (16, 8),
          ('up_blocks_1', 'attentions_1', 'query_position_embedding'): (16, 8),
          ('mid_block', 'attentions_0', 'query_position_embedding'): (8, 16)})):
    params, out = _run(UNetConfig(**TINY, **switches))
    shapes = {k: v.shape for k, v in flatten_dict(params).items()}
    base = {k: v.shape for k, v in flatten_dict(base_params).items()}
    assert {k: v for k, v in shapes.items() if k not in base} == added, switches
    assert set(base) <= set(shapes)
    assert not np.allclose(np.asarray(out), np.asarray(base_out), atol=1e-4), switches


def test_unknown_position_kind_is_a_clear_error():
  with pytest.raises(ValueError, match='text_positions must be one of'):
    UNetConfig(**TINY, text_positions='rotary')
  with pytest.raises(ValueError, match='position_span'):
    UNetConfig(**TINY, position_span=0)


def test_cross_attention_weights_are_sown_only_when_asked():
  _, (out, state) = _run(UNetConfig(**TINY), mutable=True)
  maps = jax.tree_util.tree_leaves(state)
  # down 0 (4x16), mid (2x8), up 1 twice (4x16); 2 heads, 6 text positions.
  assert sorted(m.shape for m in maps) == sorted(
      [(2, 2, 64, 6), (2, 2, 16, 6), (2, 2, 64, 6), (2, 2, 64, 6)])
  for m in maps:
    np.testing.assert_allclose(np.asarray(m.sum(-1)), 1.0, atol=1e-5)
  _, plain = _run(UNetConfig(**TINY))
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-6)


def test_glyph_attention_loss_closed_form():
  # One layer, 2 heads, a 1x2 grid of cells over a 2x4 image, 3 text tokens.
  weights = jnp.array([[[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
                        [[0.5, 0.4, 0.1], [0.3, 0.3, 0.4]]]])  # [B=1, N=2, T=2, L=3]
  glyphs = jnp.array([[[0, 0, 2, 2], [0, 0, 2, 2]]])  # cell 0 -> token 0, cell 1 -> token 2
  got = losses.glyph_attention_loss([weights], glyphs, keep=jnp.array([True]))
  expected = -(math.log((0.7 + 0.5) / 2 + 1e-6) + math.log((0.8 + 0.4) / 2 + 1e-6)) / 2
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # Cells outside glyphs and dropped captions do not count.
  outside = jnp.array([[[0, 0, -1, -1], [0, 0, -1, -1]]])
  got = losses.glyph_attention_loss([weights], outside, keep=jnp.array([True]))
  assert float(got) == pytest.approx(-math.log(0.6 + 1e-6), rel=1e-5)
  assert float(losses.glyph_attention_loss([weights], glyphs, keep=jnp.array([False]))) == 0.0
  # With a blank token, cells outside glyphs are pulled onto it (token 1: (0.1 + 0.3) / 2);
  # a blank of -1 leaves them out again.
  got = losses.glyph_attention_loss([weights], outside, jnp.array([True]), jnp.array([1]))
  expected = -(math.log(0.6 + 1e-6) + math.log(0.2 + 1e-6)) / 2
  assert float(got) == pytest.approx(expected, rel=1e-5)
  got = losses.glyph_attention_loss([weights], outside, jnp.array([True]), jnp.array([-1]))
  assert float(got) == pytest.approx(-math.log(0.6 + 1e-6), rel=1e-5)


def test_glyph_attention_loss_rejects_cells_that_do_not_tile_the_image():
  with pytest.raises(ValueError, match='do not tile'):
    losses.glyph_attention_loss([jnp.ones((1, 1, 3, 2)) / 2], jnp.zeros((1, 2, 4), jnp.int32),
                                jnp.array([True]))


def test_glyph_char_loss_closed_form():
  logits = jnp.log(jnp.array([[[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]]]))  # [1, h=1, w=2, K=3]
  chars = jnp.array([[[0, 0, 2, 2], [0, 0, -1, -1]]])  # centre pixels: (1, 1) -> 0, (1, 3) -> -1
  got = losses.glyph_char_loss(logits, chars, keep=jnp.array([True]))
  assert float(got) == pytest.approx(-math.log(0.5), rel=1e-5)
  chars = jnp.array([[[0, 0, 2, 2], [0, 0, 2, 2]]])
  got = losses.glyph_char_loss(logits, chars, keep=jnp.array([True]))
  assert float(got) == pytest.approx(-(math.log(0.5) + math.log(0.6)) / 2, rel=1e-5)
  assert float(losses.glyph_char_loss(logits, chars, keep=jnp.array([False]))) == 0.0


def test_char_head_is_sown_and_leaves_the_output_alone():
  _, (out, state) = _run(UNetConfig(**TINY, char_head_classes=7), mutable=True)
  logits = [v for k, v in flatten_dict(state).items() if 'char_logits' in k]
  assert [x.shape for value in logits for x in value] == [(2, 4, 16, 7)]
  params, plain = _run(UNetConfig(**TINY))
  head_params, _ = _run(UNetConfig(**TINY, char_head_classes=7))
  # The head reads the features; the image output does not depend on it.
  assert set(flatten_dict(head_params)) - set(flatten_dict(params)) == {
      ('char_head', 'kernel'), ('char_head', 'bias')}
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-6)
