"""Stable Diffusion's KL autoencoder (AutoencoderKL, NHWC), in Flax linen.

Module and parameter names follow diffusers' `FlaxAutoencoderKL` (`encoder/down_blocks_0/
resnets_0/conv1`, `encoder/mid_block/attentions_0/query`, `quant_conv`, ...), so its
`diffusion_flax_model.msgpack` loads by name. Unlike diffusers, everything is channels-last
on both sides: images [B,H,W,Cin] in [-1, 1], latents [B,H/f,W/f,Z] with
f = 2 ** (len(block_out_channels) - 1) and Z = latent_channels. Parameters carry the U-Net's
logical axis names (see unet.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from charred.models.unet import Downsample, Upsample, conv, dense, group_norm

Dtype = Any

NORM_EPS = 1e-6  # GroupNorm epsilon everywhere in the VAE.


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """Hyper-parameters, spelled as in diffusers' `AutoencoderKL` config (defaults: SD 2.1)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215  # latents are scaled by this before diffusion.
  sample_size: int = 768
  dtype: Dtype = jnp.float32  # compute dtype; parameters stay float32.

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def _norm(c: AutoencoderKLConfig, name: str) -> nn.GroupNorm:
  return group_norm(c.norm_num_groups, NORM_EPS, c.dtype, name)


def _conv(c: AutoencoderKLConfig, features: int, name: str, k: int = 3) -> nn.Conv:
  return conv(features, k, c.dtype, name)


class ResnetBlock(nn.Module):
  """[B,H,W,Cin] -> [B,H,W,features]: two GroupNorm-SiLU-conv3x3 steps, no time embedding;
  1x1 `conv_shortcut` on the residual when the width changes."""
  config: AutoencoderKLConfig
  features: int

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = _conv(c, self.features, 'conv1')(nn.silu(_norm(c, 'norm1')(x)))
    h = _conv(c, self.features, 'conv2')(nn.silu(_norm(c, 'norm2')(h)))
    if x.shape[-1] != self.features:
      x = _conv(c, self.features, 'conv_shortcut', k=1)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H*W positions, with a residual: [B,H,W,C] -> same."""
  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, h, w, ch = x.shape
    qkv = lambda name: dense(ch, ('embed', 'heads'), c.dtype, name)
    y = _norm(c, 'group_norm')(x).reshape(b, h * w, ch)
    q, k, v = qkv('query')(y), qkv('key')(y), qkv('value')(y)
    logits = jnp.einsum('bqc,bkc->bqk', q, k) / math.sqrt(ch)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = dense(ch, ('heads', 'embed'), c.dtype, 'proj_attn')(jnp.einsum('bqk,bkc->bqc', weights, v))
    return x + y.reshape(b, h, w, ch)


class MidBlock(nn.Module):
  """ResNet -> attention -> ResNet at constant width: [B,H,W,C] -> same."""
  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x):
    c, ch = self.config, x.shape[-1]
    x = ResnetBlock(c, ch, name='resnets_0')(x)
    x = AttentionBlock(c, name='attentions_0')(x)
    return ResnetBlock(c, ch, name='resnets_1')(x)


class DownEncoderBlock(nn.Module):
  """`layers_per_block` ResNets to `features`, then an optional stride-2 downsample."""
  config: AutoencoderKLConfig
  features: int
  add_downsample: bool

  @nn.compact
  def __call__(self, x):
    c = self.config
    for j in range(c.layers_per_block):
      x = ResnetBlock(c, self.features, name=f'resnets_{j}')(x)
    if self.add_downsample:
      x = Downsample(c.dtype, padding=((0, 1), (0, 1)), name='downsamplers_0')(x)
    return x


class UpDecoderBlock(nn.Module):
  """`layers_per_block + 1` ResNets to `features` (as in diffusers), then an optional
  nearest-neighbour 2x upsample and 3x3 conv."""
  config: AutoencoderKLConfig
  features: int
  add_upsample: bool

  @nn.compact
  def __call__(self, x):
    c = self.config
    for j in range(c.layers_per_block + 1):
      x = ResnetBlock(c, self.features, name=f'resnets_{j}')(x)
    if self.add_upsample:
      x = Upsample(c.dtype, name='upsamplers_0')(x)
    return x


class Encoder(nn.Module):
  """[B,H,W,Cin] -> [B,H/f,W/f,2Z] (mean and log-variance moments, before `quant_conv`)."""
  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    channels = tuple(c.block_out_channels)
    x = _conv(c, channels[0], 'conv_in')(x)
    for i, features in enumerate(channels):
      x = DownEncoderBlock(c, features, i < len(channels) - 1, name=f'down_blocks_{i}')(x)
    x = MidBlock(c, name='mid_block')(x)
    x = nn.silu(_norm(c, 'conv_norm_out')(x))
    return _conv(c, 2 * c.latent_channels, 'conv_out')(x)


class Decoder(nn.Module):
  """[B,h,w,Z] (after `post_quant_conv`) -> [B,h*f,w*f,Cout]."""
  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, z):
    c = self.config
    channels = tuple(reversed(c.block_out_channels))
    x = _conv(c, channels[0], 'conv_in')(z)
    x = MidBlock(c, name='mid_block')(x)
    for i, features in enumerate(channels):
      x = UpDecoderBlock(c, features, i < len(channels) - 1, name=f'up_blocks_{i}')(x)
    x = nn.silu(_norm(c, 'conv_norm_out')(x))
    return _conv(c, c.out_channels, 'conv_out')(x)


class AutoencoderKL(nn.Module):
  """KL autoencoder: `encode` images [B,H,W,Cin] -> (mean, logvar) [B,H/f,W/f,Z] each;
  `decode` latents [B,h,w,Z] -> images [B,h*f,w*f,Cout]. Latents are unscaled: multiply by
  `config.scaling_factor` before diffusion and divide before `decode`."""
  config: AutoencoderKLConfig

  def setup(self):
    c = self.config
    self.encoder = Encoder(c)
    self.quant_conv = _conv(c, 2 * c.latent_channels, 'quant_conv', k=1)
    self.post_quant_conv = _conv(c, c.latent_channels, 'post_quant_conv', k=1)
    self.decoder = Decoder(c)

  def encode(self, images, deterministic: bool = True):
    """images [B,H,W,Cin] in [-1,1] -> (mean, logvar), each [B,H/f,W/f,Z] float32.
    `deterministic` is accepted for diffusers parity; the VAE has no dropout."""
    del deterministic
    moments = self.quant_conv(self.encoder(images.astype(self.config.dtype)))
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    """latents [B,h,w,Z] -> images [B,h*f,w*f,Cout] float32 (roughly in [-1,1])."""
    x = self.post_quant_conv(latents.astype(self.config.dtype))
    return self.decoder(x).astype(jnp.float32)

  def __call__(self, images, rng=None):
    """images [B,H,W,Cin] -> reconstruction [B,H,W,Cout]: decodes a posterior sample
    (mean + std * noise) if `rng` is given, else the posterior mean."""
    mean, logvar = self.encode(images)
    latents = mean
    if rng is not None:
      latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.decode(latents)
