"""Where diffusion happens: pixels (identity codec) or a frozen VAE's latent space.

The codec runs outside the differentiated function: its parameters never train, and
(the original project's mistake) they are not recomputed inside the gradient.
"""

from __future__ import annotations

import dataclasses
import json
import os

from flax import serialization
from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp

from charred.models.vae import AutoencoderKL, AutoencoderKLConfig


class PixelCodec:
  """Identity: the model denoises RGB images in [-1, 1]."""
  channels = 3
  downsample_factor = 1

  def encode(self, images, rng=None):
    del rng
    return images

  def decode(self, x):
    return x


class LatentCodec:
  """A frozen AutoencoderKL: images -> scaled latent samples -> images."""

  def __init__(self, config: AutoencoderKLConfig, params):
    self.config = config
    self.module = AutoencoderKL(config)
    self.params = params
    self.channels = config.latent_channels
    self.downsample_factor = config.downsample_factor

  def encode(self, images, rng=None):
    """Scaled latents [B, H/f, W/f, Z]: a posterior sample if `rng`, else the mean."""
    mean, logvar = self.module.apply({'params': self.params}, images,
                                     method=AutoencoderKL.encode)
    if rng is not None:
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return jax.lax.stop_gradient(mean * self.config.scaling_factor)

  def decode(self, latents):
    return self.module.apply({'params': self.params}, latents / self.config.scaling_factor,
                             method=AutoencoderKL.decode)


def load_diffusers_flax_autoencoder(path: str) -> LatentCodec:
  """Reads a diffusers Flax AutoencoderKL folder (config.json + diffusion_flax_model.msgpack)."""
  config_path = os.path.join(path, 'config.json')
  weights_path = os.path.join(path, 'diffusion_flax_model.msgpack')
  for f in (config_path, weights_path):
    if not os.path.exists(f):
      raise FileNotFoundError(f'{f} not found: expected a diffusers Flax AutoencoderKL folder.')
  with open(config_path) as f:
    raw = json.load(f)
  fields = {f.name for f in dataclasses.fields(AutoencoderKLConfig)} - {'dtype'}
  config = AutoencoderKLConfig(**{k: v for k, v in raw.items() if k in fields})
  with open(weights_path, 'rb') as f:
    try:
      params = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several types on truncated input
      raise ValueError(f'{weights_path} is not a readable msgpack checkpoint: {e}') from e
  image = jnp.zeros((1, 8 * config.downsample_factor, 8 * config.downsample_factor,
                     config.in_channels))
  expected = flatten_dict(jax.eval_shape(AutoencoderKL(config).init, jax.random.PRNGKey(0),
                                         image)['params'])
  found = flatten_dict(params)
  for key, spec in expected.items():
    got = found.get(key)
    if got is None or tuple(got.shape) != tuple(spec.shape):
      raise ValueError(f'{weights_path}: parameter {"/".join(key)} has shape '
                       f'{None if got is None else tuple(got.shape)}, the config needs '
                       f'{tuple(spec.shape)}.')
  return LatentCodec(config, params)


def make_codec(pixel_space: bool, autoencoder_path: str | None):
  if pixel_space:
    return PixelCodec()
  if not autoencoder_path:
    raise ValueError('pixel_space=False needs autoencoder_path: a diffusers Flax '
                     'AutoencoderKL folder (config.json + diffusion_flax_model.msgpack).')
  return load_diffusers_flax_autoencoder(autoencoder_path)
