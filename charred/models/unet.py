"""Stable-Diffusion-style conditional U-Net (NHWC), in Flax linen.

Module and parameter names follow diffusers' Flax U-Net (`down_blocks_0/resnets_0/conv1`,
`attentions_0/transformer_blocks_0/attn2/to_k`, ...), so diffusers checkpoints map onto
it by name. Unlike diffusers, cross-attention takes a mask over the text positions: ByT5
captions are mostly padding bytes, and attending to them dilutes the text signal.

Shapes: B batch, H x W spatial, C channels, L text length, E text width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters, spelled as in diffusers' `UNet2DConditionModel` config."""
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Sequence[str] = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                                     'CrossAttnDownBlock2D', 'DownBlock2D')
  up_block_types: Sequence[str] = ('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                                   'CrossAttnUpBlock2D')
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  # Number of heads per block (diffusers' SD 2.x naming quirk); head dim = C / heads.
  attention_head_dim: int | Sequence[int] = (5, 10, 20, 20)
  cross_attention_dim: int = 1024
  # Per block (or all): attn1 attends to the text instead of the image, as in diffusers.
  # Saves self-attention's quadratic cost at high resolution.
  only_cross_attention: bool | Sequence[bool] = False
  # A learned embedding per input position [H, W, C0], added after conv_in. SD's U-Net has
  # none: it infers position from convolution padding, slowly. Text rendering needs to
  # know which column belongs to which character. Fixes the input resolution.
  position_embedding: bool = False
  use_linear_projection: bool = True
  upcast_attention: bool = True
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  # diffusers' PyTorch U-Net uses exact GELU and GroupNorm eps 1e-6 in Transformer2D; its
  # retired Flax port used the tanh approximation and 1e-5 (checkpoints from it expect those).
  gelu_approximate: bool = False
  transformer_norm_eps: float = 1e-6
  dropout: float = 0.0
  dtype: Dtype = jnp.float32  # compute dtype; parameters stay float32.

  @property
  def heads_per_block(self) -> tuple[int, ...]:
    heads = self.attention_head_dim
    if isinstance(heads, int):
      return (heads,) * len(self.block_out_channels)
    return tuple(heads)

  def only_cross_attention_at(self, level: int) -> bool:
    if isinstance(self.only_cross_attention, bool):
      return self.only_cross_attention
    return tuple(self.only_cross_attention)[level]


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
  """Sinusoidal embedding [B] -> [B, dim], as diffusers computes it."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, dtype=self.dtype, name='linear_1')(x)
    return nn.Dense(self.features, dtype=self.dtype, name='linear_2')(nn.silu(x))


class ResnetBlock(nn.Module):
  features: int
  groups: int
  eps: float
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, deterministic: bool):
    conv = lambda name, k=3: nn.Conv(self.features, (k, k), padding=((k // 2,) * 2,) * 2,
                                     dtype=self.dtype, name=name)
    h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name='norm1')(x)
    h = conv('conv1')(nn.silu(h))
    t = nn.Dense(self.features, dtype=self.dtype, name='time_emb_proj')(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name='norm2')(h)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = conv('conv2')(h)
    if x.shape[-1] != self.features:
      x = conv('conv_shortcut', k=1)(x)
    return x + h


class Attention(nn.Module):
  """Multi-head attention with an optional key mask [B, L] (1 = attend)."""
  heads: int
  head_dim: int
  upcast: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    context = x if context is None else context
    inner = self.heads * self.head_dim
    dense = lambda name, bias=False: nn.Dense(inner if name != 'to_out_0' else x.shape[-1],
                                              use_bias=bias, dtype=self.dtype, name=name)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
    q, k, v = split(dense('to_q')(x)), split(dense('to_k')(context)), split(dense('to_v')(context))
    if self.upcast:
      q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(self.head_dim)
    if mask is not None:
      logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(x.shape[0], x.shape[1], inner)
    return dense('to_out_0', bias=True)(out.astype(self.dtype))


class Geglu(nn.Module):
  """Projection to 2x the width, split into value and GELU gate."""
  inner: int
  approximate: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name='proj')(x), 2, -1)
    return hidden * nn.gelu(gate, approximate=self.approximate)


class GegluFeedForward(nn.Module):
  mult: int = 4
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # diffusers names the GEGLU projection net_0/proj and the output net_2.
    h = Geglu(x.shape[-1] * self.mult, self.gelu_approximate, self.dtype, name='net_0')(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='net_2')(h)


class TransformerBlock(nn.Module):
  heads: int
  head_dim: int
  upcast: bool
  gelu_approximate: bool = False
  only_cross_attention: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, context_mask):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attn = lambda name: Attention(self.heads, self.head_dim, self.upcast, self.dtype, name=name)
    if self.only_cross_attention:
      x = x + attn('attn1')(ln('norm1')(x), context, context_mask)
    else:
      x = x + attn('attn1')(ln('norm1')(x))
    x = x + attn('attn2')(ln('norm2')(x), context, context_mask)
    return x + GegluFeedForward(4, self.gelu_approximate, self.dtype, name='ff')(ln('norm3')(x))


class Transformer2D(nn.Module):
  """GroupNorm -> proj_in -> transformer block(s) -> proj_out, with a residual."""
  heads: int
  groups: int
  use_linear_projection: bool
  upcast: bool
  norm_eps: float = 1e-6
  gelu_approximate: bool = False
  only_cross_attention: bool = False
  depth: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, context_mask):
    b, h, w, c = x.shape
    proj = lambda name: (nn.Dense(c, dtype=self.dtype, name=name) if self.use_linear_projection
                         else nn.Conv(c, (1, 1), dtype=self.dtype, name=name))
    y = nn.GroupNorm(self.groups, epsilon=self.norm_eps, dtype=self.dtype, name='norm')(x)
    if self.use_linear_projection:
      y = proj('proj_in')(y.reshape(b, h * w, c))
    else:
      y = proj('proj_in')(y).reshape(b, h * w, c)
    for i in range(self.depth):
      y = TransformerBlock(self.heads, c // self.heads, self.upcast, self.gelu_approximate,
                           self.only_cross_attention, self.dtype,
                           name=f'transformer_blocks_{i}')(y, context, context_mask)
    if self.use_linear_projection:
      y = proj('proj_out')(y).reshape(b, h, w, c)
    else:
      y = proj('proj_out')(y.reshape(b, h, w, c))
    return x + y


class Downsample(nn.Module):
  """[B,H,W,C] -> [B,H/2,W/2,C] by a 3x3 stride-2 conv. The U-Net pads symmetrically;
  diffusers' VAE pads the bottom/right only, ((0, 1), (0, 1))."""
  dtype: Dtype = jnp.float32
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))

  @nn.compact
  def __call__(self, x):
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=self.padding,
                   dtype=self.dtype, name='conv')(x)


class Upsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method='nearest')
    return nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name='conv')(x)


class DownBlock(nn.Module):
  """`layers` ResNet blocks (each followed by a Transformer2D if `attention`), then an
  optional stride-2 downsample. Returns the output and the skip activations."""
  config: UNetConfig
  level: int
  attention: bool
  add_downsample: bool

  @nn.compact
  def __call__(self, x, temb, context, mask, deterministic: bool):
    c, skips = self.config, []
    for j in range(c.layers_per_block):
      x = _resnet(c, c.block_out_channels[self.level], f'resnets_{j}')(x, temb, deterministic)
      if self.attention:
        x = _transformer(c, self.level, f'attentions_{j}')(x, context, mask)
      skips.append(x)
    if self.add_downsample:
      x = Downsample(c.dtype, name='downsamplers_0')(x)
      skips.append(x)
    return x, skips


class MidBlock(nn.Module):
  config: UNetConfig

  @nn.compact
  def __call__(self, x, temb, context, mask, deterministic: bool):
    c = self.config
    level = len(c.block_out_channels) - 1
    x = _resnet(c, c.block_out_channels[level], 'resnets_0')(x, temb, deterministic)
    x = _transformer(c, level, 'attentions_0')(x, context, mask)
    return _resnet(c, c.block_out_channels[level], 'resnets_1')(x, temb, deterministic)


class UpBlock(nn.Module):
  """`layers + 1` ResNet blocks, each on [x, skip] concatenated, then an optional
  nearest-neighbour 2x upsample."""
  config: UNetConfig
  level: int
  attention: bool
  add_upsample: bool

  @nn.compact
  def __call__(self, x, skips, temb, context, mask, deterministic: bool):
    c = self.config
    for j in range(c.layers_per_block + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = _resnet(c, c.block_out_channels[self.level], f'resnets_{j}')(x, temb, deterministic)
      if self.attention:
        x = _transformer(c, self.level, f'attentions_{j}')(x, context, mask)
    if self.add_upsample:
      x = Upsample(c.dtype, name='upsamplers_0')(x)
    return x


def _resnet(c: UNetConfig, features: int, name: str) -> ResnetBlock:
  return ResnetBlock(features, c.norm_num_groups, c.norm_eps, c.dropout, c.dtype, name=name)


def _transformer(c: UNetConfig, level: int, name: str) -> Transformer2D:
  return Transformer2D(c.heads_per_block[level], c.norm_num_groups, c.use_linear_projection,
                       c.upcast_attention, c.transformer_norm_eps, c.gelu_approximate,
                       c.only_cross_attention_at(level), dtype=c.dtype, name=name)


class UNet(nn.Module):
  """(sample [B,H,W,Cin], timesteps [B], context [B,L,E], mask [B,L]) -> [B,H,W,Cout]."""
  config: UNetConfig

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, encoder_attention_mask=None,
               deterministic: bool = True):
    c = self.config
    channels = tuple(c.block_out_channels)
    if len(c.down_block_types) != len(channels) or len(c.up_block_types) != len(channels):
      raise ValueError(f'{len(channels)} block_out_channels need as many down and up block '
                       f'types, got {c.down_block_types} and {c.up_block_types}.')
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    temb = timestep_embedding(timesteps, channels[0], c.flip_sin_to_cos, c.freq_shift)
    temb = TimestepEmbedding(4 * channels[0], c.dtype, name='time_embedding')(temb.astype(c.dtype))
    context = encoder_hidden_states.astype(c.dtype)
    mask = encoder_attention_mask

    x = nn.Conv(channels[0], (3, 3), padding=((1, 1), (1, 1)), dtype=c.dtype,
                name='conv_in')(sample.astype(c.dtype))
    if c.position_embedding:
      table = self.param('position_embedding', nn.initializers.normal(0.02), x.shape[1:],
                         jnp.float32)
      x = x + table.astype(c.dtype)[None]
    skips = [x]
    for level, block_type in enumerate(c.down_block_types):
      x, block_skips = DownBlock(c, level, block_type.startswith('CrossAttn'),
                                 level < len(channels) - 1, name=f'down_blocks_{level}')(
                                     x, temb, context, mask, deterministic)
      skips.extend(block_skips)

    x = MidBlock(c, name='mid_block')(x, temb, context, mask, deterministic)

    for i, block_type in enumerate(c.up_block_types):
      level = len(channels) - 1 - i
      x = UpBlock(c, level, block_type.startswith('CrossAttn'), level > 0,
                  name=f'up_blocks_{i}')(x, skips, temb, context, mask, deterministic)

    x = nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps, dtype=c.dtype,
                     name='conv_norm_out')(x)
    x = nn.Conv(c.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=c.dtype,
                name='conv_out')(nn.silu(x))
    return x.astype(jnp.float32)
