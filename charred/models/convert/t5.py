"""T5 / ByT5 encoders from transformers folders and t5x checkpoints.

charred's encoder has t5x's parameter names and 2-D kernels (charred.models.t5_encoder),
so a t5x checkpoint maps by prefix alone; transformers' torch Linear weights are
transposed and its relative-position table [buckets, heads] becomes t5x's [heads, buckets].
Only the encoder is converted: a decoder, an LM head and optimizer state are left unread.
"""

from __future__ import annotations

import json
import os
import re

from charred.models.convert import core
from charred.models.convert import sources
from charred.models.t5_encoder import T5EncoderConfig

KIND = 't5_encoder'

# --- transformers -----------------------------------------------------------------------------

# transformers' 'gated-gelu' means the tanh-approximate GELU ('gelu_new'), as in t5x and
# charred; the exact-erf 'gelu' would differ by ~1e-3 and is not what any T5 was trained with.
_TANH_GELU = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


def _parse_feed_forward_proj(name: str) -> bool:
  """transformers' `feed_forward_proj` -> charred's `gated`; raises on other activations."""
  parts = name.split('-')
  gated = parts[0] == 'gated' and len(parts) == 2
  act = 'gelu_new' if name == 'gated-gelu' else parts[-1]
  if gated and act in _TANH_GELU:
    return True
  if len(parts) == 1 and act == 'relu':
    return False
  raise ValueError(f'feed_forward_proj {name!r} is not supported: charred\'s T5 encoder has '
                   "gated tanh-GELU (T5.1.1, mT5, ByT5: 'gated-gelu') and ReLU (T5 v1.0: "
                   "'relu') feed-forward blocks.")


def t5_config_from_transformers(raw: dict) -> T5EncoderConfig:
  """A transformers T5Config dict (config.json) -> the encoder's T5EncoderConfig.

  Dropout is left at 0: the converted encoder is used frozen or fine-tuned as charred
  configures it, not with the pre-training setting in config.json.
  """
  model_type = raw.get('model_type', 't5')
  if model_type not in ('t5', 'mt5'):
    raise ValueError(f'model_type {model_type!r} is not supported (umT5 has a relative '
                     'position table per layer); expected t5 or mt5 (ByT5 is t5).')
  return T5EncoderConfig(
      vocab_size=int(raw['vocab_size']),
      d_model=int(raw['d_model']),
      num_heads=int(raw['num_heads']),
      head_dim=int(raw['d_kv']),
      num_layers=int(raw['num_layers']),
      d_ff=int(raw['d_ff']),
      gated=_parse_feed_forward_proj(raw.get('feed_forward_proj', 'relu')),
      relative_attention_num_buckets=int(raw.get('relative_attention_num_buckets', 32)),
      relative_attention_max_distance=int(raw.get('relative_attention_max_distance', 128)),
      layer_norm_epsilon=float(raw.get('layer_norm_epsilon', 1e-6)))


def _open_transformers_weights(path: str) -> dict[str, sources.LazyTensor]:
  """All tensors of a transformers folder: safetensors (one file or sharded) or .bin."""
  for single, index, reader in (('model.safetensors', 'model.safetensors.index.json',
                                 sources.open_safetensors),
                                ('pytorch_model.bin', 'pytorch_model.bin.index.json',
                                 sources.open_torch_bin)):
    if os.path.isfile(os.path.join(path, single)):
      return reader(os.path.join(path, single))
    if os.path.isfile(os.path.join(path, index)):
      with open(os.path.join(path, index)) as f:
        weight_map = json.load(f)['weight_map']
      tensors = {}
      for shard in sorted(set(weight_map.values())):
        tensors.update(reader(os.path.join(path, shard)))
      missing = sorted(set(weight_map) - set(tensors))
      if missing:
        raise sources.CheckpointFormatError(f'{path}: {index} lists {missing[:3]} but the '
                                            'shards do not hold them.')
      return tensors
  raise FileNotFoundError(f'{path}: no model.safetensors, pytorch_model.bin or a sharded '
                          'index of either.')


def _heads_first(table):
  """transformers' relative-position Embedding [buckets, heads] -> t5x's [heads, buckets]."""
  return table.T


def plan_transformers(path: str) -> core.ConversionPlan:
  """A transformers T5EncoderModel / T5ForConditionalGeneration folder (T5, mT5, ByT5)."""
  with open(os.path.join(path, 'config.json')) as f:
    config = t5_config_from_transformers(json.load(f))
  source = _open_transformers_weights(path)
  # T5EncoderModel ties encoder.embed_tokens to shared and saves one of the two.
  embedding = next((n for n in ('shared.weight', 'encoder.embed_tokens.weight') if n in source),
                   'shared.weight')
  rules = {
      'token_embedder/embedding': core.Rule(embedding),
      'encoder/relpos_bias/rel_embedding': core.Rule(
          'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight', _heads_first),
      'encoder/encoder_norm/scale': core.Rule('encoder.final_layer_norm.weight'),
  }
  mlp = ('wi_0', 'wi_1', 'wo') if config.gated else ('wi', 'wo')
  for i in range(config.num_layers):
    ours, theirs = f'encoder/layers_{i}', f'encoder.block.{i}.layer'
    for name, short in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o')):
      rules[f'{ours}/attention/{name}/kernel'] = core.Rule(
          f'{theirs}.0.SelfAttention.{short}.weight', core.linear_to_dense)
    rules[f'{ours}/pre_attention_layer_norm/scale'] = core.Rule(f'{theirs}.0.layer_norm.weight')
    rules[f'{ours}/pre_mlp_layer_norm/scale'] = core.Rule(f'{theirs}.1.layer_norm.weight')
    for name in mlp:
      rules[f'{ours}/mlp/{name}/kernel'] = core.Rule(f'{theirs}.1.DenseReluDense.{name}.weight',
                                                     core.linear_to_dense)
  return core.ConversionPlan(
      kind=KIND, config=config, source=source, rules=rules, origin=path,
      ignored_prefixes=('decoder.', 'lm_head.', 'shared.', 'encoder.embed_tokens.'))


# --- t5x --------------------------------------------------------------------------------------

_T5X_ROOTS = ('target/', 'optimizer/target/')  # t5x's own layout; old flax.optim layout


def _t5x_root(source: dict[str, sources.LazyTensor], origin: str) -> str:
  for root in _T5X_ROOTS:
    if f'{root}encoder/relpos_bias/rel_embedding' in source:
      return root
  groups = sorted({'/'.join(n.split('/')[:2]) for n in source})
  raise core.ParameterMismatchError(
      f'{origin}: no T5 encoder in this t5x checkpoint (expected target/encoder/relpos_bias/'
      f'rel_embedding and target/encoder/layers_N/...); it holds {groups[:8]}. A t5x '
      'checkpoint saved without parameters (optimizer state only) cannot be converted.')


def _shape(source, name: str, origin: str) -> tuple[int, ...]:
  if name not in source:
    raise core.ParameterMismatchError(f'{origin}: {name} is not in the checkpoint.')
  return source[name].shape


def infer_t5x_config(source: dict[str, sources.LazyTensor],
                     origin: str = 't5x checkpoint') -> T5EncoderConfig:
  """The encoder config implied by a t5x checkpoint's parameter shapes (`sources.open_t5x`).

  A t5x checkpoint carries no config. Layers, d_model, vocabulary rows, heads and buckets
  (the relative-position table is [heads, buckets]), head dim (query width / heads), d_ff
  and gating (`wi_0` present) follow from the shapes. The relative-position max distance
  and the layer-norm epsilon do not: they take T5's values, 128 and 1e-6; pass a config
  (e.g. from a gin file) to `plan_t5x` for a model that changed them.
  """
  root = _t5x_root(source, origin)
  enc = f'{root}encoder'
  layers = {int(m.group(1)) for n in source
            if (m := re.match(re.escape(enc) + r'/layers_(\d+)/', n))}
  if layers != set(range(len(layers))) or not layers:
    raise core.ParameterMismatchError(f'{origin}: encoder layers {sorted(layers)} are not '
                                      'numbered 0..N-1.')
  vocab, d_model = _shape(source, f'{root}token_embedder/embedding', origin)
  heads, buckets = _shape(source, f'{enc}/relpos_bias/rel_embedding', origin)
  _, inner = _shape(source, f'{enc}/layers_0/attention/query/kernel', origin)
  if inner % heads:
    raise core.ParameterMismatchError(f'{origin}: query width {inner} is not a multiple of '
                                      f'{heads} heads.')
  gated = f'{enc}/layers_0/mlp/wi_0/kernel' in source
  _, d_ff = _shape(source, f'{enc}/layers_0/mlp/{"wi_0" if gated else "wi"}/kernel', origin)
  return T5EncoderConfig(vocab_size=vocab, d_model=d_model, num_heads=heads,
                         head_dim=inner // heads, num_layers=len(layers), d_ff=d_ff,
                         gated=gated, relative_attention_num_buckets=buckets)


def plan_t5x(path: str, config: T5EncoderConfig | None = None) -> core.ConversionPlan:
  """A t5x checkpoint (legacy msgpack file or tensorstore directory): its encoder.

  Without `config` the shapes give one (`infer_t5x_config`); a given config is checked
  against the shapes here, naming the first parameter that does not fit, and must use
  every encoder tensor.
  """
  source = sources.open_t5x(path)
  root = _t5x_root(source, path)
  if config is None:
    config = infer_t5x_config(source, path)
  from charred.models import model_kinds  # pylint: disable=g-import-not-at-top
  expected = model_kinds.parameter_shapes(KIND, config)
  # charred's parameter paths are t5x's under the root.
  rules = {name: core.Rule(root + name) for name in expected}
  kept = (f'{root}encoder/', f'{root}token_embedder/')
  # Everything else (decoder, logits, optimizer state, version) is ignored by its outermost
  # group beside the encoder, so an unexpected tensor inside the encoder is still reported.
  ignored = set()
  for name in source:
    if not name.startswith(kept):
      parts = name.split('/')
      k = next(k for k in range(1, len(parts) + 1)
               if not root.startswith('/'.join(parts[:k]) + '/'))
      ignored.add('/'.join(parts[:k]) + ('/' if k < len(parts) else ''))
  plan = core.ConversionPlan(kind=KIND, config=config, source=source, rules=rules, origin=path,
                             ignored_prefixes=tuple(sorted(ignored)))
  unused = core.check_plan(plan, expected)
  if unused:  # e.g. a config with fewer layers than the checkpoint: not a silent truncation
    raise core.ParameterMismatchError(f'{path}: the config leaves {len(unused)} encoder '
                                      f'tensors unused, e.g. {unused[:3]}.')
  return plan
