"""diffusers U-Nets and VAEs in and out of charred, against diffusers' PyTorch classes.

Tiny random models (float32, CPU), every weight perturbed (diffusers zero-initialises
conv_out, proj_out and friends, which would hide a wrong mapping), saved with
`save_pretrained` and read back through `pretrained.load_pretrained`.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred.models import pretrained
from charred.models.convert import core
from charred.models.convert import diffusers as convert
from charred.models.convert.sources import CheckpointFormatError
from charred.models.unet import UNet, UNetConfig
from charred.models.vae import AutoencoderKL

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'diffusers_flax')
TOLERANCE = 1e-5  # max |a - b| / max |b|

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                 down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                 up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1,
                 attention_head_dim=(2, 4), cross_attention_dim=24, norm_num_groups=8)
UNET_CASES = {
    'linear_upcast': dict(use_linear_projection=True, upcast_attention=True),
    'conv_proj_sin_first_shift': dict(use_linear_projection=False, flip_sin_to_cos=False,
                                      freq_shift=1, norm_num_groups=32, layers_per_block=(1, 2)),
    'text_proj_depth2': dict(use_linear_projection=True, encoder_hid_dim=40,
                             transformer_layers_per_block=(2, 1)),
}


def _rel_err(ours, theirs):
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def _perturb(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _torch_unet(case, seed=0):
  return _perturb(diffusers.UNet2DConditionModel(**{**TINY_UNET, **UNET_CASES[case]}), seed)


def _unet_inputs(width):
  rng = np.random.default_rng(1)
  mask = np.ones((2, 7), np.int64)
  mask[0, 5:] = 0
  mask[1, 2:] = 0
  return (rng.normal(size=(2, 4, 8, 8)).astype(np.float32), np.array([3, 700]),
          rng.normal(size=(2, 7, width)).astype(np.float32), mask)


def _run_torch_unet(model, sample, t, ctx, mask=None):
  with torch.no_grad():
    return model(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ctx),
                 encoder_attention_mask=None if mask is None else torch.from_numpy(mask)
                 ).sample.numpy()


def _run_charred_unet(module, params, sample, t, ctx, mask=None):
  out = jax.jit(module.apply)({'params': params}, sample.transpose(0, 2, 3, 1), t, ctx, mask)
  return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize('case', sorted(UNET_CASES))
def test_unet_matches_diffusers_pytorch_and_round_trips(case, tmp_path):
  theirs = _torch_unet(case)
  theirs.save_pretrained(tmp_path / 'unet')
  module, params = pretrained.load_pretrained(str(tmp_path / 'unet'))
  sample, t, ctx, mask = _unet_inputs(UNET_CASES[case].get('encoder_hid_dim', 24))
  expected = _run_torch_unet(theirs, sample, t, ctx, mask)
  err = _rel_err(_run_charred_unet(module, params, sample, t, ctx, mask), expected)
  assert err <= TOLERANCE, err
  # charred -> diffusers: the export loads with current names, none missing or unexpected,
  # and computes the same function.
  convert.export_diffusers('unet', module.config, params, str(tmp_path / 'out'))
  again, info = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / 'out'),
                                                               output_loading_info=True)
  assert not any(info.values()), info
  np.testing.assert_array_equal(_run_torch_unet(again.eval(), sample, t, ctx, mask), expected)
  assert convert.unet_config_from_diffusers(dict(again.config)) == module.config
  # The mask mattered: diffusers without it gives something else.
  assert _rel_err(_run_torch_unet(theirs, sample, t, ctx), _run_torch_unet(
      theirs, sample, t, ctx, mask)) > 1e-3
  if case == 'linear_upcast':
    err = _rel_err(_run_charred_unet(module, params, sample, t, ctx),
                   _run_torch_unet(theirs, sample, t, ctx))
    assert err <= TOLERANCE, err
    # The same weights as a torch .bin convert to the same parameters.
    theirs.save_pretrained(tmp_path / 'unet_bin', safe_serialization=False)
    assert os.path.exists(tmp_path / 'unet_bin' / convert.TORCH_BIN_FILE)
    _, from_bin = pretrained.load_pretrained(str(tmp_path / 'unet_bin'))
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_bin, params)


def test_query_chunked_attention_matches_diffusers_and_keeps_gradients(tmp_path):
  theirs = _torch_unet('linear_upcast')
  theirs.save_pretrained(tmp_path / 'unet')
  module, params = pretrained.load_pretrained(str(tmp_path / 'unet'))
  chunked = UNet(dataclasses.replace(module.config, attention_query_chunk=16))  # 64 positions
  sample, t, ctx, mask = _unet_inputs(24)
  expected = _run_torch_unet(theirs, sample, t, ctx, mask)
  assert _rel_err(_run_charred_unet(chunked, params, sample, t, ctx, mask), expected) <= TOLERANCE
  loss = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(jnp.square(m.apply(
      {'params': p}, sample.transpose(0, 2, 3, 1), t, ctx, mask)))))
  g_plain, g_chunked = loss(module)(params), loss(chunked)(params)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_plain)):
    assert _rel_err(a, np.asarray(b)) <= TOLERANCE


# --- VAE ------------------------------------------------------------------------------------

TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=('DownEncoderBlock2D',) * 2,
                up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, latent_channels=4,
                norm_num_groups=8, sample_size=16)


def _torch_vae(seed=0):
  return _perturb(diffusers.AutoencoderKL(**TINY_VAE), seed)


def _legacy_attention_names(folder, conv_shaped):
  """Rewrites a saved VAE with the attention names (and optionally the 1x1-conv weight
  shapes) of checkpoints written before diffusers 0.14, such as SD 2.1's own VAE."""
  from safetensors.torch import load_file, save_file  # pylint: disable=g-import-not-at-top
  path = folder / convert.SAFETENSORS_FILE
  state = load_file(path)
  old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  renamed = {}
  for name, value in state.items():
    for new, legacy in old.items():
      if f'attentions.0.{new}.' in name:
        name = name.replace(f'attentions.0.{new}.', f'attentions.0.{legacy}.')
        if conv_shaped and value.ndim == 2:
          value = value[:, :, None, None]
    renamed[name] = value.contiguous()
  assert renamed.keys() != state.keys()
  save_file(renamed, path)


def test_vae_matches_diffusers_pytorch_and_reads_legacy_attention_names(tmp_path):
  theirs = _torch_vae()
  theirs.save_pretrained(tmp_path / 'vae')
  module, params = pretrained.load_pretrained(str(tmp_path / 'vae'))
  images = np.random.default_rng(2).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    posterior = theirs.encode(torch.from_numpy(images)).latent_dist
    mean, logvar = posterior.mean.numpy(), posterior.logvar.numpy()
    decoded = theirs.decode(torch.from_numpy(mean)).sample.numpy()
  ours = jax.jit(lambda p, x: module.apply({'params': p}, x, method=AutoencoderKL.encode))(
      params, images.transpose(0, 2, 3, 1))
  nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
  assert _rel_err(nchw(ours[0]), mean) <= TOLERANCE
  assert _rel_err(nchw(ours[1]), logvar) <= TOLERANCE
  ours_decoded = jax.jit(lambda p, z: module.apply({'params': p}, z, method=AutoencoderKL.decode))(
      params, mean.transpose(0, 2, 3, 1))
  assert _rel_err(nchw(ours_decoded), decoded) <= TOLERANCE
  theirs.save_pretrained(tmp_path / 'sharded', max_shard_size='100KB')
  assert len(list((tmp_path / 'sharded').glob('*.safetensors'))) > 1
  _, sharded = pretrained.load_pretrained(str(tmp_path / 'sharded'))
  jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, params)
  for conv_shaped in (False, True):
    legacy = tmp_path / f'legacy_{conv_shaped}'
    shutil.copytree(tmp_path / 'vae', legacy)
    _legacy_attention_names(legacy, conv_shaped)
    _, legacy_params = pretrained.load_pretrained(str(legacy))
    jax.tree_util.tree_map(np.testing.assert_array_equal, legacy_params, params)


def test_vae_round_trips_through_export(tmp_path):
  theirs = _torch_vae(seed=3)
  theirs.save_pretrained(tmp_path / 'in', safe_serialization=False)
  module, params = pretrained.load_pretrained(str(tmp_path / 'in'))
  convert.export_diffusers('autoencoder_kl', module.config, params, str(tmp_path / 'out'))
  again, info = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / 'out'),
                                                        output_loading_info=True)
  assert not any(info.values()), info
  ref, got = theirs.state_dict(), again.state_dict()
  assert ref.keys() == got.keys()
  for name in ref:
    np.testing.assert_array_equal(got[name].numpy(), ref[name].numpy())


# --- diffusers 0.39's Flax format (the original CHARRED U-Net's) ------------------------------


def test_diffusers_flax_fixtures_load_and_match_their_references():
  module, params = pretrained.load_pretrained(os.path.join(FIXTURES, 'unet'))
  assert module.config.gelu_approximate and module.config.transformer_norm_eps == 1e-5
  ref = np.load(os.path.join(FIXTURES, 'unet_reference.npz'))
  out = _run_charred_unet(module, params, ref['sample'], ref['timesteps'],
                          ref['encoder_hidden_states'])
  assert _rel_err(out, ref['output']) <= TOLERANCE
  module, params = pretrained.load_pretrained(os.path.join(FIXTURES, 'vae'))
  ref = np.load(os.path.join(FIXTURES, 'vae_reference.npz'))
  mean, _ = jax.jit(lambda p, x: module.apply({'params': p}, x, method=AutoencoderKL.encode))(
      params, ref['image'].transpose(0, 2, 3, 1))
  assert _rel_err(mean, ref['latent_mean']) <= TOLERANCE  # the fixture stores it NHWC


# --- configs --------------------------------------------------------------------------------


def test_sd21_unet_config_converts_both_ways():
  raw = {'_class_name': 'UNet2DConditionModel', '_diffusers_version': '0.10.0.dev0',
         'act_fn': 'silu', 'attention_head_dim': [5, 10, 20, 20],
         'block_out_channels': [320, 640, 1280, 1280], 'center_input_sample': False,
         'cross_attention_dim': 1024, 'down_block_types': ['CrossAttnDownBlock2D'] * 3 + [
             'DownBlock2D'], 'downsample_padding': 1, 'dual_cross_attention': False,
         'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 4, 'layers_per_block': 2,
         'mid_block_scale_factor': 1, 'norm_eps': 1e-05, 'norm_num_groups': 32,
         'num_class_embeds': None, 'only_cross_attention': False, 'out_channels': 4,
         'sample_size': 96, 'up_block_types': ['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3,
         'upcast_attention': True, 'use_linear_projection': True}
  config = convert.unet_config_from_diffusers(raw)
  assert config == UNetConfig(sample_size=96)
  assert convert.unet_config_from_diffusers(convert.unet_config_to_diffusers(config)) == config


@pytest.mark.parametrize('option, value', [
    ('class_embed_type', 'timestep'), ('addition_embed_type', 'text_time'),
    ('attention_type', 'gated'), ('dual_cross_attention', True),
    ('resnet_time_scale_shift', 'scale_shift'), ('encoder_hid_dim_type', 'image_proj'),
    ('mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'), ('time_cond_proj_dim', 256),
    ('down_block_types', ['SimpleCrossAttnDownBlock2D', 'DownBlock2D']),
    ('some_future_option', 1)])
def test_unsupported_unet_options_are_named(option, value):
  raw = {'_class_name': 'UNet2DConditionModel', **TINY_UNET, 'encoder_hid_dim': 8,
         option: value}
  with pytest.raises(ValueError, match=option):
    convert.unet_config_from_diffusers(raw)


@pytest.mark.parametrize('option, value', [('use_quant_conv', False), ('shift_factor', 0.1),
                                           ('up_block_types', ['UpDecoderBlock2D'])])
def test_unsupported_vae_options_are_named(option, value):
  with pytest.raises(ValueError, match=option):
    convert.vae_config_from_diffusers({'_class_name': 'AutoencoderKL', **TINY_VAE,
                                       option: value})


def test_unknown_diffusers_class_is_a_clear_error(tmp_path):
  (tmp_path / 'm').mkdir()
  (tmp_path / 'm' / 'config.json').write_text(json.dumps({'_class_name': 'UNet2DModel'}))
  with pytest.raises(ValueError, match="'UNet2DModel' is not supported"):
    pretrained.load_pretrained(str(tmp_path / 'm'))


# --- bad input ------------------------------------------------------------------------------


def _saved_tiny_unet(folder):
  diffusers.UNet2DConditionModel(**TINY_UNET).save_pretrained(folder)
  return folder


def test_config_weights_mismatch_names_the_parameter_and_both_shapes(tmp_path):
  folder = _saved_tiny_unet(tmp_path / 'unet')
  raw = json.loads((folder / 'config.json').read_text())
  raw['cross_attention_dim'] = 32
  (folder / 'config.json').write_text(json.dumps(raw))
  with pytest.raises(core.ParameterMismatchError,
                     match=r'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.'
                     r'to_k\.weight has shape \(32, 24\).*needs \(32, 32\)'):
    pretrained.load_pretrained(str(folder))


def test_truncated_safetensors_is_a_checkpoint_format_error(tmp_path):
  folder = _saved_tiny_unet(tmp_path / 'unet')
  weights = folder / convert.SAFETENSORS_FILE
  weights.write_bytes(weights.read_bytes()[:-1000])
  with pytest.raises(CheckpointFormatError, match='truncated'):
    pretrained.load_pretrained(str(folder))


def test_failed_exports_and_conversions_leave_no_folder_behind(tmp_path):
  module, params = pretrained.load_pretrained(os.path.join(FIXTURES, 'unet'))
  out = tmp_path / 'out'
  # Exported as is, the Flax port's tanh-GELU would silently change the network.
  with pytest.raises(ValueError, match='gelu_approximate'):
    convert.export_diffusers('unet', module.config, params, str(out))
  assert not os.listdir(tmp_path)
  del params['conv_out']
  with pytest.raises(core.ParameterMismatchError, match='conv_out/bias'):
    convert.export_diffusers('unet', UNetConfig(**{**module.config.__dict__,
                                                   'gelu_approximate': False,
                                                   'transformer_norm_eps': 1e-6}),
                             params, str(out))
  assert not os.listdir(tmp_path)
  # A tensor that turns out unreadable half-way through a conversion.
  plan = pretrained.plan_conversion(os.path.join(FIXTURES, 'unet'))
  expected = pretrained.parameter_shapes(plan.kind, plan.config)
  last = plan.rules[list(expected)[-1]].source

  def unreadable():
    raise CheckpointFormatError(f'{last}: corrupt')

  plan.source[last] = type(plan.source[last])(plan.source[last].shape,
                                              plan.source[last].dtype, unreadable)
  with pytest.raises(CheckpointFormatError, match='corrupt'):
    pretrained.save_pretrained(str(out), plan.kind, plan.config,
                               core.iter_converted(plan, expected))
  assert not os.listdir(tmp_path)
