"""TextToImagePipeline: ImageGenerator's images as PIL images, from a run's workdir; and
its int8 quantisation (charred.models.quantize, with qwix)."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax.traverse_util import flatten_dict

from charred.configs import runs
from charred.models import quantize
from charred.models.diffusion_model import DiffusionModel
from charred.pipeline import TextToImagePipeline, to_array
from test_quote_positions import tiny_config

PROMPTS = ['A sign that says "Hi".', 'It says "ok".', 'x']


@pytest.fixture(scope='module')
def tiny():
  model = DiffusionModel(tiny_config())
  return model, model.init_params(jax.random.PRNGKey(0))


def test_images_equal_the_generators_bitwise(tiny):
  model, params = tiny
  pipe = TextToImagePipeline(model, params, guidance_scale=2.0)
  got = pipe(PROMPTS, num_steps=3, seed=5, scheduler='euler', batch_size=2)
  assert [image.size for image in got] == [(16, 8)] * 3 and got[0].mode == 'RGB'
  want = model.generator(params, num_steps=3, guidance_scale=2.0, scheduler='euler')(
      PROMPTS, seed=5, batch_size=2)
  np.testing.assert_array_equal(to_array(got), want)


def test_the_progress_bar_changes_no_pixel_and_settings_compile_once(tiny, capfd):
  model, params = tiny
  pipe = TextToImagePipeline(model, params)
  quiet = to_array(pipe(PROMPTS[:2], num_steps=2))
  assert 'sampling' not in capfd.readouterr().err
  shown = to_array(pipe(PROMPTS[:2], num_steps=2, progress=True))
  assert 'sampling' in capfd.readouterr().err
  np.testing.assert_array_equal(shown, quiet)
  pipe(PROMPTS[1:], num_steps=2, seed=1)
  generator = pipe.generator(num_steps=2)
  assert generator._sample._cache_size() == 1  # pylint: disable=protected-access


def test_boxes_pass_through_to_a_box_conditioned_model():
  model = DiffusionModel(tiny_config(box_conditioning=True, quote_positions=True))
  params = model.init_params(jax.random.PRNGKey(1))
  pipe = TextToImagePipeline(model, params)
  boxes = [(0, 0, 16, 8), (2, 1, 12, 7)]
  want = model.generator(params, num_steps=2, guidance_scale=pipe.guidance_scale)(
      PROMPTS[:2], boxes=boxes)
  np.testing.assert_array_equal(to_array(pipe(PROMPTS[:2], num_steps=2, boxes=boxes)), want)
  with pytest.raises(ValueError, match='needs boxes'):
    pipe(PROMPTS[:2], num_steps=2)


def test_from_pretrained_reads_a_run_with_and_without_its_gin_files(micro_run, tmp_path):
  pipe = TextToImagePipeline.from_pretrained(micro_run)
  run = runs.load_run(micro_run)
  assert pipe.step == run.step and pipe.guidance_scale == TextToImagePipeline.from_run(
      run).guidance_scale
  prompt = 'A sign that says "hello".'
  want = run.model.generator(run.params, num_steps=2, guidance_scale=pipe.guidance_scale)(
      [prompt], seed=3)
  np.testing.assert_array_equal(to_array(pipe(prompt, num_steps=2, seed=3)), want)
  # The model config charred.main records beside the checkpoints is enough.
  bare = tmp_path / 'bare'
  bare.mkdir()
  for name in ('charred_run.json', 'checkpoints'):
    os.symlink(os.path.join(micro_run, name), bare / name)
  gin_free = TextToImagePipeline.from_pretrained(str(bare))
  assert gin_free.model.config == run.model.config
  np.testing.assert_array_equal(
      to_array(gin_free(prompt, num_steps=2, guidance_scale=pipe.guidance_scale, seed=3)), want)


def test_a_path_that_is_no_run_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a directory') as missing:
    TextToImagePipeline.from_pretrained(str(tmp_path / 'nowhere'))
  assert '\n' not in str(missing.value)
  (tmp_path / 'unet').mkdir()
  (tmp_path / 'unet' / 'config.json').write_text('{"_class_name": "UNet2DConditionModel"}')
  with pytest.raises(ValueError, match='not a text-to-image model') as one_network:
    TextToImagePipeline.from_pretrained(str(tmp_path / 'unet'))
  assert '\n' not in str(one_network.value)
  with pytest.raises(ValueError, match='not a recognised checkpoint'):
    TextToImagePipeline.from_pretrained(str(tmp_path))


# -- int8 ---------------------------------------------------------------------------------


def _kernels(params):
  """Path -> the quantised leaves of `params`."""
  quantised = quantize._is_quantized  # pylint: disable=protected-access
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=quantised)
  return {jax.tree_util.keystr(p): v for p, v in leaves if quantised(v)}


@pytest.mark.parametrize('mode', quantize.MODES)
def test_int8_kernels_dequantise_within_half_a_step(tiny, mode):
  model, params = tiny
  pipe = TextToImagePipeline(model, params).to_int8(mode)
  kernels = _kernels(pipe.params)
  # Every matmul and convolution of the text encoder and the U-Net.
  assert any('text_encoder' in k for k in kernels) and any('conv_in' in k for k in kernels)
  assert all(v.array.qvalue.dtype == np.int8 for v in kernels.values())
  floats = flatten_dict(params, sep='/')
  restored = flatten_dict(quantize.dequantize_params(pipe.params), sep='/')
  assert set(restored) == set(floats)
  for name, value in floats.items():
    step = np.abs(np.asarray(value)).max() / 127  # at most a channel's scale
    np.testing.assert_allclose(restored[name], value, atol=step / 2 + 1e-7, err_msg=name)
  # The kernels take a quarter of their float bytes (plus a scale per channel).
  assert pipe.weight_bytes() < 0.5 * TextToImagePipeline(model, params).weight_bytes()


def test_weight_only_int8_computes_with_the_dequantised_kernels(tiny):
  model, params = tiny
  int8, qparams = model.quantized(params, 'weight_only')
  x, t, tokens, _ = (np.ones(a.shape, a.dtype) for a in model.abstract_inputs())
  apply = lambda m, p: m.module.apply({'params': p}, x, t, tokens, tokens)
  np.testing.assert_allclose(apply(int8, qparams),
                             apply(model, quantize.dequantize_params(qparams)), atol=1e-4)


def test_int8_params_save_and_restore_equal(tiny, tmp_path):
  model, params = tiny
  int8, qparams = model.quantized(params, 'dynamic')
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'int8', quantize.to_arrays(qparams))
    arrays = checkpointer.restore(tmp_path / 'int8')
  template = quantize.abstract_params(int8.module, *model.abstract_inputs())
  restored = quantize.from_arrays(arrays, template)
  assert jax.tree.structure(restored) == jax.tree.structure(qparams)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qparams)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  images = TextToImagePipeline(int8, restored)(PROMPTS[:1], num_steps=2)
  np.testing.assert_array_equal(
      to_array(images), to_array(TextToImagePipeline(int8, qparams)(PROMPTS[:1], num_steps=2)))


def test_unknown_quantisation_mode(tiny):
  with pytest.raises(ValueError, match='Unknown quantisation mode'):
    TextToImagePipeline(*tiny).to_int8('int4')
