"""T5 / ByT5 encoder with t5x's module and parameter names.

The parameter tree matches t5x checkpoints (`token_embedder/embedding`,
`encoder/layers_N/attention/{query,key,value,out}/kernel`,
`encoder/layers_N/mlp/{wi_0,wi_1,wo}/kernel`, `encoder/relpos_bias/rel_embedding`,
`encoder/encoder_norm/scale`), with kernels stored 2-D as t5x stores them, so a
t5x checkpoint maps onto it without renaming.

Every parameter carries logical axis names from t5x's vocabulary ('vocab', 'embed',
'heads' for the joined heads*head_dim axis, 'mlp', 'relpos_buckets') for sharding rules;
`init` returns them boxed, `nn.meta.unbox` gives plain arrays.

Shapes: B batch, L sequence length, D d_model, H heads, K head dim, F d_ff.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """Encoder hyper-parameters; defaults are ByT5-Small's encoder."""
  vocab_size: int = 384  # ByT5: 259 ids, embedding rows padded to 384.
  d_model: int = 1472
  num_heads: int = 6
  head_dim: int = 64
  num_layers: int = 12
  d_ff: int = 3584
  gated: bool = True  # gated-GELU MLP (wi_0, wi_1) as in T5.1.1 / ByT5.
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32  # compute dtype; parameters stay float32.


def relative_position_bucket(relative_position: np.ndarray,
                             num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """T5's bidirectional bucketing of `memory_position - query_position`."""
  num_buckets //= 2
  n = -relative_position
  bucket = (n < 0).astype(np.int32) * num_buckets
  n = np.abs(n)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
  large = max_exact + (log_ratio / np.log(max_distance / max_exact) *
                       (num_buckets - max_exact)).astype(np.int32)
  large = np.minimum(large, num_buckets - 1)
  return bucket + np.where(is_small, n, large)


class RmsNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, no bias."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (x32 * scale).astype(self.dtype)


class Dense2D(nn.Module):
  """Dense layer without bias whose kernel is stored 2-D, as t5x stores it."""
  features: int
  kernel_axes: tuple[str, str]  # logical names of (input, output)
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    # jnp.asarray, not .astype: a quantisation library's int8 kernel casts itself there.
    return jnp.dot(x.astype(self.dtype), jnp.asarray(kernel, self.dtype))


class RelativePositionBias(nn.Module):
  """Learned bias per (head, bucket), shared by all encoder layers."""
  num_heads: int
  num_buckets: int
  max_distance: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    table = self.param('rel_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.1), ('heads', 'relpos_buckets')),
                       (self.num_heads, self.num_buckets), jnp.float32)
    position = np.arange(length)
    buckets = relative_position_bucket(position[None, :] - position[:, None],
                                       self.num_buckets, self.max_distance)
    return table[:, buckets][None].astype(self.dtype)  # [1, H, L, L]


class SelfAttention(nn.Module):
  """Multi-head self-attention, t5x-style (no 1/sqrt(K) logit scaling)."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    b, l, d = x.shape
    inner = self.num_heads * self.head_dim
    # t5x folds 1/sqrt(K) into the query initialiser instead of the logits.
    q_init = nn.initializers.variance_scaling(1.0 / self.head_dim, 'fan_in', 'truncated_normal')
    q = Dense2D(inner, ('embed', 'heads'), self.dtype, q_init, name='query')(x)
    k = Dense2D(inner, ('embed', 'heads'), self.dtype, name='key')(x)
    v = Dense2D(inner, ('embed', 'heads'), self.dtype, name='value')(x)
    q, k, v = (t.reshape(b, l, self.num_heads, self.head_dim) for t in (q, k, v))
    logits = jnp.einsum('bqhk,bshk->bhqs', q, k) + bias
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqs,bshk->bqhk', weights, v).reshape(b, l, inner)
    return Dense2D(d, ('heads', 'embed'), self.dtype, name='out')(out)


class Mlp(nn.Module):
  """Gated-GELU (wi_0, wi_1, wo) or plain ReLU (wi, wo) feed-forward block."""
  d_ff: int
  gated: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    wi = lambda name: Dense2D(self.d_ff, ('embed', 'mlp'), self.dtype, name=name)(x)
    if self.gated:
      # tanh-approximate GELU, as t5x and transformers' 'gated-gelu' ('gelu_new') compute it.
      h = nn.gelu(wi('wi_0'), approximate=True) * wi('wi_1')
    else:
      h = nn.relu(wi('wi'))
    return Dense2D(x.shape[-1], ('mlp', 'embed'), self.dtype, name='wo')(h)


class Embed(nn.Module):
  """Token embedding table [V, D] (t5x: `token_embedder/embedding`)."""
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids):
    table = self.param('embedding', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('vocab', 'embed')),
                       (self.num_embeddings, self.features), jnp.float32)
    return jnp.take(table, ids, axis=0).astype(self.dtype)


class EncoderLayer(nn.Module):
  config: T5EncoderConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    c = self.config
    h = RmsNorm(c.layer_norm_epsilon, c.dtype, name='pre_attention_layer_norm')(x)
    h = SelfAttention(c.num_heads, c.head_dim, c.dtype, name='attention')(h, bias)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    h = RmsNorm(c.layer_norm_epsilon, c.dtype, name='pre_mlp_layer_norm')(x)
    h = Mlp(c.d_ff, c.gated, c.dtype, name='mlp')(h)
    return x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)


class Encoder(nn.Module):
  config: T5EncoderConfig

  @nn.compact
  def __call__(self, embedded, attention_mask, deterministic: bool):
    c = self.config
    length = embedded.shape[1]
    bias = RelativePositionBias(c.num_heads, c.relative_attention_num_buckets,
                                c.relative_attention_max_distance, c.dtype,
                                name='relpos_bias')(length)
    # t5x masks both queries and keys that are padding.
    mask = attention_mask[:, None, :, None] * attention_mask[:, None, None, :]
    bias = bias + jnp.where(mask > 0, 0.0, -1e10).astype(c.dtype)
    x = nn.Dropout(c.dropout_rate)(embedded, deterministic=deterministic)
    for i in range(c.num_layers):
      x = EncoderLayer(c, name=f'layers_{i}')(x, bias, deterministic)
    x = RmsNorm(c.layer_norm_epsilon, c.dtype, name='encoder_norm')(x)
    return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


class T5Encoder(nn.Module):
  """Token ids [B, L] and mask [B, L] -> hidden states [B, L, D]."""
  config: T5EncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True):
    c = self.config
    if attention_mask is None:
      attention_mask = (input_ids > 0).astype(jnp.int32)
    embedded = Embed(c.vocab_size, c.d_model, c.dtype, name='token_embedder')(input_ids)
    return Encoder(c, name='encoder')(embedded, attention_mask, deterministic)
