"""What each kind of model in charred's own format is: its module, config class and the
example inputs its parameters are traced with; parameter shapes and counts without
allocating any; configs to and from JSON."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from charred.models.t5_encoder import T5Encoder, T5EncoderConfig
from charred.models.unet import UNet, UNetConfig
from charred.models.vae import AutoencoderKL, AutoencoderKLConfig


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
  """A frozen config as JSON-able values; nested configs become nested dicts."""
  out = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if f.name == 'dtype':
      value = jnp.dtype(value).name
    elif dataclasses.is_dataclass(value):
      value = config_to_dict(value)
    elif isinstance(value, tuple):
      value = list(value)
    out[f.name] = value
  return out


def config_from_dict(cls, raw: dict):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - names)
  if unknown:
    raise ValueError(f'{cls.__name__} has no field(s) {unknown}.')
  nested = {f.name: type(f.default) for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(f.default)}
  values = {}
  for k, v in raw.items():
    if k == 'dtype':
      v = jnp.dtype(v).type
    elif k in nested and isinstance(v, dict):
      v = config_from_dict(nested[k], v)
    elif isinstance(v, list):
      v = tuple(v)
    values[k] = v
  return cls(**values)
