"""`python -m charred.convert` (also `charred.models.convert`): output equals a direct load;
bad input is one line."""

import json
import os

from flax.traverse_util import flatten_dict
import numpy as np
import pytest

from charred.models import pretrained
from conftest import run_cli

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
T5X_LEGACY = os.path.join(FIXTURES, 't5x', 'test_t5_tiny.checkpoint_0')


def _flat(params):
  return {k: np.asarray(v) for k, v in flatten_dict(params, sep='/').items()}


def test_t5x_checkpoint_converts_to_what_load_pretrained_reads(tmp_path):
  out = str(tmp_path / 'byt5')
  proc = run_cli('convert', T5X_LEGACY, out)
  assert 't5_encoder: 258,728 parameters' in proc.stdout  # the decoder is not converted
  assert proc.stderr == ''
  direct_module, direct = pretrained.load_pretrained(T5X_LEGACY)
  module, converted = pretrained.load_pretrained(out)
  assert module.config == direct_module.config
  direct, converted = _flat(direct), _flat(converted)
  assert set(direct) == set(converted)
  for name in direct:
    np.testing.assert_array_equal(converted[name], direct[name], err_msg=name)
  # An existing output is never overwritten without asking (the command's other name too).
  proc = run_cli('models.convert', T5X_LEGACY, out, check=False)
  assert proc.returncode == 2 and 'exists' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_sources_are_one_line_errors_and_write_nothing(tmp_path):
  truncated = tmp_path / 'truncated_checkpoint'
  truncated.write_bytes(open(T5X_LEGACY, 'rb').read()[:100_000])
  for src, message in ((str(tmp_path / 'missing'), 'does not exist'),
                       (str(truncated), 'truncated')):
    out = tmp_path / 'out'
    proc = run_cli('convert', src, str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == ['truncated_checkpoint']


def test_stable_diffusion_layout_converts_and_exports_back(tmp_path):
  """An SD-style repository (model_index.json, unet/, vae/) -> OUT/unet, OUT/vae; the U-Net
  exported again with --to_diffusers computes what the original diffusers model computes."""
  diffusers = pytest.importorskip('diffusers')
  from test_convert_diffusers import (_rel_err, _run_charred_unet, _run_torch_unet,
                                      _torch_unet, _torch_vae, _unet_inputs)
  repo = tmp_path / 'sd'
  unet = _torch_unet('linear_upcast')
  unet.save_pretrained(repo / 'unet')
  _torch_vae().save_pretrained(repo / 'vae', safe_serialization=False)
  (repo / 'model_index.json').write_text(json.dumps({'_class_name': 'StableDiffusionPipeline'}))
  out = tmp_path / 'converted'
  run_cli('convert', str(repo), str(out))
  assert sorted(os.listdir(out)) == ['unet', 'vae']
  sample, t, ctx, mask = _unet_inputs(24)
  reference = _run_torch_unet(unet, sample, t, ctx, mask)
  module, params = pretrained.load_pretrained(str(out / 'unet'))
  assert _rel_err(_run_charred_unet(module, params, sample, t, ctx, mask), reference) <= 1e-5
  assert type(pretrained.load_pretrained(str(out / 'vae'))[0]).__name__ == 'AutoencoderKL'

  run_cli('convert', '--to_diffusers', str(out / 'unet'), str(tmp_path / 'back'))
  again = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / 'back')).eval()
  assert _rel_err(_run_torch_unet(again, sample, t, ctx, mask), reference) <= 1e-5
