"""Stable-Diffusion-style conditional U-Net (NHWC), in Flax linen.

Module and parameter names follow diffusers' Flax U-Net (`down_blocks_0/resnets_0/conv1`,
`attentions_0/transformer_blocks_0/attn2/to_k`, ...), so diffusers checkpoints map onto
it by name; `charred.models.convert.diffusers` maps diffusers' PyTorch names and configs.
Cross-attention takes a mask over the text positions, as diffusers' PyTorch
`encoder_attention_mask` (its Flax port had none): ByT5 captions are mostly padding bytes,
and attending to them dilutes the text signal. (With `only_cross_attention`, attn1 is masked
too; diffusers leaves it unmasked.)

Every parameter carries logical axis names (`nn.with_logical_partitioning`; read them with
`nn.get_partition_spec`, get plain arrays with `nn.meta.unbox`). The vocabulary ('embed',
'heads' and 'mlp' mean what they mean in the T5 encoder):
  'embed'        model width: channels where a Dense reads or writes the residual stream
  'cross_embed'  width of the text states cross-attention reads (cross_attention_dim)
  'heads'        attention projections' inner width (heads x head dim, fused)
  'mlp'          feed-forward hidden width (GEGLU, the time-embedding MLP)
  'time_embed'   width of the timestep embedding every ResNet block reads
  'conv_height', 'conv_width', 'conv_in', 'conv_out'  convolution kernels; 'conv_in' and
                 'conv_out' also name the square channel mixers proj_in / proj_out
  'norm'         GroupNorm / LayerNorm scale and bias vectors
  'height', 'width'  the optional position embedding
  'text_length'  the optional learned text-position table

Cross-attention can address positions (`text_positions`, `query_positions`,
`cross_attention_rope`): a T5 encoder's outputs carry no absolute index (its relative bias
lives inside its own self-attention), so without them a query at image column c can see
which letters a caption holds but not which one is the k-th. All off by default: the
diffusers U-Net, parameter for parameter.
A Dense bias takes its kernel's output axis name.

Shapes: B batch, H x W spatial, C channels, L text length, E text width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DOWN_BLOCK_TYPES = ('CrossAttnDownBlock2D', 'DownBlock2D')
UP_BLOCK_TYPES = ('CrossAttnUpBlock2D', 'UpBlock2D')
CONV_AXES = ('conv_height', 'conv_width', 'conv_in', 'conv_out')
POSITION_KINDS = (None, 'sinusoidal', 'learned')


def dense(features: int, axes: tuple[str, str], dtype: Dtype, name: str,
          use_bias: bool = True) -> nn.Dense:
  """nn.Dense (float32 parameters, `dtype` compute) whose kernel has logical `axes`."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


def conv(features: int, kernel: int, dtype: Dtype, name: str, strides: int = 1,
         padding=None) -> nn.Conv:
  """k x k nn.Conv, 'same' padding unless given, with logical axis names."""
  if padding is None:
    padding = ((kernel // 2,) * 2,) * 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init,
                                                          CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                        ('conv_out',)))


def _norm_inits():
  return dict(scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('norm',)))


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(groups, epsilon=eps, dtype=dtype, name=name, **_norm_inits())


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name, **_norm_inits())


def _per_block(value, n: int, name: str) -> tuple:
  if isinstance(value, (int, bool)):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f'{name} has {len(value)} entries; {n} block_out_channels need {n}.')
  return value


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
  layers_per_block: int | Sequence[int] = 2  # ResNets per down block (up blocks: one more).
  # Number of heads per block (diffusers' SD 2.x naming quirk); head dim = C / heads.
  attention_head_dim: int | Sequence[int] = (5, 10, 20, 20)
  # What diffusers' Flax U-Net (and a fixed diffusers) call it; overrides the above if set.
  num_attention_heads: int | Sequence[int] | None = None
  transformer_layers_per_block: int | Sequence[int] = 1
  cross_attention_dim: int = 1024
  # Width of the text states if they differ from cross_attention_dim: a Dense
  # `encoder_hid_proj` maps them (diffusers' encoder_hid_dim_type='text_proj').
  encoder_hid_dim: int | None = None
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
  # Gradient checkpointing: ResNet and transformer blocks recompute their activations in
  # the backward pass instead of storing them (same outputs and gradients, less memory).
  remat: bool = False
  # Self-attention over more positions than this is computed in blocks of this many
  # queries, each recomputed in the backward pass (0: off). The same numbers, but the
  # [heads, queries, keys] probabilities never exist whole: 2-3x faster on CPU at 32x32
  # latents (cache-sized blocks), far less memory anywhere. Not a diffusers option.
  attention_query_chunk: int = 0
  # Positions on the text side of cross-attention, added to the text states before the
  # key/value projections (after encoder_hid_proj): 'sinusoidal' or 'learned' (a table
  # over text positions, which fixes the text length); None: none.
  text_positions: str | None = None
  # The same coordinates on the image side: the column of each query, added to the input
  # of every cross-attention's query projection, 'sinusoidal' (in text-position units, see
  # `position_span`) or 'learned' (a table per column and attention layer); None: none.
  query_positions: str | None = None
  # Rotary positions inside cross-attention only (text index against image column in
  # text-position units), as Seedream's cross-modality RoPE; self-attention is untouched.
  cross_attention_rope: bool = False
  # How many text positions the image width spans in the sinusoidal and rotary image
  # coordinate (column c of w maps to (c + 0.5) / w * span); None: the text length.
  position_span: float | None = None
  # A training-only character classifier on the finest features (before conv_norm_out):
  # this many classes per cell (e.g. 256 bytes; 0: none). Its logits are sown as
  # intermediates 'char_logits' for a loss that names each cell's glyph (the renderer
  # knows it); sampling never reads them.
  char_head_classes: int = 0
  # With a layout (the box-conditioned model): the box frame also reaches the convolutions,
  # as TextDiffuser's and GlyphControl's layout inputs do. Each input cell's place in its
  # example's box (inside or not, column and row as fractions of the box) and the box's
  # height and per-character advance, projected and added after conv_in; cross-attention
  # alone tells a cell which letter, not where the line's baseline is or how big to draw.
  layout_features: bool = False

  def __post_init__(self):
    n = len(self.block_out_channels)
    for name in ('text_positions', 'query_positions'):
      if getattr(self, name) not in POSITION_KINDS:
        raise ValueError(f'{name} must be one of {POSITION_KINDS}, got '
                         f'{getattr(self, name)!r}.')
    if self.position_span is not None and not self.position_span > 0:
      raise ValueError(f'position_span must be None or > 0, got {self.position_span}.')
    for name, types, known in (('down_block_types', self.down_block_types, DOWN_BLOCK_TYPES),
                               ('up_block_types', self.up_block_types, UP_BLOCK_TYPES)):
      if len(types) != n:
        raise ValueError(f'{n} block_out_channels need as many {name}, got {tuple(types)}.')
      unknown = [t for t in types if t not in known]
      if unknown:
        raise ValueError(f'{name} {unknown} not supported; expected {known}.')
    for name in ('layers_per_block', 'attention_head_dim', 'num_attention_heads',
                 'transformer_layers_per_block', 'only_cross_attention'):
      if getattr(self, name) is not None:
        _per_block(getattr(self, name), n, name)
    for level, (channels, heads) in enumerate(zip(self.block_out_channels,
                                                  self.heads_per_block)):
      if channels % heads:
        raise ValueError(f'block {level}: {channels} channels do not split into {heads} heads.')

  @property
  def heads_per_block(self) -> tuple[int, ...]:
    heads = self.num_attention_heads or self.attention_head_dim
    return _per_block(heads, len(self.block_out_channels), 'attention heads')

  def layers_at(self, level: int) -> int:
    return _per_block(self.layers_per_block, len(self.block_out_channels),
                      'layers_per_block')[level]

  def transformer_depth_at(self, level: int) -> int:
    return _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                      'transformer_layers_per_block')[level]

  def only_cross_attention_at(self, level: int) -> bool:
    return _per_block(self.only_cross_attention, len(self.block_out_channels),
                      'only_cross_attention')[level]


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
  """Sinusoidal embedding [B] -> [B, dim], as diffusers computes it."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def sinusoidal_positions(positions, dim: int, max_period: float = 10000.0):
  """Transformer sinusoids of (possibly fractional) positions [N] -> [N, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
  out = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(out, ((0, 0), (0, dim - 2 * half)))


def rotate(x, positions, max_period: float = 10000.0):
  """Rotary position embedding: x [B, T, N, H] rotated by positions [T] (RoFormer)."""
  half = x.shape[-1] // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, half]
  cos, sin = (f(angles)[None, :, None, :].astype(x.dtype) for f in (jnp.cos, jnp.sin))
  x1, x2 = x[..., :half], x[..., half:2 * half]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return jnp.concatenate([rotated, x[..., 2 * half:]], axis=-1)


def attention_grid(cells: int, height: int, width: int) -> tuple[int, int]:
  """(h, w) of the grid of `cells` attention queries over a `height` x `width` image (the
  U-Net keeps the image's aspect ratio at every level)."""
  w = int(round((cells * width / height) ** 0.5))
  if cells % w or (cells // w) * w != cells:
    raise ValueError(f'{cells} query cells do not tile a {height}x{width} image.')
  return cells // w, w


def column_coordinates(height: int, width: int, span: float):
  """[height * width] image-column coordinates in text-position units, row-major."""
  columns = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * span
  return jnp.tile(columns, height)


class TextLayout(NamedTuple):
  """Where a caption's quoted text is to be drawn (the box-conditioned model).

  boxes: float [B, 4], (x0, y0, x1, y1) as fractions of the image's width and height.
  in_span: bool [B, L], the text tokens of the quoted characters.
  chars: float [B], how many characters are quoted.
  """
  boxes: jax.Array
  in_span: jax.Array
  chars: jax.Array


def _cell_centres(height: int, width: int):
  """([height * width] x, [height * width] y) of each cell's centre, as image fractions."""
  xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  return jnp.tile(xs, height), jnp.repeat(ys, width)


def box_coordinates(height: int, width: int, layout: TextLayout):
  """[B, height * width]: each cell's column in its example's box frame, counted in
  characters of the quoted text (0 at the box's left edge, `chars` at its right)."""
  x, _ = _cell_centres(height, width)
  x0, x1 = layout.boxes[:, 0:1], layout.boxes[:, 2:3]
  return (x[None] - x0) / jnp.maximum(x1 - x0, 1e-6) * layout.chars[:, None]


def _inside_box(height: int, width: int, layout: TextLayout):
  """bool [B, height * width]: each cell's centre lies inside its example's box."""
  x, y = _cell_centres(height, width)
  bx = layout.boxes
  return ((x[None] >= bx[:, 0:1]) & (x[None] < bx[:, 2:3]) & (y[None] >= bx[:, 1:2])
          & (y[None] < bx[:, 3:4]))


LAYOUT_FEATURES = 5  # per cell: inside, column, row, box height, advance


def layout_features(height: int, width: int, layout: TextLayout):
  """float32 [B, height, width, 5]: per cell, inside its example's box (0/1), its column
  and row as fractions of the box (0 at the left/top edge, 1 at the right/bottom), and the
  box's height and width per character as fractions of the image."""
  x, y = _cell_centres(height, width)
  x0, y0, x1, y1 = (layout.boxes[:, k:k + 1] for k in range(4))
  w, h = jnp.maximum(x1 - x0, 1e-6), jnp.maximum(y1 - y0, 1e-6)
  inside = _inside_box(height, width, layout)
  advance = w / jnp.maximum(layout.chars[:, None], 1.0)
  b = layout.boxes.shape[0]
  features = [inside.astype(jnp.float32), (x[None] - x0) / w, (y[None] - y0) / h,
              jnp.broadcast_to(h, (b, height * width)),
              jnp.broadcast_to(advance, (b, height * width))]
  return jnp.stack(features, axis=-1).reshape(b, height, width, len(features))


def box_mask(height: int, width: int, layout: TextLayout, mask):
  """[B, height * width, L] key mask: `mask` [B, L], with the quoted characters' tokens
  hidden from every cell whose centre lies outside the example's box."""
  inside = _inside_box(height, width, layout)
  if mask is None:
    mask = jnp.ones(layout.in_span.shape, jnp.int32)
  visible = inside[:, :, None] | ~layout.in_span[:, None, :]
  return jnp.where(visible, mask[:, None, :], 0)


class TimestepEmbedding(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = dense(self.features, ('embed', 'mlp'), self.dtype, 'linear_1')(x)
    return dense(self.features, ('mlp', 'time_embed'), self.dtype, 'linear_2')(nn.silu(x))


class ResnetBlock(nn.Module):
  features: int
  groups: int
  eps: float
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, deterministic: bool):
    h = group_norm(self.groups, self.eps, self.dtype, 'norm1')(x)
    h = conv(self.features, 3, self.dtype, 'conv1')(nn.silu(h))
    t = dense(self.features, ('time_embed', 'embed'), self.dtype, 'time_emb_proj')(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = group_norm(self.groups, self.eps, self.dtype, 'norm2')(h)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = conv(self.features, 3, self.dtype, 'conv2')(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, self.dtype, 'conv_shortcut')(x)
    return x + h


def attention_weights(q, k, mask=None):
  """Softmax weights [B,N,T,S] of q [B,T,N,H] over k [B,S,N,H], key mask [B,S] (or
  [B,T,S]: one per query)."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
    logits = jnp.where(mask > 0, logits, jnp.finfo(logits.dtype).min)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def attend(q, k, v, mask=None):
  """Softmax attention: q [B,T,N,H], k and v [B,S,N,H], key mask [B,S] -> [B,T,N,H]."""
  weights = attention_weights(q, k, mask).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def attend_in_query_chunks(q, k, v, mask, chunk: int):
  """`attend`, one block of `chunk` queries at a time (softmax rows are independent), with
  each block recomputed in the backward pass instead of storing its probabilities."""
  b, t, n, h = q.shape
  blocks = q.reshape(b, t // chunk, chunk, n, h).swapaxes(0, 1)
  if mask is not None and mask.ndim == 3:  # a key mask per query: chunked with the queries
    masks = mask.reshape(b, t // chunk, chunk, -1).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(lambda a: attend(a[0], k, v, a[1])), (blocks, masks))
  else:
    out = jax.lax.map(jax.checkpoint(lambda qb: attend(qb, k, v, mask)), blocks)
  return out.swapaxes(0, 1).reshape(b, t, n, v.shape[-1])


class Attention(nn.Module):
  """Multi-head attention with an optional key mask [B, L] or [B, T, L] (1 = attend).

  Cross-attention sows its weights [B, N, T, L] as intermediates 'cross_attention' when
  that collection is mutable (the attention loss, attention maps); otherwise nothing is
  kept. `rope`: (query positions [T], key positions [L]) to rotate q and k by.
  """
  heads: int
  head_dim: int
  upcast: bool = False
  dtype: Dtype = jnp.float32
  query_chunk: int = 0  # see UNetConfig.attention_query_chunk

  @nn.compact
  def __call__(self, x, context=None, mask=None, rope=None):
    source = 'embed' if context is None else 'cross_embed'
    context = x if context is None else context
    inner = self.heads * self.head_dim
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
    q = split(dense(inner, ('embed', 'heads'), self.dtype, 'to_q', use_bias=False)(x))
    k = split(dense(inner, (source, 'heads'), self.dtype, 'to_k', use_bias=False)(context))
    v = split(dense(inner, (source, 'heads'), self.dtype, 'to_v', use_bias=False)(context))
    if self.upcast:
      q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if rope is not None:
      q, k = rotate(q, rope[0]), rotate(k, rope[1])
    t = q.shape[1]
    if source == 'cross_embed' and self.is_mutable_collection('intermediates'):
      weights = attention_weights(q, k, mask)
      self.sow('intermediates', 'cross_attention', weights)
      out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
    elif self.query_chunk and t > self.query_chunk and t % self.query_chunk == 0:
      out = attend_in_query_chunks(q, k, v, mask, self.query_chunk)
    else:
      out = attend(q, k, v, mask)
    out = out.reshape(x.shape[0], x.shape[1], inner)
    return dense(x.shape[-1], ('heads', 'embed'), self.dtype, 'to_out_0')(out.astype(self.dtype))


class Geglu(nn.Module):
  """Projection to 2x the width, split into value and GELU gate."""
  inner: int
  approximate: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden, gate = jnp.split(dense(2 * self.inner, ('embed', 'mlp'), self.dtype, 'proj')(x), 2, -1)
    return hidden * nn.gelu(gate, approximate=self.approximate)


class GegluFeedForward(nn.Module):
  mult: int = 4
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # diffusers names the GEGLU projection net_0/proj and the output net_2.
    h = Geglu(x.shape[-1] * self.mult, self.gelu_approximate, self.dtype, name='net_0')(x)
    return dense(x.shape[-1], ('mlp', 'embed'), self.dtype, 'net_2')(h)


class TransformerBlock(nn.Module):
  heads: int
  head_dim: int
  upcast: bool
  gelu_approximate: bool = False
  only_cross_attention: bool = False
  dtype: Dtype = jnp.float32
  query_chunk: int = 0

  @nn.compact
  def __call__(self, x, context, context_mask, query_positions=None, rope=None):
    """`query_positions` [T, C] or [B, T, C] is added to the cross-attention's query
    input; `rope` rotates its queries and keys (see Attention). `context_mask` [B, L] or
    [B, T, L] masks the text keys."""
    ln = lambda name: layer_norm(1e-5, self.dtype, name)
    attn = lambda name: Attention(self.heads, self.head_dim, self.upcast, self.dtype,
                                  self.query_chunk, name=name)
    if self.only_cross_attention:
      x = x + attn('attn1')(ln('norm1')(x), context, context_mask)
    else:
      x = x + attn('attn1')(ln('norm1')(x))
    query = ln('norm2')(x)
    if query_positions is not None:
      if query_positions.ndim == 2:
        query_positions = query_positions[None]
      query = query + query_positions.astype(query.dtype)
    x = x + attn('attn2')(query, context, context_mask, rope=rope)
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
  query_chunk: int = 0
  query_positions: str | None = None  # see UNetConfig
  rope: bool = False
  position_span: float | None = None

  @nn.compact
  def __call__(self, x, context, context_mask, layout: TextLayout | None = None):
    b, h, w, c = x.shape
    span = self.position_span or context.shape[1]
    query_positions = None
    if layout is not None:
      # Columns in the box's frame (the quoted text's k-th character spans [k, k+1) when
      # its glyphs are equally wide), and the quoted characters visible only in the box.
      coordinates = box_coordinates(h, w, layout)
      context_mask = box_mask(h, w, layout, context_mask)
      if self.query_positions == 'sinusoidal':
        query_positions = sinusoidal_positions(coordinates.reshape(-1), c).reshape(b, h * w, c)
    elif self.query_positions == 'sinusoidal':
      query_positions = sinusoidal_positions(column_coordinates(h, w, span), c)
    elif self.query_positions == 'learned':
      table = self.param('query_position_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ('width', 'embed')), (w, c), jnp.float32)
      query_positions = jnp.tile(table, (h, 1))
    rope = None
    if self.rope:
      if layout is not None:
        raise ValueError('cross_attention_rope has no box frame: use query_positions.')
      rope = (column_coordinates(h, w, span), jnp.arange(context.shape[1]))
    proj = lambda name: (dense(c, ('conv_in', 'conv_out'), self.dtype, name)
                         if self.use_linear_projection else conv(c, 1, self.dtype, name))
    y = group_norm(self.groups, self.norm_eps, self.dtype, 'norm')(x)
    if self.use_linear_projection:
      y = proj('proj_in')(y.reshape(b, h * w, c))
    else:
      y = proj('proj_in')(y).reshape(b, h * w, c)
    for i in range(self.depth):
      y = TransformerBlock(self.heads, c // self.heads, self.upcast, self.gelu_approximate,
                           self.only_cross_attention, self.dtype, self.query_chunk,
                           name=f'transformer_blocks_{i}')(y, context, context_mask,
                                                           query_positions, rope)
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
    return conv(x.shape[-1], 3, self.dtype, 'conv', strides=2, padding=self.padding)(x)


class Upsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method='nearest')
    return conv(c, 3, self.dtype, 'conv')(x)


# Gradient checkpointing. `deterministic` (argument 3, counting self) selects Python
# control flow in Dropout, so it must stay static.
RematResnetBlock = nn.remat(ResnetBlock, static_argnums=(3,))
RematTransformer2D = nn.remat(Transformer2D)


class DownBlock(nn.Module):
  """ResNet blocks (each followed by a Transformer2D if `attention`), then an optional
  stride-2 downsample. Returns the output and the skip activations."""
  config: UNetConfig
  level: int
  attention: bool
  add_downsample: bool

  @nn.compact
  def __call__(self, x, temb, context, mask, deterministic: bool, layout=None):
    c, skips = self.config, []
    for j in range(c.layers_at(self.level)):
      x = _resnet(c, c.block_out_channels[self.level], f'resnets_{j}')(x, temb, deterministic)
      if self.attention:
        x = _transformer(c, self.level, f'attentions_{j}')(x, context, mask, layout)
      skips.append(x)
    if self.add_downsample:
      x = Downsample(c.dtype, name='downsamplers_0')(x)
      skips.append(x)
    return x, skips


class MidBlock(nn.Module):
  config: UNetConfig

  @nn.compact
  def __call__(self, x, temb, context, mask, deterministic: bool, layout=None):
    c = self.config
    level = len(c.block_out_channels) - 1
    x = _resnet(c, c.block_out_channels[level], 'resnets_0')(x, temb, deterministic)
    # diffusers' UNetMidBlock2DCrossAttn always self-attends in attn1.
    x = _transformer(c, level, 'attentions_0', only_cross_attention=False)(x, context, mask,
                                                                           layout)
    return _resnet(c, c.block_out_channels[level], 'resnets_1')(x, temb, deterministic)


class UpBlock(nn.Module):
  """One ResNet block more than the matching down block, each on [x, skip] concatenated,
  then an optional nearest-neighbour 2x upsample."""
  config: UNetConfig
  level: int
  attention: bool
  add_upsample: bool

  @nn.compact
  def __call__(self, x, skips, temb, context, mask, deterministic: bool, layout=None):
    c = self.config
    for j in range(c.layers_at(self.level) + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = _resnet(c, c.block_out_channels[self.level], f'resnets_{j}')(x, temb, deterministic)
      if self.attention:
        x = _transformer(c, self.level, f'attentions_{j}')(x, context, mask, layout)
    if self.add_upsample:
      x = Upsample(c.dtype, name='upsamplers_0')(x)
    return x


def _resnet(c: UNetConfig, features: int, name: str) -> ResnetBlock:
  cls = RematResnetBlock if c.remat else ResnetBlock
  return cls(features, c.norm_num_groups, c.norm_eps, c.dropout, c.dtype, name=name)


def _transformer(c: UNetConfig, level: int, name: str,
                 only_cross_attention: bool | None = None) -> Transformer2D:
  if only_cross_attention is None:
    only_cross_attention = c.only_cross_attention_at(level)
  cls = RematTransformer2D if c.remat else Transformer2D
  return cls(c.heads_per_block[level], c.norm_num_groups, c.use_linear_projection,
             c.upcast_attention, c.transformer_norm_eps, c.gelu_approximate,
             only_cross_attention, c.transformer_depth_at(level), dtype=c.dtype,
             query_chunk=c.attention_query_chunk, query_positions=c.query_positions,
             rope=c.cross_attention_rope, position_span=c.position_span, name=name)


class UNet(nn.Module):
  """(sample [B,H,W,Cin], timesteps [B], context [B,L,E], mask [B,L]) -> [B,H,W,Cout].

  With a `layout` (a TextLayout: the box-conditioned model) the cross-attention query
  positions count columns in each example's box frame, and the quoted characters' tokens
  are visible only to cells inside the box.

  E is `encoder_hid_dim` if set, else `cross_attention_dim`."""
  config: UNetConfig

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, encoder_attention_mask=None,
               deterministic: bool = True, layout: TextLayout | None = None):
    c = self.config
    channels = tuple(c.block_out_channels)
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    temb = timestep_embedding(timesteps, channels[0], c.flip_sin_to_cos, c.freq_shift)
    temb = TimestepEmbedding(4 * channels[0], c.dtype, name='time_embedding')(temb.astype(c.dtype))
    context = encoder_hidden_states.astype(c.dtype)
    if c.encoder_hid_dim:
      context = dense(c.cross_attention_dim, ('embed', 'cross_embed'), c.dtype,
                      'encoder_hid_proj')(context)
    if c.text_positions == 'sinusoidal':
      context = context + sinusoidal_positions(
          jnp.arange(context.shape[1]), context.shape[-1]).astype(c.dtype)[None]
    elif c.text_positions == 'learned':
      table = self.param('text_position_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ('text_length', 'cross_embed')),
                         context.shape[1:], jnp.float32)
      context = context + table.astype(c.dtype)[None]
    mask = encoder_attention_mask

    x = conv(channels[0], 3, c.dtype, 'conv_in')(sample.astype(c.dtype))
    if c.position_embedding:
      table = self.param('position_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ('height', 'width', 'embed')), x.shape[1:], jnp.float32)
      x = x + table.astype(c.dtype)[None]
    if c.layout_features:  # no layout (e.g. at init): no cell is in a box
      features = (layout_features(x.shape[1], x.shape[2], layout) if layout is not None
                  else jnp.zeros(x.shape[:3] + (LAYOUT_FEATURES,), jnp.float32))
      x = x + dense(channels[0], (None, 'embed'), c.dtype, 'layout_embedding')(
          features.astype(c.dtype))
    skips = [x]
    for level, block_type in enumerate(c.down_block_types):
      x, block_skips = DownBlock(c, level, block_type.startswith('CrossAttn'),
                                 level < len(channels) - 1, name=f'down_blocks_{level}')(
                                     x, temb, context, mask, deterministic, layout)
      skips.extend(block_skips)

    x = MidBlock(c, name='mid_block')(x, temb, context, mask, deterministic, layout)

    for i, block_type in enumerate(c.up_block_types):
      level = len(channels) - 1 - i
      x = UpBlock(c, level, block_type.startswith('CrossAttn'), level > 0,
                  name=f'up_blocks_{i}')(x, skips, temb, context, mask, deterministic,
                                         layout)

    if c.char_head_classes:
      self.sow('intermediates', 'char_logits', dense(
          c.char_head_classes, ('embed', 'vocab'), c.dtype, 'char_head')(x).astype(jnp.float32))
    x = group_norm(c.norm_num_groups, c.norm_eps, c.dtype, 'conv_norm_out')(x)
    x = conv(c.out_channels, 3, c.dtype, 'conv_out')(nn.silu(x))
    return x.astype(jnp.float32)
