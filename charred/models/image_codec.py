"""Where diffusion happens: pixels (identity codec) or a frozen VAE's latent space.

`charred.models.pretrained.make_codec` builds one from a weights path.

The codec runs outside the differentiated function: its parameters never train, and
they are not recomputed inside the gradient.
"""

from __future__ import annotations

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
    return self.sample(*self.encode_distribution(images), rng)

  def encode_distribution(self, images):
    """The unscaled diagonal Gaussian posterior: (mean, logvar), each [B, H/f, W/f, Z]."""
    return self.module.apply({'params': self.params}, images, method='encode')

  def sample(self, mean, logvar, rng=None):
    """Scaled latents from a posterior (`encode_distribution`'s, or an encoder cache's):
    `encode(images, rng)` equals `sample(*encode_distribution(images), rng)`."""
    if rng is not None:
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return jax.lax.stop_gradient(mean * self.config.scaling_factor)

  def decode(self, latents):
    return self.module.apply({'params': self.params}, latents / self.config.scaling_factor,
                             method='decode')
