"""The box-conditioned model: the quoted text's frame and its confinement to the box,
against the caption string and closed forms."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred import tokenizer
from charred.models import diffusion_model as dm
from charred.models import generation
from charred.models import t5_encoder
from charred.models import text_to_image as t2i
from charred.models import unet as unet_lib
from test_quote_positions import tiny_config

CAPTIONS = ['A sign that says "Hello".', 'It says "naïve"!', 'no quote', 'Open "ended']
LENGTH = 40


def _encode(captions, length=LENGTH):
  return (jnp.asarray(a) for a in tokenizer.encode_batch(captions, length))


def _quoted_bytes(caption: str) -> set[int]:
  """Byte indices of the characters between the first '"' and the next (or the end)."""
  if '"' not in caption:
    return set()
  start = caption.index('"') + 1
  end = caption.find('"', start)
  end = len(caption) if end < 0 else end
  first = len(caption[:start].encode('utf-8'))
  return set(range(first, first + len(caption[start:end].encode('utf-8'))))


def test_text_layout_finds_the_quoted_characters():
  tokens, mask = _encode(CAPTIONS)
  boxes = np.array([[8, 4, 72, 28]] * len(CAPTIONS))
  layout = t2i.text_layout(tokens, mask, boxes, (32, 128))
  np.testing.assert_array_equal(layout.chars, [5, 5, 0, 5])  # 'naïve' is 5 characters
  for row, caption in zip(np.asarray(layout.in_span), CAPTIONS):
    assert set(np.flatnonzero(row)) == _quoted_bytes(caption), caption
  np.testing.assert_allclose(layout.boxes[0], [8 / 128, 4 / 32, 72 / 128, 28 / 32])


def test_box_coordinates_count_characters_across_the_box():
  # A 5-letter word in pixels [20, 80) of a 128-wide image; cells of 4 px (w = 32).
  layout = unet_lib.TextLayout(jnp.array([[20 / 128, 0.0, 80 / 128, 1.0]]),
                               jnp.zeros((1, 4), bool), jnp.array([5.0]))
  coords = np.asarray(unet_lib.box_coordinates(2, 32, layout))[0]
  centres = (np.arange(32) + 0.5) * 4
  expected = (centres - 20) / 60 * 5
  np.testing.assert_allclose(coords, np.tile(expected, 2), rtol=1e-5, atol=1e-5)
  # The cell whose centre is in letter k's 12 px column has a coordinate in [k, k + 1).
  for k in range(5):
    inside = (centres >= 20 + 12 * k) & (centres < 32 + 12 * k)
    assert np.all(np.floor(coords[:32][inside]) == k)


def test_box_mask_hides_the_quoted_tokens_outside_the_box_only():
  tokens, mask = _encode(['A sign that says "Hi".'], 24)
  layout = t2i.text_layout(tokens, mask, np.array([[32, 8, 64, 24]]), (32, 128))
  got = np.asarray(unet_lib.box_mask(4, 16, layout, mask))[0]  # [64 cells, 24 keys]
  span = np.asarray(layout.in_span)[0]
  for cell in range(64):
    y, x = divmod(cell, 16)
    cx, cy = (x + 0.5) * 8, (y + 0.5) * 8  # cell centre in pixels
    inside = 32 <= cx < 64 and 8 <= cy < 24
    expected = np.where(span & ~inside, 0, np.asarray(mask)[0])
    np.testing.assert_array_equal(got[cell], expected, err_msg=f'cell {cell}')


def _model_and_params(unet=None, **kwargs):
  # The default's geometry: 32x128 signs on 4x4 patches.
  model = dm.DiffusionModel(tiny_config(
      dict(in_channels=48, out_channels=48, query_positions='sinusoidal', position_span=10.0,
           **(unet or {})),
      text_length=LENGTH, image_size=(32, 128), patch_size=4, prediction_type='sample',
      quote_positions=True, **kwargs))
  return model, model.init_params(jax.random.PRNGKey(0))


def test_cells_outside_the_box_never_attend_the_quoted_letters():
  model, params = _model_and_params(box_conditioning=True)
  tokens, mask = _encode(['A sign that says "Hello".', 'It says "abc".'])
  boxes = np.array([[40, 4, 100, 28], [0, 0, 36, 32]])
  layout = t2i.text_layout(tokens, mask, boxes, (32, 128))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 128, 3))
  ctx = model.encode_text(params, tokens, mask)
  _, state = model.module.apply({'params': params}, x, jnp.array([10, 500]), ctx, mask,
                                layout, method=t2i.TextToImage.denoise,
                                mutable=['intermediates'])
  maps = [v for path, value in flax.traverse_util.flatten_dict(state).items()
          if 'cross_attention' in path for v in value]
  assert maps
  span = np.asarray(layout.in_span)
  for weights in maps:  # [B, N, T, L]
    cells = weights.shape[2]
    h, w = unet_lib.attention_grid(cells, 32, 128)
    xs, ys = (np.tile(np.arange(w), h) + 0.5) * 128 / w, (np.repeat(np.arange(h), w) + 0.5) * 32 / h
    for b, (x0, y0, x1, y1) in enumerate(boxes):
      outside = ~((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1))
      on_span = np.asarray(weights)[b][:, outside][..., span[b]]
      assert outside.any() and np.all(on_span == 0)
      inside_mass = np.asarray(weights)[b][:, ~outside][..., span[b]].sum(-1)
      assert np.all(inside_mass > 0)


def test_the_loss_needs_boxes_and_uses_them():
  model, params = _model_and_params(box_conditioning=True)
  tokens, mask = _encode(['A sign that says "Hello".'] * 2)
  batch = {'image': jnp.zeros((2, 32, 128, 3)), 'text_tokens': tokens, 'text_mask': mask}
  with pytest.raises(ValueError, match='needs `text_box` in the batch'):
    model.loss_fn(params, batch, jax.random.PRNGKey(0))
  near = model.loss_fn(params, dict(batch, text_box=jnp.array([[4, 4, 64, 28]] * 2)),
                       jax.random.PRNGKey(0))[0]
  far = model.loss_fn(params, dict(batch, text_box=jnp.array([[64, 4, 124, 28]] * 2)),
                      jax.random.PRNGKey(0))[0]
  assert np.isfinite(near) and near != far


def test_box_conditioning_needs_quote_positions():
  with pytest.raises(ValueError, match='set quote_positions=True'):
    t2i.TextToImageConfig(
        text_encoder=t5_encoder.T5EncoderConfig(d_model=16),
        unet=unet_lib.UNetConfig(cross_attention_dim=16), box_conditioning=True)


@pytest.mark.parametrize('box, message', [
    ((0, 0, 130, 32), 'not inside the 128x32 image'),
    ((50, 4, 40, 20), 'x0 < x1'),
    ((0, 20, 10, 20), 'x0 < x1 and y0 < y1'),
    ((-1, 0, 10, 10), 'not inside'),
])
def test_bad_boxes_get_one_line(box, message):
  with pytest.raises(ValueError, match=message):
    generation.check_boxes([box], (32, 128))


def test_the_generator_samples_in_the_boxes_it_is_given():
  model, params = _model_and_params(box_conditioning=True)
  gen = model.generator(params, num_steps=2, guidance_scale=2.0)
  with pytest.raises(ValueError, match='needs boxes='):
    gen(['A sign that says "Hi".'])
  with pytest.raises(ValueError, match='Box 0'):
    gen(['A sign that says "Hi".'], boxes=[(0, 0, 200, 32)])
  images = gen(['A sign that says "Hi".', 'It says "abc".', 'A "x"'], batch_size=2,
               boxes=[(4, 4, 40, 28), (60, 0, 128, 32), (0, 0, 12, 32)])
  assert images.shape == (3, 32, 128, 3) and images.dtype == np.uint8
  plain_model, plain_params = _model_and_params()
  with pytest.raises(ValueError, match='places text itself'):
    plain_model.generator(plain_params, num_steps=2)(['A "x"'], boxes=[(0, 0, 12, 32)])


def test_layouts_are_where_the_ground_truth_renders_draw_the_text():
  from charred.datasets import signs  # pylint: disable=g-import-not-at-top
  config = signs.ground_truth_config('r1', 32, 128)
  texts = ['abc', 'Hello', 'WONDERED', 'xy']
  images = signs.render_ground_truth(texts, config, seed=3)
  boxes = signs.ground_truth_boxes(texts, config, seed=3)
  assert boxes.shape == (4, 4) and boxes.dtype == np.int32
  for image, (x0, y0, x1, y1) in zip(images, boxes):
    ink = np.argwhere(image.min(axis=-1) < 128)  # black on white
    assert len(ink) and ink[:, 1].min() >= x0 and ink[:, 1].max() < x1
    assert ink[:, 0].min() >= y0 and ink[:, 0].max() < y1
    # Tight: the ink reaches within 2 px of each side of the box.
    assert ink[:, 1].min() - x0 <= 2 and x1 - 1 - ink[:, 1].max() <= 2
  assert len({tuple(b) for b in boxes[:, :2]}) > 1  # R1 places the texts anywhere


def test_targets_without_a_box_get_the_datas_layout():
  from charred.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  targets = [evaluators.RenderingTarget('A "ab".', 'ab', box=(1, 2, 30, 20)),
             evaluators.RenderingTarget('A "cd".', 'cd')]
  calls = []

  def layouts(texts, height, width, seed):
    calls.append((tuple(texts), height, width, seed))
    return np.array([[5, 6, 7, 8], [9, 10, 40, 30]])

  boxes = evaluators.target_boxes(targets, (32, 128), 7, layouts)
  np.testing.assert_array_equal(boxes, [[1, 2, 30, 20], [9, 10, 40, 30]])
  assert calls == [(('ab', 'cd'), 32, 128, 7)]
  with pytest.raises(ValueError, match='1 have none'):
    evaluators.target_boxes(targets, (32, 128), 7, None)


@pytest.mark.parametrize('anchored,features', [(True, False), (False, False), (True, True)])
def test_anchored_patches_draw_a_moved_box_as_the_same_picture_moved(anchored, features):
  """With the grid anchored at the box, moving the box (and the noisy image) by d < patch
  pixels moves the prediction by d exactly (the layout features too are read in the
  anchored frame); with a fixed grid it does not."""
  model, params = _model_and_params(dict(layout_features=features), box_conditioning=True,
                                    anchor_patches=anchored)
  tokens, mask = _encode(['A sign that says "Hello".'])
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 128, 3))
  ctx = model.encode_text(params, tokens, mask)

  def predict(image, box):
    layout = t2i.text_layout(tokens, mask, np.array([box]), (32, 128))
    return np.asarray(model.module.apply({'params': params}, image, jnp.array([300]), ctx,
                                         mask, layout, method=t2i.TextToImage.denoise))

  base = predict(x, (16, 8, 76, 28))  # corner on the 4 px grid
  dy, dx = 1, 3
  moved = predict(jnp.roll(x, (dy, dx), axis=(1, 2)), (16 + dx, 8 + dy, 76 + dx, 28 + dy))
  error = np.abs(moved - np.roll(base, (dy, dx), axis=(1, 2))).max()
  assert (error < 1e-4) if anchored else (error > 1e-2)


def test_anchor_patches_needs_boxes():
  with pytest.raises(ValueError, match='set box_conditioning=True'):
    tiny_config(quote_positions=True, anchor_patches=True)


def test_layout_features_place_each_cell_in_its_box():
  # A 5-letter box over pixels x [20, 80), y [8, 24) of a 32x128 image, on 4 px cells.
  layout = unet_lib.TextLayout(jnp.array([[20 / 128, 8 / 32, 80 / 128, 24 / 32]]),
                               jnp.zeros((1, 4), bool), jnp.array([5.0]))
  got = np.asarray(unet_lib.layout_features(8, 32, layout))[0]  # [8, 32, 5]
  cx, cy = (np.arange(32) + 0.5) * 4, (np.arange(8) + 0.5) * 4
  inside = ((cy[:, None] >= 8) & (cy[:, None] < 24)) & ((cx[None] >= 20) & (cx[None] < 80))
  np.testing.assert_array_equal(got[..., 0], inside.astype(np.float32))
  np.testing.assert_allclose(got[..., 1], np.broadcast_to((cx - 20) / 60, (8, 32)), atol=1e-5)
  np.testing.assert_allclose(got[..., 2], np.broadcast_to(((cy - 8) / 16)[:, None], (8, 32)),
                             atol=1e-5)
  np.testing.assert_allclose(got[..., 3], 16 / 32, atol=1e-6)  # box height
  np.testing.assert_allclose(got[..., 4], 60 / 128 / 5, atol=1e-6)  # advance per letter


def test_layout_features_reach_the_prediction_and_need_boxes():
  with pytest.raises(ValueError, match='layout_features reads the text box'):
    tiny_config(dict(layout_features=True), quote_positions=True)
  model, params = _model_and_params(dict(layout_features=True), box_conditioning=True)
  assert params['unet']['layout_embedding']['kernel'].shape == (5, 8)
  tokens, mask = _encode(['A sign that says "Hello".'])
  ctx = model.encode_text(params, tokens, mask)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 128, 3))

  def predict(p):
    layout = t2i.text_layout(tokens, mask, np.array([(16, 8, 76, 28)]), (32, 128))
    return np.asarray(model.module.apply({'params': p}, x, jnp.array([300]), ctx, mask,
                                         layout, method=t2i.TextToImage.denoise))
  zeroed = jax.tree_util.tree_map(jnp.zeros_like, params['unet']['layout_embedding'])
  without = {**params, 'unet': {**params['unet'], 'layout_embedding': zeroed}}
  assert np.abs(predict(params) - predict(without)).max() > 1e-4
