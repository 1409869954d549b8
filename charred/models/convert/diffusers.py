"""diffusers U-Nets and AutoencoderKLs: configs, name mapping, import plans and export.

A diffusers folder is `config.json` plus weights in one of:
- `diffusion_pytorch_model.safetensors` (or sharded, with `.safetensors.index.json`);
- `diffusion_pytorch_model.bin` (read with torch's weights-only loader);
- `diffusion_flax_model.msgpack` (diffusers' retired Flax classes, the format the original
  CHARRED U-Net was published in): names are already charred's, '/'-joined.

PyTorch names are charred's with '.N' for '_N' list indices (`down_blocks.0.resnets.1`,
`to_out.0`, `ff.net.0.proj`; `linear_1` stays), `weight` for `kernel` (Linear [out, in] ->
[in, out], Conv [O, I, kh, kw] -> [kh, kw, I, O]) and for norms' `scale`. The VAE's
mid-block attention is `to_q/to_k/to_v/to_out.0` in current diffusers and
`query/key/value/proj_attn` in older checkpoints (SD 2.1's own VAE); both are read, as are
1x1-conv-shaped [C, C, 1, 1] attention weights.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict

from charred.models import model_kinds
from charred.models.convert import core, sources
from charred.models.unet import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNetConfig
from charred.models.vae import AutoencoderKLConfig

CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'diffusion_pytorch_model.safetensors'
TORCH_BIN_FILE = 'diffusion_pytorch_model.bin'
FLAX_FILE = 'diffusion_flax_model.msgpack'
# The release whose PyTorch classes `export_diffusers` output is tested against.
DIFFUSERS_VERSION = '0.42.1'

CLASS_KINDS = {'UNet2DConditionModel': 'unet', 'FlaxUNet2DConditionModel': 'unet',
               'AutoencoderKL': 'autoencoder_kl', 'FlaxAutoencoderKL': 'autoencoder_kl'}

# --- configs ------------------------------------------------------------------------------

# diffusers' UNet2DConditionModel defaults, for the keys charred reads.
_UNET_DEFAULTS = {
    'sample_size': None, 'in_channels': 4, 'out_channels': 4, 'flip_sin_to_cos': True,
    'freq_shift': 0,
    'down_block_types': ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                         'CrossAttnDownBlock2D', 'DownBlock2D'),
    'up_block_types': ('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                       'CrossAttnUpBlock2D'),
    'only_cross_attention': False, 'block_out_channels': (320, 640, 1280, 1280),
    'layers_per_block': 2, 'dropout': 0.0, 'norm_num_groups': 32, 'norm_eps': 1e-5,
    'cross_attention_dim': 1280, 'transformer_layers_per_block': 1, 'encoder_hid_dim': None,
    'encoder_hid_dim_type': None, 'attention_head_dim': 8, 'num_attention_heads': None,
    'use_linear_projection': False, 'upcast_attention': False, 'time_embedding_dim': None,
}

# Options charred's U-Net does not implement: the only value (diffusers' default) it accepts.
_UNET_FIXED = {
    'center_input_sample': False, 'mid_block_type': 'UNetMidBlock2DCrossAttn',
    'downsample_padding': 1, 'mid_block_scale_factor': 1, 'act_fn': 'silu',
    'reverse_transformer_layers_per_block': None, 'dual_cross_attention': False,
    'class_embed_type': None, 'addition_embed_type': None, 'num_class_embeds': None,
    'resnet_time_scale_shift': 'default', 'resnet_skip_time_act': False,
    'resnet_out_scale_factor': 1.0, 'time_embedding_type': 'positional',
    'time_embedding_act_fn': None, 'timestep_post_act': None, 'time_cond_proj_dim': None,
    'conv_in_kernel': 3, 'conv_out_kernel': 3, 'attention_type': 'default',
    'class_embeddings_concat': False, 'cross_attention_norm': None,
}

# Read and ignored: they only matter for options rejected above (or, for the Flax
# classes, for how attention is computed, not what).
_UNET_IGNORED = {'mid_block_only_cross_attention', 'addition_embed_type_num_heads',
                 'addition_time_embed_dim', 'projection_class_embeddings_input_dim',
                 'use_memory_efficient_attention', 'split_head_dim'}

_VAE_DEFAULTS = {
    'in_channels': 3, 'out_channels': 3, 'down_block_types': ('DownEncoderBlock2D',),
    'up_block_types': ('UpDecoderBlock2D',), 'block_out_channels': (64,),
    'layers_per_block': 1, 'latent_channels': 4, 'norm_num_groups': 32, 'sample_size': 32,
    'scaling_factor': 0.18215,
}
_VAE_FIXED = {'act_fn': 'silu', 'shift_factor': None, 'latents_mean': None,
              'latents_std': None, 'use_quant_conv': True, 'use_post_quant_conv': True,
              'mid_block_add_attention': True}
_VAE_IGNORED = {'force_upcast'}


def _tuple(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _one_value(value, option: str, what: str, why: str):
  """`value`, or the one value a tuple of equal values repeats; else a ValueError."""
  if not isinstance(value, tuple):
    return value
  if len(set(value)) != 1:
    raise ValueError(f'{what}: diffusers option {option}={list(value)} {why}.')
  return value[0]


def _check_options(raw: dict, known: set, fixed: dict, what: str) -> None:
  unknown = sorted(k for k in raw if not k.startswith('_') and k not in known)
  if unknown:
    raise ValueError(f'{what}: unknown diffusers option(s) {unknown}.')
  for key, allowed in fixed.items():
    if key in raw and _tuple(raw[key]) != allowed:
      raise ValueError(f'{what}: diffusers option {key}={raw[key]!r} is not supported '
                       f'(charred implements only {allowed!r}).')


def unet_config_from_diffusers(raw: dict) -> UNetConfig:
  """A diffusers `(Flax)UNet2DConditionModel` config.json dict -> UNetConfig.

  Raises ValueError naming the first option charred does not implement."""
  what = raw.get('_class_name') or 'UNet2DConditionModel'
  _check_options(raw, set(_UNET_DEFAULTS) | set(_UNET_FIXED) | _UNET_IGNORED, _UNET_FIXED,
                 what)
  r = {k: _tuple(raw.get(k, v)) for k, v in _UNET_DEFAULTS.items()}
  channels = tuple(r['block_out_channels'])
  for key, types, known in (('down_block_types', r['down_block_types'], DOWN_BLOCK_TYPES),
                            ('up_block_types', r['up_block_types'], UP_BLOCK_TYPES)):
    bad = [t for t in types if t not in known]
    if bad:
      raise ValueError(f'{what}: diffusers option {key} has {bad}, not supported (charred '
                       f'implements {known}).')
  if r['norm_num_groups'] is None:
    raise ValueError(f'{what}: diffusers option norm_num_groups=None is not supported.')
  if r['time_embedding_dim'] not in (None, 4 * channels[0]):
    raise ValueError(f'{what}: diffusers option time_embedding_dim={r["time_embedding_dim"]} '
                     f'is not supported (charred uses 4 * block_out_channels[0]).')
  cross = _one_value(r['cross_attention_dim'], 'cross_attention_dim', what,
                     '(one per block) is not supported; charred takes one width')
  hid_type = r['encoder_hid_dim_type']
  if hid_type is None and r['encoder_hid_dim'] is not None:
    hid_type = 'text_proj'  # as diffusers defaults it
  if hid_type not in (None, 'text_proj'):
    raise ValueError(f'{what}: diffusers option encoder_hid_dim_type={hid_type!r} is not '
                     "supported (only 'text_proj').")
  if hid_type == 'text_proj' and r['encoder_hid_dim'] is None:
    raise ValueError(f"{what}: encoder_hid_dim_type='text_proj' needs encoder_hid_dim.")
  tlpb = r['transformer_layers_per_block']
  if isinstance(tlpb, tuple) and any(isinstance(t, (list, tuple)) for t in tlpb):
    raise ValueError(f'{what}: diffusers option transformer_layers_per_block={list(tlpb)} '
                     '(per layer) is not supported; give one depth per block.')
  size = _one_value(r['sample_size'], 'sample_size', what, '(not square) is not supported')
  flax = what.startswith('Flax')
  return UNetConfig(
      sample_size=64 if size is None else int(size),
      in_channels=r['in_channels'], out_channels=r['out_channels'],
      down_block_types=r['down_block_types'], up_block_types=r['up_block_types'],
      block_out_channels=channels, layers_per_block=r['layers_per_block'],
      attention_head_dim=r['attention_head_dim'],
      num_attention_heads=r['num_attention_heads'],
      transformer_layers_per_block=tlpb, cross_attention_dim=cross,
      encoder_hid_dim=r['encoder_hid_dim'] if hid_type else None,
      only_cross_attention=r['only_cross_attention'],
      use_linear_projection=r['use_linear_projection'],
      upcast_attention=r['upcast_attention'], flip_sin_to_cos=r['flip_sin_to_cos'],
      freq_shift=r['freq_shift'], norm_num_groups=r['norm_num_groups'],
      norm_eps=r['norm_eps'], dropout=r['dropout'],
      # diffusers' Flax port: tanh-GELU and GroupNorm eps 1e-5 in its transformer blocks.
      gelu_approximate=flax, transformer_norm_eps=1e-5 if flax else 1e-6)


def unet_config_to_diffusers(config: UNetConfig) -> dict:
  """UNetConfig -> a config.json dict diffusers' `UNet2DConditionModel` builds the same
  network from. Raises ValueError for what diffusers' PyTorch U-Net cannot express."""
  c = config
  for name, value, needed in (('position_embedding', c.position_embedding, False),
                              ('gelu_approximate', c.gelu_approximate, False),
                              ('transformer_norm_eps', c.transformer_norm_eps, 1e-6)):
    if value != needed:
      raise ValueError(f"UNetConfig.{name}={value!r} has no diffusers equivalent (diffusers' "
                       f'UNet2DConditionModel needs {needed!r}).')
  listify = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  out = {
      '_class_name': 'UNet2DConditionModel', '_diffusers_version': DIFFUSERS_VERSION,
      'sample_size': c.sample_size, 'in_channels': c.in_channels,
      'out_channels': c.out_channels, 'down_block_types': list(c.down_block_types),
      'mid_block_type': 'UNetMidBlock2DCrossAttn', 'up_block_types': list(c.up_block_types),
      'block_out_channels': list(c.block_out_channels),
      'layers_per_block': listify(c.layers_per_block),
      # diffusers' PyTorch U-Net refuses num_attention_heads and reads the head count
      # from attention_head_dim.
      'attention_head_dim': list(c.heads_per_block),
      'transformer_layers_per_block': listify(c.transformer_layers_per_block),
      'cross_attention_dim': c.cross_attention_dim,
      'only_cross_attention': listify(c.only_cross_attention),
      'use_linear_projection': c.use_linear_projection,
      'upcast_attention': c.upcast_attention, 'flip_sin_to_cos': c.flip_sin_to_cos,
      'freq_shift': c.freq_shift, 'norm_num_groups': c.norm_num_groups,
      'norm_eps': c.norm_eps, 'dropout': c.dropout, 'act_fn': 'silu',
  }
  if c.encoder_hid_dim:
    out.update(encoder_hid_dim=c.encoder_hid_dim, encoder_hid_dim_type='text_proj')
  return out


def vae_config_from_diffusers(raw: dict) -> AutoencoderKLConfig:
  """A diffusers `(Flax)AutoencoderKL` config.json dict -> AutoencoderKLConfig."""
  what = raw.get('_class_name') or 'AutoencoderKL'
  _check_options(raw, set(_VAE_DEFAULTS) | set(_VAE_FIXED) | _VAE_IGNORED, _VAE_FIXED, what)
  r = {k: _tuple(raw.get(k, v)) for k, v in _VAE_DEFAULTS.items()}
  n = len(r['block_out_channels'])
  for key, block in (('down_block_types', 'DownEncoderBlock2D'),
                     ('up_block_types', 'UpDecoderBlock2D')):
    if r[key] != (block,) * n:
      raise ValueError(f'{what}: diffusers option {key}={list(r[key])} is not supported '
                       f'(charred implements {n} x {block}).')
  return AutoencoderKLConfig(
      in_channels=r['in_channels'], out_channels=r['out_channels'],
      block_out_channels=r['block_out_channels'], layers_per_block=r['layers_per_block'],
      latent_channels=r['latent_channels'], norm_num_groups=r['norm_num_groups'],
      scaling_factor=r['scaling_factor'], sample_size=r['sample_size'])


def vae_config_to_diffusers(config: AutoencoderKLConfig) -> dict:
  """AutoencoderKLConfig -> a config.json dict for diffusers' `AutoencoderKL`."""
  c = config
  n = len(c.block_out_channels)
  return {
      '_class_name': 'AutoencoderKL', '_diffusers_version': DIFFUSERS_VERSION,
      'in_channels': c.in_channels, 'out_channels': c.out_channels,
      'down_block_types': ['DownEncoderBlock2D'] * n, 'up_block_types': ['UpDecoderBlock2D'] * n,
      'block_out_channels': list(c.block_out_channels), 'layers_per_block': c.layers_per_block,
      'act_fn': 'silu', 'latent_channels': c.latent_channels,
      'norm_num_groups': c.norm_num_groups,
      'sample_size': (list(c.sample_size) if isinstance(c.sample_size, tuple)
                      else c.sample_size),
      'scaling_factor': c.scaling_factor,
  }


_FROM_DIFFUSERS = {'unet': unet_config_from_diffusers, 'autoencoder_kl': vae_config_from_diffusers}
_TO_DIFFUSERS = {'unet': unet_config_to_diffusers, 'autoencoder_kl': vae_config_to_diffusers}


def config_from_diffusers(raw: dict, origin: str = 'config.json') -> tuple[str, Any]:
  """(kind, charred config) from a diffusers config dict, by its `_class_name`."""
  name = raw.get('_class_name')
  kind = CLASS_KINDS.get(name)
  if kind is None:
    raise ValueError(f'{origin}: diffusers class {name!r} is not supported; expected one of '
                     f'{sorted(CLASS_KINDS)}.')
  return kind, _FROM_DIFFUSERS[kind](raw)


# --- names ----------------------------------------------------------------------------------

# Module lists in diffusers' PyTorch classes: charred's `resnets_0` is torch's `resnets.0`.
_LISTS = {'down_blocks', 'up_blocks', 'resnets', 'attentions', 'transformer_blocks',
          'downsamplers', 'upsamplers', 'to_out', 'net'}
# VAE mid-block attention: charred (= diffusers Flax and old PyTorch) -> current PyTorch.
_VAE_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def torch_name(path: str, legacy_vae_attention: bool = False) -> str:
  """charred '/'-path -> diffusers PyTorch state-dict name (current names unless
  `legacy_vae_attention`)."""
  *modules, leaf = path.split('/')
  out = []
  for m in modules:
    match = re.fullmatch(r'(.+)_(\d+)', m)
    if match and match.group(1) in _LISTS:
      m = f'{match.group(1)}.{match.group(2)}'
    elif m in _VAE_ATTENTION and 'attentions.0' in out[-1:] and not legacy_vae_attention:
      m = _VAE_ATTENTION[m]
    out.append(m)
  return '.'.join(out + [{'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)])


def _squeeze_1x1(w: np.ndarray) -> np.ndarray:
  return w.reshape(w.shape[:2]).T


def _linear_to_1x1(w: np.ndarray) -> np.ndarray:
  return w.T[None, None]


def _from_torch(leaf: str, target_rank: int, source_shape: tuple[int, ...]) -> core.Transform:
  """How a torch tensor becomes a charred parameter: chosen from the ranks, so that a
  1x1 conv and a Linear (equivalent layouts of one channel mixer) convert either way."""
  if leaf != 'kernel':
    return core.identity
  rank = len(source_shape)
  if target_rank == 2 and rank == 4 and tuple(source_shape[2:]) == (1, 1):
    return _squeeze_1x1
  if target_rank == 4 and rank == 2:
    return _linear_to_1x1
  if rank == 4:
    return core.conv_to_flax
  if rank == 2:
    return core.linear_to_dense
  return core.identity


def _to_torch(path: str, value: np.ndarray) -> np.ndarray:
  if not path.endswith('/kernel'):
    return value
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value.T


# --- import ---------------------------------------------------------------------------------


def _open_weights(path: str) -> tuple[str, dict[str, sources.LazyTensor], str]:
  """(format 'torch'|'flax', tensors, the file read) for a diffusers model folder."""
  has = lambda name: os.path.exists(os.path.join(path, name))
  for name, opener in ((SAFETENSORS_FILE, sources.open_safetensors),
                       (TORCH_BIN_FILE, sources.open_torch_bin)):
    if has(name):
      return 'torch', opener(os.path.join(path, name)), os.path.join(path, name)
    index = name.replace('.safetensors', '.safetensors.index.json').replace(
        '.bin', '.bin.index.json')
    if has(index):
      return 'torch', _open_sharded(path, index, opener), os.path.join(path, index)
  if has(FLAX_FILE):
    return 'flax', sources.open_flax_msgpack(os.path.join(path, FLAX_FILE)), os.path.join(
        path, FLAX_FILE)
  raise FileNotFoundError(f'{path}: no weights found; expected {SAFETENSORS_FILE}, '
                          f'{TORCH_BIN_FILE} or {FLAX_FILE} beside {CONFIG_FILE}.')


def _open_sharded(path: str, index: str, opener) -> dict[str, sources.LazyTensor]:
  with open(os.path.join(path, index)) as f:
    weight_map = json.load(f).get('weight_map', {})
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(opener(os.path.join(path, shard)))
  return tensors


def plan_diffusers(path: str) -> core.ConversionPlan:
  """A conversion plan for a diffusers U-Net or AutoencoderKL folder (PyTorch or Flax)."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} not found: expected a diffusers model folder.')
  with open(config_path) as f:
    raw = json.load(f)
  kind, config = config_from_diffusers(raw, config_path)
  fmt, tensors, origin = _open_weights(path)
  expected = model_kinds.parameter_shapes(kind, config)
  rules = {}
  for p, shape in expected.items():
    if fmt == 'flax':
      rules[p] = core.Rule(p)
      continue
    name = torch_name(p)
    if name not in tensors and torch_name(p, legacy_vae_attention=True) in tensors:
      name = torch_name(p, legacy_vae_attention=True)
    source = tensors.get(name)
    leaf = p.rsplit('/', 1)[-1]
    rules[p] = core.Rule(name, _from_torch(leaf, len(shape), source.shape if source else ()))
  return core.ConversionPlan(kind=kind, config=config, source=tensors, rules=rules,
                             origin=origin)


# --- export ---------------------------------------------------------------------------------


def export_diffusers(kind: str, config, params, out_dir: str, *,
                     overwrite: bool = False) -> str:
  """Writes `params` of a charred 'unet' or 'autoencoder_kl' as a diffusers PyTorch folder
  (config.json + diffusion_pytorch_model.safetensors, current names) that diffusers'
  `from_pretrained` loads. Written to a temporary sibling and renamed into place, so a
  failure never leaves a half-written `out_dir`. Returns `out_dir`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if kind not in _TO_DIFFUSERS:
    raise ValueError(f'export_diffusers: kind {kind!r} is not a diffusers model; expected one '
                     f'of {sorted(_TO_DIFFUSERS)}.')
  raw = _TO_DIFFUSERS[kind](config)
  expected = model_kinds.parameter_shapes(kind, config)
  flat = flatten_dict(nn.meta.unbox(params), sep='/')
  for p, shape in expected.items():
    got = flat.get(p)
    if got is None or tuple(got.shape) != shape:
      raise core.ParameterMismatchError(
          f'export_diffusers: parameter {p} has shape '
          f'{None if got is None else tuple(got.shape)}, the config needs {shape}.')
  extra = sorted(set(flat) - set(expected))
  if extra:
    raise core.ParameterMismatchError(f'export_diffusers: parameters {extra[:3]} are not part '
                                      f'of the {kind} config ({len(extra)} in all).')
  with core.atomic_output_dir(out_dir, overwrite) as tmp:
    tensors = {torch_name(p): np.ascontiguousarray(_to_torch(p, np.asarray(flat[p])))
               for p in expected}
    save_file(tensors, os.path.join(tmp, SAFETENSORS_FILE))
    del tensors
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(raw, f, indent=2)
  return os.path.abspath(out_dir)
