"""AOT export (charred.aot, python -m charred.export): jax.export StableHLO and IREE modules
with the weights in a .irpa, against the JAX functions they came from."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytest.importorskip('iree.compiler', reason='iree-base-compiler (the test extra) is needed')
pytest.importorskip('iree.runtime', reason='iree-base-runtime (the test extra) is needed')

from charred import aot  # pylint: disable=g-import-not-at-top,wrong-import-position
from charred.models import pretrained  # pylint: disable=wrong-import-position
from charred.models.diffusion_model import DiffusionModel  # pylint: disable=wrong-import-position
from charred.models.generation import PromptTooLongError  # pylint: disable=wrong-import-position
from charred.pipeline import TextToImagePipeline, to_array  # pylint: disable=wrong-import-position
from conftest import run_cli  # pylint: disable=wrong-import-position
from test_quote_positions import tiny_config  # pylint: disable=wrong-import-position

PROMPTS = ['A sign that says "Hi".', 'x']
STEPS, SEED = 3, 5


def write_run(workdir, config, params, step=7):
  """A run folder as charred.main leaves it, as far as from_pretrained reads it."""
  pretrained.write_run_model(str(workdir), config)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(workdir / 'checkpoints' / str(step) / 'state', {'ema_params': params})


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  model = DiffusionModel(tiny_config())
  write_run(workdir, model.config, model.init_params(jax.random.PRNGKey(0)))
  return str(workdir)


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  """(the pipeline, the export folder python -m charred.export wrote for 2 prompts)."""
  out = str(tmp_path_factory.mktemp('export') / 'tiny')
  proc = run_cli('export', f'--workdir={run}', f'--out={out}', '--batch=2',
                 f'--steps={STEPS}', '--targets=llvm-cpu')
  assert 'Wrote' in proc.stdout
  return TextToImagePipeline.from_pretrained(run), out


def _generator(pipe):
  return pipe.generator(num_steps=STEPS)


def _stages(pipe, tokens, mask, seed=SEED, params=None):
  """JAX's encode_text, sample and decode outputs, as the export's signatures read."""
  g = _generator(pipe)
  params = g.params if params is None else params
  context, uncond = g.encode_prompts(params, tokens, mask)
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
  x = g.sample_loop(params, tokens, mask, context, uncond, rng)
  return {'encode_text': [context, uncond], 'sample': [x], 'decode': [g.decode({}, x)]}


def _inputs(tokens, mask, stages, seed=SEED):
  context, uncond = stages['encode_text']
  return {'encode_text': [tokens, mask], 'sample': [tokens, mask, context, uncond,
                                                    np.int32(seed)],
          'decode': [stages['sample'][0]]}


def test_the_manifest_lists_inputs_outputs_shapes_and_settings(exported, run):
  pipe, out = exported
  manifest = json.load(open(os.path.join(out, 'manifest.json')))
  fns = manifest['functions']
  assert list(fns) == ['encode_text', 'sample', 'decode']
  shapes = lambda specs: {s['name']: (s['shape'], s['dtype']) for s in specs}
  assert shapes(fns['encode_text']['inputs']) == {'tokens': ([2, 32], 'int32'),
                                                  'mask': ([2, 32], 'int32')}
  assert shapes(fns['encode_text']['outputs']) == {'context': ([2, 32, 16], 'float32'),
                                                   'uncond': ([2, 32, 16], 'float32')}
  assert shapes(fns['sample']['inputs'])['seed'] == ([], 'int32')
  assert shapes(fns['sample']['outputs']) == {'x': ([2, 8, 16, 3], 'float32')}
  assert shapes(fns['decode']['outputs']) == {'image': ([2, 8, 16, 3], 'float32')}
  settings = manifest['settings']
  assert (settings['batch'], settings['num_steps'], settings['workdir']) == (2, STEPS, run)
  assert settings['guidance_scale'] == pipe.guidance_scale
  # The text encoder's weights go to encode_text only, the U-Net's to sample only.
  names = lambda fn: {p['name'].split('/')[1] for p in fns[fn]['parameters']}
  assert names('encode_text') == {'text_encoder'} and names('sample') == {'unet'}
  assert fns['decode']['parameters'] == []  # pixel space: the identity
  for entry in fns.values():
    assert os.path.isfile(os.path.join(out, entry['vmfb']['llvm-cpu']['file']))


def test_the_stablehlo_equals_the_jax_functions(exported):
  pipe, out = exported
  tokens, mask = _generator(pipe).tokenize(PROMPTS)
  want = _stages(pipe, tokens, mask)
  inputs = _inputs(tokens, mask, want)
  for name in aot.FUNCTIONS:
    fn, params = aot.jax_function(out, name)
    got = fn.call(*params, *inputs[name])
    for g, w in zip(got, want[name]):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)


# IREE's kernels sum in other orders than XLA's: the networks agree to ~1e-5. The sampling
# loop scales the U-Net's noise estimate by up to 1/sqrt(alpha_bar) ~ 15 for x0 at the
# trailing schedule's first step and by the guidance scale (3), step after step: its
# output is held to a quarter of a grey level ((1/127.5) / 4 in [-1, 1]) instead.
TOLERANCE = {'encode_text': 1e-4, 'sample': 2e-3, 'decode': 1e-4}


def _assert_close(got, want, name):
  got, want = np.asarray(got), np.asarray(want)
  scale = max(1.0, float(np.abs(want).max()))
  assert got.shape == want.shape, name
  assert np.abs(got - want).max() <= TOLERANCE[name] * scale, (name, np.abs(got - want).max())


def test_the_iree_modules_with_weights_from_the_archive_equal_jax(exported):
  pipe, out = exported
  model = aot.IreeModel(out)
  tokens, mask = _generator(pipe).tokenize(PROMPTS)
  want = _stages(pipe, tokens, mask)
  inputs = _inputs(tokens, mask, want)
  for name in aot.FUNCTIONS:
    got = model.run(name, *inputs[name])
    assert len(got) == len(want[name])
    for g, w in zip(got, want[name]):
      _assert_close(g, w, name)
  # Prompts to pixels, as the pipeline draws them (rounding may differ by a grey level).
  images = model(PROMPTS, seed=SEED)
  reference = to_array(pipe(PROMPTS, num_steps=STEPS, seed=SEED))
  assert images.shape == reference.shape == (2, 8, 16, 3) and images.dtype == np.uint8
  assert np.abs(images.astype(int) - reference).max() <= 1
  assert (images != to_array(pipe(PROMPTS, num_steps=STEPS, seed=SEED + 1))).any()


def test_the_modules_hold_no_weights_and_serve_retrained_ones(exported, tmp_path):
  pipe, out = exported
  manifest = aot.read_manifest(out)
  vmfbs = b''.join(open(os.path.join(out, e['vmfb']['llvm-cpu']['file']), 'rb').read()
                   for e in manifest['functions'].values())
  archive = open(os.path.join(out, 'weights.irpa'), 'rb').read()
  # Initialised at random (not the zeros and ones of biases and norms): 64 bytes of one
  # are found only where that tensor was written.
  big = [np.asarray(v) for v in jax.tree_util.tree_leaves(pipe.params)
         if np.asarray(v).nbytes >= 256 and np.unique(np.asarray(v).ravel()[:16]).size == 16]
  assert len(big) > 20
  for value in big:
    window = value.tobytes()[:64]
    assert window in archive  # the search finds raw weights where they are
    assert window not in vmfbs
  # Retrained weights: same names and shapes, another archive, the same modules.
  other = DiffusionModel(tiny_config()).init_params(jax.random.PRNGKey(9))
  names, values, _ = aot._flat('model', other)  # pylint: disable=protected-access
  path = str(tmp_path / 'retrained.irpa')
  aot.write_parameters(path, names, values)
  model = aot.IreeModel(out, parameters=path)
  tokens, mask = _generator(pipe).tokenize(PROMPTS)
  want = _stages(pipe, tokens, mask, params=other)
  ours = _stages(pipe, tokens, mask)
  assert np.abs(np.asarray(want['sample'][0]) - np.asarray(ours['sample'][0])).max() > 0.01
  context, uncond = model.run('encode_text', tokens, mask)
  _assert_close(context, want['encode_text'][0], 'encode_text')
  x, = model.run('sample', tokens, mask, context, uncond, np.int32(SEED))
  _assert_close(x, want['sample'][0], 'sample')
  # An archive of other shapes is refused by name.
  wrong = DiffusionModel(tiny_config(unet=dict(block_out_channels=(8, 24))))
  names, values, _ = aot._flat('model', wrong.init_params(jax.random.PRNGKey(0)))  # pylint: disable=protected-access
  aot.write_parameters(str(tmp_path / 'wrong.irpa'), names, values)
  with pytest.raises(aot.ExportError, match='parameter model/unet/.* bytes, the modules need'):
    aot.IreeModel(out, parameters=str(tmp_path / 'wrong.irpa'))


def test_bad_inputs_to_the_modules_are_one_line_errors(exported, tmp_path):
  _, out = exported
  model = aot.IreeModel(out)
  with pytest.raises(aot.ExportError, match='3 prompts for an export of batch 2') as e:
    model(PROMPTS + ['y'])
  assert '\n' not in str(e.value)
  with pytest.raises(PromptTooLongError, match="export's maximum of 32"):
    model(['a' * 40, 'b'])
  with pytest.raises(aot.ExportError, match=r'input tokens has shape \[1, 32\]'):
    model.run('encode_text', np.zeros((1, 32), np.int32), np.ones((1, 32), np.int32))
  with pytest.raises(aot.ExportError, match='not box-conditioned|boxes= is for'):
    model(PROMPTS, boxes=[(0, 0, 16, 8)] * 2)
  # A module swapped for another model's (or compiler's) is refused by its hash.
  tampered = tmp_path / 'tampered'
  shutil.copytree(out, tampered)
  decode = aot.read_manifest(str(tampered))['functions']['decode']['vmfb']['llvm-cpu']['file']
  sample = aot.read_manifest(str(tampered))['functions']['sample']['vmfb']['llvm-cpu']['file']
  shutil.copy(tampered / decode, tampered / sample)
  with pytest.raises(aot.ExportError, match='is not the module manifest.json names'):
    aot.IreeModel(str(tampered))
  with pytest.raises(aot.ExportError, match='holds no manifest.json'):
    aot.IreeModel(str(tmp_path))


def _one_error_line(proc):
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if ': error: ' in l]
  assert len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


def test_the_command_refuses_a_run_without_checkpoints_and_a_used_out(run, tmp_path):
  empty = tmp_path / 'no_checkpoints'
  pretrained.write_run_model(str(empty), tiny_config())
  (empty / 'checkpoints').mkdir()
  proc = run_cli('export', f'--workdir={empty}', f'--out={tmp_path / "a"}', check=False)
  assert 'no checkpoint under' in _one_error_line(proc)
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'a.partial').exists()
  used = tmp_path / 'used'
  used.mkdir()
  (used / 'keep.txt').write_text('mine')
  proc = run_cli('export', f'--workdir={run}', f'--out={used}', check=False)
  assert 'exists and is not empty: pass --overwrite' in _one_error_line(proc)
  assert os.listdir(used) == ['keep.txt'] and (used / 'keep.txt').read_text() == 'mine'


def test_a_box_conditioned_export_takes_boxes(tmp_path):
  model = DiffusionModel(tiny_config(box_conditioning=True, quote_positions=True))
  pipe = TextToImagePipeline(model, model.init_params(jax.random.PRNGKey(1)))
  manifest = pipe.export(str(tmp_path / 'box'), batch=2, num_steps=2, targets=['llvm-cpu'])
  assert manifest['functions']['sample']['inputs'][-1] == {
      'name': 'boxes', 'shape': [2, 4], 'dtype': 'int32'}
  boxes = [(0, 0, 16, 8), (2, 1, 12, 7)]
  iree = aot.IreeModel(str(tmp_path / 'box'))
  got = iree(PROMPTS, seed=3, boxes=boxes)
  want = to_array(pipe(PROMPTS, num_steps=2, seed=3, boxes=boxes))
  assert np.abs(got.astype(int) - want).max() <= 1
  moved = iree(PROMPTS, seed=3, boxes=[(0, 0, 8, 4), (2, 1, 12, 7)])
  assert (moved[0] != got[0]).any()
  with pytest.raises(aot.ExportError, match='box-conditioned: pass boxes='):
    iree(PROMPTS, seed=3)
