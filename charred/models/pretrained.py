"""Load any supported checkpoint as a (module, params) pair; save charred's own format.

Formats are detected from the files:
- charred: `charred_model.json` + an Orbax `params/` directory (what the converter writes);
- a charred training run: `charred_run.json` (its model config, written by charred.main)
  + `checkpoints/`: the EMA text-to-image model of the newest checkpoint;
- diffusers PyTorch (`config.json` + `diffusion_pytorch_model.safetensors` or `.bin`) or
  Flax (`config.json` + `diffusion_flax_model.msgpack`) U-Net or AutoencoderKL folders, and
  Stable Diffusion repositories (`model_index.json` with `unet/` and `vae/`; pick one with
  `component=`);
- transformers T5 / ByT5 folders (`config.json` with model_type t5 + weights): the encoder;
- t5x checkpoints: a directory with a `checkpoint` file (tensorstore layout) or a legacy
  single msgpack file: the encoder (`target/encoder`, `target/token_embedder`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from charred.models.convert import core
from charred.models.image_codec import LatentCodec, PixelCodec
from charred.models.model_kinds import (  # count_parameters: re-exported
    MODEL_KINDS, config_from_dict, config_to_dict, count_parameters, parameter_shapes)
from charred.models.t5_encoder import T5EncoderConfig
from charred.models.text_to_image import TextToImage, TextToImageConfig
from charred.models.vae import AutoencoderKL

CHARRED_MODEL_FILE = 'charred_model.json'
RUN_MODEL_FILE = 'charred_run.json'
FORMAT_VERSION = 1


# --- charred's own format ---------------------------------------------------------------------


def save_pretrained(out_dir: str, kind: str, config, tensors: Iterable[tuple[str, np.ndarray]],
                    *, source: str = '', overwrite: bool = False) -> int:
  """Writes `tensors` ('/'-path, array) as charred's format; returns the parameter count.

  Tensors are spilled one by one to memory-mapped files as they arrive and Orbax reads
  them from there, so anonymous memory stays near the largest tensor. Everything is
  written under a temporary sibling directory and renamed into place at the end: an
  interrupted conversion never leaves a half-written `out_dir`.
  """
  with core.atomic_output_dir(out_dir, overwrite) as tmp:
    spill = os.path.join(tmp, 'spill')
    os.makedirs(spill)
    flat, count = {}, 0
    for i, (path, value) in enumerate(tensors):
      file = os.path.join(spill, f'{i}.npy')
      np.save(file, value)
      flat[tuple(path.split('/'))] = np.load(file, mmap_mode='r')
      count += value.size
      del value
    _save_orbax(os.path.join(tmp, 'params'), unflatten_dict(flat))
    del flat
    shutil.rmtree(spill)
    with open(os.path.join(tmp, CHARRED_MODEL_FILE), 'w') as f:
      json.dump({'format_version': FORMAT_VERSION, 'kind': kind,
                 'config': config_to_dict(config), 'source': source,
                 'num_parameters': int(count)}, f, indent=2)
  return count


def _save_orbax(path: str, tree) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Orbax's default numpy handler deep-copies every array onto the heap before writing, and
  # OCDBT buffers on top: for memory-mapped leaves that is twice the model in anonymous
  # memory. Without both, the mapped pages are read as written and stay reclaimable.
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=registry)
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(path, args=ocp.args.PyTreeSave(tree))


def _restore_orbax(path: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, 'item_metadata', None) or getattr(metadata, 'tree', metadata)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def read_charred_model(path: str):
  """(kind, config, params) from a folder written by `save_pretrained`."""
  with open(os.path.join(path, CHARRED_MODEL_FILE)) as f:
    meta = json.load(f)
  kind = meta.get('kind')
  if kind not in MODEL_KINDS:
    raise ValueError(f'{path}: unknown model kind {kind!r}; expected one of '
                     f'{sorted(MODEL_KINDS)}.')
  config = config_from_dict(MODEL_KINDS[kind].config, _current(meta['config']))
  params_dir = os.path.join(path, 'params')
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f'{params_dir} is missing: an incomplete charred model folder.')
  params = _restore_orbax(params_dir)
  expected = parameter_shapes(kind, config)
  found = {k: tuple(v.shape) for k, v in flatten_dict(params, sep='/').items()}
  for name, shape in expected.items():
    if found.get(name) != shape:
      raise core.ParameterMismatchError(f'{path}: parameter {name} has shape '
                                        f'{found.get(name)}, the config needs {shape}.')
  return kind, config, params


# --- training runs ---------------------------------------------------------------------------


# Initial-weight paths a run file's model config may name (provenance, not architecture:
# `InitConfig` holds them): dropped on reading.
_RETIRED_FIELDS = ('autoencoder_path', 'text_encoder_checkpoint', 'unet_checkpoint')


def _current(raw: dict) -> dict:
  return {k: v for k, v in raw.items() if k not in _RETIRED_FIELDS}


def write_run_model(workdir: str, config: TextToImageConfig,
                    init: InitConfig | None = None) -> None:
  """Records a run's model config (and what it started from) beside its checkpoints, so
  that its weights load (`load_pretrained(workdir)`) without its gin files or the
  trainer; `init.autoencoder` names the VAE a latent-space run decodes with."""
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, RUN_MODEL_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump({'format_version': FORMAT_VERSION, 'kind': 'text_to_image',
               'config': config_to_dict(config),
               'init': dataclasses.asdict(init or InitConfig())}, f, indent=2)
  os.replace(tmp, os.path.join(workdir, RUN_MODEL_FILE))


def read_charred_run(workdir: str, step: int | None = None):
  """(TextToImageConfig, EMA params) of a run's checkpoint `step` (default: newest)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, RUN_MODEL_FILE)) as f:
    config = config_from_dict(TextToImageConfig, _current(json.load(f)['config']))
  root = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit())
  if not steps:
    raise FileNotFoundError(f'no checkpoint under {root}.')
  step = steps[-1] if step is None else step
  # The train state's EMA subtree only, read as numpy: no optimizer state, no trainer.
  path = os.path.join(root, str(step), 'state')
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, 'item_metadata', None) or getattr(metadata, 'tree', metadata)
    tree = tree['ema_params'] if 'ema_params' in tree else None
    if tree is None:
      raise ValueError(f'{path}: a checkpoint without ema_params.')
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={'ema_params': tree}, restore_args={'ema_params': restore_args},
        partial_restore=True))
  return config, state['ema_params']


# --- initial weights and the codec ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where a model's initial weights come from (t5x's RestoreCheckpointConfig, big_vision's
  model_init): paths in any format `load_pretrained` reads, e.g. a t5x ByT5 checkpoint,
  an SD 2.1 `unet/` folder or a charred run. None: random (or, for the autoencoder, no
  VAE: a pixel-space model). The model config says what the network is; this says what
  it starts from, so a model config holds no file paths."""
  text_encoder: str | None = None  # shapes must fit TextToImageConfig.text_encoder
  unet: str | None = None  # shapes must fit TextToImageConfig.unet
  autoencoder: str | None = None  # the frozen VAE of a latent-space model (pixel_space=False)


def load_checkpoints(init: InitConfig, params):
  """`params` with the text encoder and U-Net replaced by the pretrained checkpoints
  `init` names (only the shapes of the replaced parts are read)."""
  params = dict(params)
  for part, path in (('text_encoder', init.text_encoder), ('unet', init.unet)):
    if path:
      params[part] = _load_part(path, part, params[part])
  return params


def _load_part(path: str, part: str, initial):
  """Pretrained parameters for `part`, checked name by name against `initial`."""
  _, loaded = load_pretrained(path)
  want = flatten_dict(initial, sep='/')
  got = flatten_dict(loaded, sep='/')
  for name, value in want.items():
    if name not in got or tuple(got[name].shape) != tuple(value.shape):
      raise ValueError(f'{path}: {part} parameter {name} has shape '
                       f'{tuple(got[name].shape) if name in got else None}, the model config '
                       f'needs {tuple(value.shape)}.')
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f'{path}: {part} parameter {extra[0]} is not in the model config '
                     f'({len(extra)} extra).')
  return unflatten_dict({tuple(k.split('/')): jnp.asarray(v, jnp.float32)
                         for k, v in got.items()})


def load_autoencoder(path: str) -> LatentCodec:
  """A frozen AutoencoderKL from any folder `load_pretrained` reads: diffusers PyTorch
  (safetensors or .bin) or Flax, a Stable Diffusion repository (its `vae/`), or charred's
  own format. Raises FileNotFoundError, CheckpointFormatError (unreadable weights) or
  ParameterMismatchError (weights that do not fit the config), each naming the file or
  parameter."""
  module, params = load_pretrained(path, component='vae')
  if not isinstance(module, AutoencoderKL):
    raise ValueError(f'{path} holds a {type(module).__name__}, not an AutoencoderKL.')
  return LatentCodec(module.config, params)


def make_codec(pixel_space: bool, autoencoder_path: str | None):
  """Pixels, or (pixel_space False) the frozen VAE at `autoencoder_path`."""
  if pixel_space:
    return PixelCodec()
  if not autoencoder_path:
    raise ValueError('pixel_space=False needs InitConfig.autoencoder: an AutoencoderKL '
                     'folder (diffusers PyTorch or Flax, a Stable Diffusion repository, or '
                     'charred).')
  return load_autoencoder(autoencoder_path)


# --- detection and loading --------------------------------------------------------------------


def detect_format(path: str) -> str:
  """One of 'charred', 'charred_run', 'diffusers_pipeline', 'diffusers', 'transformers',
  't5x'; raises FileNotFoundError/ValueError naming what was expected."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist.')
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      head = f.read(1)
    if head and (0x80 <= head[0] <= 0x8f or head[0] in (0xde, 0xdf)):
      return 't5x'  # a legacy t5x checkpoint: one msgpack map
    raise ValueError(f'{path}: a file that is not a t5x msgpack checkpoint; pass a folder.')
  has = lambda name: os.path.exists(os.path.join(path, name))
  if has(CHARRED_MODEL_FILE):
    return 'charred'
  if has(RUN_MODEL_FILE) and has('checkpoints'):
    return 'charred_run'
  if has('config.gin') and has('checkpoints'):
    raise ValueError(f'{path}: a charred run without {RUN_MODEL_FILE} (its model config); '
                     'load it with charred.configs.runs.load_run.')
  if has('model_index.json'):
    return 'diffusers_pipeline'
  if has('checkpoint'):
    return 't5x'
  if has('config.json'):
    with open(os.path.join(path, 'config.json')) as f:
      raw = json.load(f)
    if raw.get('model_type') in ('t5', 'mt5', 'umt5'):
      return 'transformers'
    if '_class_name' in raw or '_diffusers_version' in raw:
      return 'diffusers'
  raise ValueError(f'{path}: not a recognised checkpoint (expected a charred model or run, a '
                   'diffusers or transformers folder, or a t5x checkpoint).')


def plan_conversion(path: str, component: str | None = None,
                    t5_config: T5EncoderConfig | None = None) -> core.ConversionPlan:
  """How to convert the checkpoint at `path` (any format but charred's own)."""
  fmt = detect_format(path)
  if fmt == 'diffusers_pipeline':
    if component is None:
      raise ValueError(f'{path} is a diffusers pipeline: choose component="unet" or "vae" '
                       '(or pass the subfolder).')
    path, fmt = os.path.join(path, component), 'diffusers'
  if fmt == 'diffusers':
    from charred.models.convert import diffusers  # pylint: disable=g-import-not-at-top
    return diffusers.plan_diffusers(path)
  if fmt == 'transformers':
    from charred.models.convert import t5  # pylint: disable=g-import-not-at-top
    return t5.plan_transformers(path)
  if fmt == 't5x':
    from charred.models.convert import t5  # pylint: disable=g-import-not-at-top
    return t5.plan_t5x(path, t5_config)
  raise ValueError(f'{path}: a {fmt} checkpoint needs no conversion.')


def load_pretrained(path: str, component: str | None = None, *,
                    t5_config: T5EncoderConfig | None = None):
  """(module, params) for the checkpoint at `path`, in any supported format.

  U-Nets take NHWC samples: `module.apply({'params': p}, sample, timesteps,
  encoder_hidden_states, encoder_attention_mask=None)`; the VAE has `encode` (mean and
  log-variance, NHWC) and `decode`; T5 encoders take `(input_ids, attention_mask)`. A
  training run gives its EMA TextToImage model.
  """
  fmt = detect_format(path)
  if fmt == 'charred':
    kind, config, params = read_charred_model(path)
    return MODEL_KINDS[kind].module(config), params
  if fmt == 'charred_run':
    config, params = read_charred_run(path)
    return TextToImage(config), params
  plan = plan_conversion(path, component, t5_config)
  expected = parameter_shapes(plan.kind, plan.config)
  unused = core.check_plan(plan, expected)
  if unused:
    print(f'{path}: {len(unused)} tensors not used, e.g. {unused[:3]}')
  flat = dict(core.iter_converted(plan, expected))
  params = unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
  return MODEL_KINDS[plan.kind].module(plan.config), params
