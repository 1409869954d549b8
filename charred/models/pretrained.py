"""Load any supported checkpoint as a (module, params) pair; save charred's own format.

Formats are detected from the files:
- charred: `charred_model.json` + an Orbax `params/` directory (what the converter writes);
- a charred training run: `config.gin` + `checkpoints/` (the EMA text-to-image model);
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
import functools
import json
import os
import shutil
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from charred.models.convert import core
from charred.models.t5_encoder import T5Encoder, T5EncoderConfig
from charred.models.unet import UNet, UNetConfig
from charred.models.vae import AutoencoderKL, AutoencoderKLConfig

CHARRED_MODEL_FILE = 'charred_model.json'
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelKind:
  module: Callable[[Any], Any]
  config: type
  example_inputs: Callable[[Any], tuple]  # config -> arguments for `module.init`


def _unet_inputs(c: UNetConfig):
  width = getattr(c, 'encoder_hid_dim', None) or c.cross_attention_dim
  return (jnp.zeros((1, c.sample_size, c.sample_size, c.in_channels)), jnp.zeros((1,)),
          jnp.zeros((1, 8, width)))


def _vae_inputs(c: AutoencoderKLConfig):
  side = 2 * c.downsample_factor
  return (jnp.zeros((1, side, side, c.in_channels)),)


MODEL_KINDS = {
    'unet': ModelKind(UNet, UNetConfig, _unet_inputs),
    'autoencoder_kl': ModelKind(AutoencoderKL, AutoencoderKLConfig, _vae_inputs),
    't5_encoder': ModelKind(T5Encoder, T5EncoderConfig,
                            lambda c: (jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))),
}


def parameter_shapes(kind: str, config) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape of every parameter, computed without allocating any."""
  return dict(_parameter_shapes(kind, config))


@functools.lru_cache(maxsize=32)  # tracing SD 2.1's U-Net takes seconds; configs are frozen.
def _parameter_shapes(kind: str, config) -> dict[str, tuple[int, ...]]:
  spec = MODEL_KINDS[kind]
  shapes = nn.meta.unbox(jax.eval_shape(spec.module(config).init, jax.random.PRNGKey(0),
                                        *spec.example_inputs(config))['params'])
  return {k: tuple(v.shape) for k, v in flatten_dict(shapes, sep='/').items()}


def count_parameters(kind: str, config) -> int:
  return sum(int(np.prod(s, dtype=np.int64)) for s in parameter_shapes(kind, config).values())


# --- config <-> JSON --------------------------------------------------------------------------


def config_to_dict(config) -> dict:
  out = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if f.name == 'dtype':
      value = jnp.dtype(value).name
    elif isinstance(value, tuple):
      value = list(value)
    out[f.name] = value
  return out


def config_from_dict(cls, raw: dict):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - names)
  if unknown:
    raise ValueError(f'{cls.__name__} has no field(s) {unknown}.')
  values = {}
  for k, v in raw.items():
    if k == 'dtype':
      v = jnp.dtype(v).type
    elif isinstance(v, list):
      v = tuple(v)
    values[k] = v
  return cls(**values)


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
  config = config_from_dict(MODEL_KINDS[kind].config, meta['config'])
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
  if has('config.gin') and has('checkpoints'):
    return 'charred_run'
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
    from charred.configs import runs  # pylint: disable=g-import-not-at-top
    run = runs.load_run(path)
    return run.model, run.params
  plan = plan_conversion(path, component, t5_config)
  expected = parameter_shapes(plan.kind, plan.config)
  unused = core.check_plan(plan, expected)
  if unused:
    print(f'{path}: {len(unused)} tensors not used, e.g. {unused[:3]}')
  flat = dict(core.iter_converted(plan, expected))
  params = unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
  return MODEL_KINDS[plan.kind].module(plan.config), params
