"""The text frame (charred.models.text_frame): resampling against closed forms and the
renderer's own boxes, and the model's two passes against the U-Net run by hand."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred.models import text_frame as tf
from charred.models import text_to_image as t2i
from charred.models import unet as unet_lib
from test_box_conditioning import _encode
from test_quote_positions import tiny_config

H, W = 32, 128
CONFIG = tf.TextFrameConfig()  # line height 24, corner at (4, 4)


def _layout(boxes, chars=4.0):
  boxes = jnp.asarray(boxes, jnp.float32)
  return unet_lib.TextLayout(boxes / jnp.array([W, H, W, H], jnp.float32),
                             jnp.zeros((len(boxes), 4), bool), jnp.full((len(boxes),), chars))


def test_frame_scales_the_box_to_the_line_height_and_moves_it_to_the_origin():
  frame = tf.text_frame(_layout([[10, 5, 58, 17], [20, 4, 68, 28], [2, 10, 126, 22]]),
                        (H, W), CONFIG, (H, W))
  # 12 px high -> x2; 24 px -> x1; a 124 px wide box would leave the frame at x2: it is
  # shrunk to fit the 120 px between the margins instead.
  np.testing.assert_allclose(frame.scale, [2.0, 1.0, 120 / 124], rtol=1e-6)
  np.testing.assert_allclose(frame.size, [[96, 24], [48, 24], [120, 12 * 120 / 124]],
                             rtol=1e-5)
  boxes = tf.frame_layout(_layout([[0, 0, 1, 1]] * 3), frame, (H, W)).boxes
  np.testing.assert_allclose(boxes * jnp.array([W, H, W, H]),
                             [[4, 4, 100, 28], [4, 4, 52, 28], [4, 4, 124, 4 + 12 * 120 / 124]],
                             atol=1e-4)


def test_into_frame_is_exact_on_linear_images_and_undone_by_from_frame():
  layout = _layout([[10, 5, 58, 17], [21, 3, 69, 27], [30.5, 9, 60, 19]])
  frame = tf.text_frame(layout, (H, W), CONFIG, (H, W))
  ys, xs = np.mgrid[0:H, 0:W] + 0.5  # pixel centres
  image = np.broadcast_to((0.03 * xs - 0.1 * ys + 0.2)[None, ..., None], (3, H, W, 2))
  framed = np.asarray(tf.into_frame(jnp.asarray(image, jnp.float32), frame))
  for b in range(3):
    s, (cx, cy) = float(frame.scale[b]), np.asarray(frame.corner[b])
    x, y = cx + (xs - 4) / s, cy + (ys - 4) / s  # where each frame pixel reads the image
    inside = (x > 0.5) & (x < W - 0.5) & (y > 0.5) & (y < H - 0.5)
    np.testing.assert_allclose(framed[b, ..., 0][inside], (0.03 * x - 0.1 * y + 0.2)[inside],
                               atol=1e-5)
  back = np.asarray(tf.from_frame(jnp.asarray(framed), frame))
  region = np.asarray(tf.frame_region(frame, (H, W)))[..., 0]
  assert region.sum() > 300
  np.testing.assert_allclose(back[region], image[region], atol=1e-5)


def test_a_whole_pixel_move_at_line_height_is_a_shift():
  frame = tf.text_frame(_layout([[17, 6, 65, 30]]), (H, W), CONFIG, (H, W))
  image = jax.random.normal(jax.random.PRNGKey(0), (1, H, W, 3))
  framed = np.asarray(tf.into_frame(image, frame))
  expected = np.zeros_like(framed)
  expected[0, :H - 2, :W - 13] = np.asarray(image)[0, 2:, 13:]  # corner (17, 6) -> (4, 4)
  np.testing.assert_allclose(framed, expected, atol=1e-6)
  labels = jnp.asarray(np.arange(H * W).reshape(1, H, W), jnp.int32)
  moved = np.asarray(tf.labels_into_frame(labels, frame))
  want = np.full((1, H, W), -1)
  want[0, :H - 2, :W - 13] = np.asarray(labels)[0, 2:, 13:]
  np.testing.assert_array_equal(moved, want)


@pytest.mark.parametrize('size', [10, 22])
def test_rendered_words_land_on_the_line_in_the_frame(size):
  """The renderer's own text box of an R1-face sign at 10 and 22 px: in the frame, the
  ink of the word lies between the frame's line rows 4 and 28 and starts at column 4."""
  from charred.datasets import ladder, signs  # pylint: disable=g-import-not-at-top
  config = dataclasses.replace(signs.R1.render, font_size=(size, size))
  pixels, style = ladder.render('Tiger', np.random.default_rng(3), config)
  image = (255.0 - np.asarray(pixels, np.float32).mean(-1)) / 255.0  # ink
  frame = tf.text_frame(_layout([style['text_box']]), (H, W), CONFIG, (H, W))
  framed = np.asarray(tf.into_frame(jnp.asarray(image[None, ..., None]), frame))[0, ..., 0]
  rows, cols = np.nonzero(framed > 0.3)
  assert rows.min() >= 3 and rows.max() <= 28, (rows.min(), rows.max())
  assert 3 <= cols.min() <= 6, cols.min()
  # The glyphs' height is one whatever the font size: 'T' rises to the cap height.
  assert rows.max() - rows.min() >= 12


SMALL = tf.TextFrameConfig(line_height=8.0, origin=(2.0, 2.0), margin=1.0)


def _small_model(joint=False, **objective):
  """A 16x32 model on 2x2 patches whose frame puts the box at (2, 2), 8 px high."""
  from charred.models import diffusion_model as dm  # pylint: disable=g-import-not-at-top
  model = dm.DiffusionModel(tiny_config(
      dict(in_channels=12, out_channels=12, query_positions='sinusoidal', position_span=4.0),
      text_length=32, image_size=(16, 32), patch_size=2, prediction_type='sample',
      quote_positions=True, box_conditioning=True,
      text_frame=dataclasses.replace(SMALL, joint=joint)),
      objective=dm.ObjectiveConfig(**objective))
  return model, model.init_params(jax.random.PRNGKey(0))


@pytest.mark.parametrize('joint', [False, True])
def test_the_model_takes_the_box_from_the_frame_pass_and_the_rest_from_the_image_pass(joint):
  """The frame pass reads the noisy image resampled, or (joint) the frame's own channels,
  which come back after the image's."""
  model, params = _small_model(joint)
  h, w = 16, 32
  plain = t2i.TextToImage(dataclasses.replace(model.config, text_frame=None))
  tokens, mask = _encode(['A sign that says "Hello".', 'A sign that says "Hi".'], 32)
  ctx = model.encode_text(params, tokens, mask)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, h, w, 6 if joint else 3))
  t = jnp.array([300, 700])
  layout = t2i.text_layout(tokens, mask, np.array([(5, 4, 25, 8), (8, 1, 20, 15)]), (h, w))

  @jax.jit
  def by_hand(x, layout):
    run = lambda image, lay: plain.apply({'params': params}, image, t, ctx, mask, lay,
                                         method=t2i.TextToImage.denoise)
    frame = tf.text_frame(layout, (h, w), SMALL, (h, w))
    image, framed_input = (x[..., :3], x[..., 3:]) if joint else (x, tf.into_frame(x, frame))
    framed = run(framed_input, tf.frame_layout(layout, frame, (h, w)))
    out = jnp.where(tf.frame_region(frame, (h, w)), tf.from_frame(framed, frame),
                    run(image, layout))
    return (jnp.concatenate([out, framed], -1) if joint else out,
            tf.frame_region(frame, (h, w)))

  got = jax.jit(lambda x, layout: model.module.apply(
      {'params': params}, x, t, ctx, mask, layout, method=t2i.TextToImage.denoise))(x, layout)
  want, region = by_hand(x, layout)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
  region = np.asarray(region)
  assert 0 < region[0].mean() < 1 and 0 < region[1].mean() < 1


@pytest.mark.parametrize('joint', [False, True])
def test_text_frame_trains_with_the_attention_loss(joint):
  model, params = _small_model(joint, attention_loss_weight=0.1)
  tokens, mask = _encode(['A sign that says "Hi".'] * 2, 32)
  glyphs = -np.ones((2, 16, 32), np.int32)
  glyphs[:, 4:10, 6:10], glyphs[:, 4:10, 10:14] = 18, 19  # 'H', 'i' at their byte index
  batch = {'image': jnp.zeros((2, 16, 32, 3)), 'text_tokens': tokens, 'text_mask': mask,
           'text_box': jnp.array([[6, 4, 14, 10]] * 2, jnp.float32),
           'glyph_tokens': jnp.asarray(glyphs)}
  loss, terms = jax.jit(model.loss_fn)(params, batch, jax.random.PRNGKey(0))
  assert np.isfinite(float(loss)) and float(terms['attention']) > 0


def test_a_joint_frame_is_sampled_beside_the_image_and_left_out_of_the_picture():
  model, params = _small_model(joint=True)
  assert model.config.sampled_shape(model.codec) == (16, 32, 6)
  tokens, mask = _encode(['A sign that says "Hi".'], 32)
  images = model.generator(params, num_steps=2).sample(
      tokens, mask, jax.random.PRNGKey(0), jnp.array([[6, 4, 14, 10]], jnp.float32))
  assert images.shape == (1, 16, 32, 3) and np.all(np.isfinite(np.asarray(images)))


def test_text_frame_config_errors():
  with pytest.raises(ValueError, match='set box_conditioning=True and anchor_patches=False'):
    tiny_config(quote_positions=True, text_frame=tf.TextFrameConfig())
  with pytest.raises(ValueError, match='line_height > 0'):
    tf.TextFrameConfig(line_height=0)
  from charred.models import image_codec  # pylint: disable=g-import-not-at-top
  config = tiny_config(dict(in_channels=48, out_channels=48), image_size=(32, 128),
                       patch_size=4, quote_positions=True, box_conditioning=True,
                       text_frame=tf.TextFrameConfig(origin=(2.0, 4.0)))
  with pytest.raises(ValueError, match='must be on the patch grid'):
    config.check_codec(image_codec.PixelCodec())


@pytest.mark.parametrize('joint', [False, True])
def test_attention_maps_of_a_framed_model_are_the_image_pass(joint):
  from charred.evaluation import attention_maps  # pylint: disable=g-import-not-at-top
  model, params = _small_model(joint)
  tokens, mask = _encode(['A sign that says "Hi".'] * 2, 32)
  maps = attention_maps.cross_attention_maps(
      model.module, params, jnp.zeros((2, 16, 32, 3)), tokens, mask, 500,
      jax.random.PRNGKey(0), jnp.array([[6, 4, 14, 10], [2, 2, 30, 14]], jnp.float32))
  assert maps.shape[0] == 2 and maps.shape[-1] == 32  # one map per caption token
  np.testing.assert_allclose(np.asarray(maps).sum(-1), 1.0, atol=1e-4)
