"""T5 / ByT5 encoders from transformers and t5x, against transformers' own T5EncoderModel."""

import os

from flax import serialization
from flax.traverse_util import flatten_dict
import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from charred.configs import gin_utils
from charred.models import pretrained
from charred.models.convert import core, sources, t5
from charred.models.t5_encoder import T5Encoder, T5EncoderConfig

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
T5X_LEGACY = os.path.join(FIXTURES, 't5x', 'test_t5_tiny.checkpoint_0')
T5X_TENSORSTORE = os.path.join(FIXTURES, 't5x', 'tiny_t5', 'checkpoint_1')


def _relative_error(ours, reference, mask):
  keep = mask.astype(bool)
  ours, reference = np.asarray(ours)[keep], np.asarray(reference)[keep]
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _ids_and_mask(vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(3, 11))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # padded rows: charred and transformers differ only at padding positions
  mask[2, 4:] = 0
  return np.where(mask > 0, ids, 0), mask


def _charred_output(path, ids, mask, **kwargs):
  module, params = pretrained.load_pretrained(path, **kwargs)
  return np.asarray(module.apply({'params': params}, ids, mask))


def _transformers_output(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids),
                 attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


# --- ByT5 sizes -------------------------------------------------------------------------------

# facts.md: published ByT5 encoder parameter counts, at their printed precision.
BYT5_PUBLISHED = {'small': (217.7, 1e6), 'base': (414.7, 1e6), 'large': (864.2, 1e6),
                  'xl': (2.614, 1e9), 'xxl': (8.990, 1e9)}


def _gin_config(name):
  gin.clear_config()
  try:
    gin_utils.parse([f'models/byt5_{name}.gin'])
    return gin.get_configurable(T5EncoderConfig)()
  finally:
    gin.clear_config()


@pytest.mark.parametrize('size', sorted(BYT5_PUBLISHED))
def test_byt5_gin_files_give_published_encoder_sizes(size):
  config = _gin_config(size)
  assert (config.vocab_size, config.head_dim, config.gated) == (384, 64, True)
  n = pretrained.count_parameters('t5_encoder', config)
  published, unit = BYT5_PUBLISHED[size]
  digits = 1 if unit == 1e6 else 3
  assert round(n / unit, digits) == published, n


def test_encoder_parameters_carry_logical_axes_of_their_rank():
  config = T5EncoderConfig(vocab_size=384, d_model=16, num_heads=2, head_dim=8, num_layers=2,
                           d_ff=24)
  boxed = jax.eval_shape(T5Encoder(config).init, jax.random.PRNGKey(0),
                         np.ones((1, 4), np.int32))['params']
  leaves = flatten_dict(boxed, sep='/')
  vocabulary = {'vocab', 'embed', 'heads', 'mlp', 'relpos_buckets'}
  for name, leaf in leaves.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= vocabulary, name
  assert leaves['encoder/layers_0/attention/out/kernel'].names == ('heads', 'embed')
  assert leaves['encoder/relpos_bias/rel_embedding'].names == ('heads', 'relpos_buckets')
  assert set(flatten_dict(nn.meta.unbox(boxed), sep='/')) == set(leaves)


# --- transformers -----------------------------------------------------------------------------


def _tiny_transformers_config(**overrides):
  values = dict(vocab_size=384, d_model=32, d_kv=8, num_heads=4, num_layers=3, d_ff=48,
                feed_forward_proj='gated-gelu', relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.0, num_decoder_layers=1)
  values.update(overrides)
  return transformers.T5Config(**values)


def _randomised(model, seed):
  # Default init leaves norms at 1; randomise everything so every tensor matters, at
  # fan-in scale so attention logits stay in the range trained models have.
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      scale = p.shape[1] ** -0.5 if p.ndim > 1 else 0.2
      p.copy_(torch.randn_like(p) * scale + (p.ndim == 1))
  return model.eval()


@pytest.mark.parametrize('save', ['safetensors', 'bin', 'sharded', 'seq2seq', 'relu'])
def test_transformers_encoder_matches_transformers(tmp_path, save):
  config = _tiny_transformers_config(feed_forward_proj='relu' if save == 'relu' else
                                     'gated-gelu')
  cls = (transformers.T5ForConditionalGeneration if save == 'seq2seq' else
         transformers.T5EncoderModel)
  model = _randomised(cls(config), seed=1)
  model.save_pretrained(tmp_path, max_shard_size='100KB' if save == 'sharded' else '50GB')
  if save == 'bin':
    # transformers 5 writes safetensors only; older releases wrote torch.save(state_dict())
    # (tied embeddings included twice) as pytorch_model.bin.
    os.remove(tmp_path / 'model.safetensors')
    torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
  names = set(os.listdir(tmp_path))
  assert {'bin': 'pytorch_model.bin', 'sharded': 'model.safetensors.index.json'}.get(
      save, 'model.safetensors') in names
  plan = t5.plan_transformers(str(tmp_path))
  assert core.check_plan(plan, pretrained.parameter_shapes('t5_encoder', plan.config)) == []
  ids, mask = _ids_and_mask(384)
  encoder = model.get_encoder() if save == 'seq2seq' else model
  error = _relative_error(_charred_output(str(tmp_path), ids, mask),
                          _transformers_output(encoder, ids, mask), mask)
  print(f'transformers {save}: max relative error {error:.2e}')
  assert error <= 1e-5


def test_transformers_config_mapping_and_activations():
  raw = _tiny_transformers_config().to_dict()
  assert t5.t5_config_from_transformers(raw) == T5EncoderConfig(
      vocab_size=384, d_model=32, num_heads=4, head_dim=8, num_layers=3, d_ff=48, gated=True)
  assert not t5.t5_config_from_transformers(dict(raw, feed_forward_proj='relu')).gated
  for unsupported in ('gated-silu', 'gelu', 'gated-relu'):
    with pytest.raises(ValueError, match=f'feed_forward_proj {unsupported!r} is not supported'):
      t5.t5_config_from_transformers(dict(raw, feed_forward_proj=unsupported))
  # transformers' 'gated-gelu' is 'gelu_new', the tanh approximation charred computes.
  x = np.linspace(-6, 6, 1001, dtype=np.float32)
  theirs = transformers.activations.ACT2FN[
      transformers.T5Config(feed_forward_proj='gated-gelu').dense_act_fn](torch.from_numpy(x))
  np.testing.assert_allclose(np.asarray(nn.gelu(x, approximate=True)), theirs.numpy(),
                             atol=1e-6)
  assert np.abs(np.asarray(nn.gelu(x, approximate=False)) - theirs.numpy()).max() > 1e-4


# --- t5x --------------------------------------------------------------------------------------


def _legacy_tree():
  with open(T5X_LEGACY, 'rb') as f:
    return serialization.msgpack_restore(f.read())


def _transformers_from_t5x(target, config: T5EncoderConfig):
  """transformers' T5EncoderModel with t5x weights loaded by this test's own name mapping."""
  model = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.head_dim,
      num_heads=config.num_heads, num_layers=config.num_layers, d_ff=config.d_ff,
      feed_forward_proj='gated-gelu', dropout_rate=0.0,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance))
  enc = target['encoder']
  state = {'shared.weight': target['token_embedder']['embedding'],
           'encoder.final_layer_norm.weight': enc['encoder_norm']['scale'],
           'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight':
               enc['relpos_bias']['rel_embedding'].T}
  for i in range(config.num_layers):
    layer, prefix = enc[f'layers_{i}'], f'encoder.block.{i}.layer'
    for t5x_name, short in zip(('query', 'key', 'value', 'out'), 'qkvo'):
      state[f'{prefix}.0.SelfAttention.{short}.weight'] = layer['attention'][t5x_name]['kernel'].T
    state[f'{prefix}.0.layer_norm.weight'] = layer['pre_attention_layer_norm']['scale']
    state[f'{prefix}.1.layer_norm.weight'] = layer['pre_mlp_layer_norm']['scale']
    for w in ('wi_0', 'wi_1', 'wo'):
      state[f'{prefix}.1.DenseReluDense.{w}.weight'] = layer['mlp'][w]['kernel'].T
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {'encoder.embed_tokens.weight'}
  model.tie_weights()
  return model.eval()


def test_t5x_legacy_checkpoint_matches_transformers():
  source = sources.open_t5x(T5X_LEGACY)
  config = t5.infer_t5x_config(source)
  assert config == T5EncoderConfig(vocab_size=32128, d_model=8, num_heads=4, head_dim=3,
                                   num_layers=2, d_ff=16, gated=True)
  plan = t5.plan_t5x(T5X_LEGACY)
  assert plan.config == config
  assert core.check_plan(plan, pretrained.parameter_shapes('t5_encoder', config)) == []
  reference = _transformers_from_t5x(_legacy_tree()['optimizer']['target'], config)
  ids, mask = _ids_and_mask(config.vocab_size)
  error = _relative_error(_charred_output(T5X_LEGACY, ids, mask),
                          _transformers_output(reference, ids, mask), mask)
  print(f't5x legacy: max relative error {error:.2e}')
  assert error <= 1e-5


def _write_t5x_tensorstore(directory, tree, root):
  """A t5x tensorstore checkpoint of `tree` as t5x writes it: one gzip zarr array per leaf in
  a directory named by its '.'-joined path, a `checkpoint` msgpack of their specs."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  os.makedirs(directory)

  def write(path, value):
    value = np.asarray(value)
    name = '.'.join(path)
    chunks = [max(1, s // 2) for s in value.shape]  # several chunks per array
    metadata = {'chunks': chunks, 'compressor': {'id': 'gzip', 'level': 1},
                'shape': list(value.shape)}
    store = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file',
                                                   'path': os.path.join(directory, name)},
                     'metadata': dict(metadata, dtype=value.dtype.str)},
                    create=True).result()
    store.write(value).result()
    return {'driver': 'zarr', 'dtype': value.dtype.name, 'metadata': metadata,
            'kvstore': {'driver': 'gfile', 'path': name + '/'}}

  specs = {}
  for path, value in flatten_dict(tree).items():
    node = specs
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = write(path, value)
  checkpoint = dict(specs)
  checkpoint['state'] = {'step': np.int32(1)}
  if root == 'optimizer/target/':
    checkpoint = {'optimizer': checkpoint}
  checkpoint['version'] = 3
  with open(os.path.join(directory, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize(checkpoint))


@pytest.mark.parametrize('root', ['target/', 'optimizer/target/'])
def test_t5x_tensorstore_layout_converts_like_the_legacy_file(tmp_path, root):
  target = _legacy_tree()['optimizer']['target']
  directory = str(tmp_path / 'checkpoint_1')
  _write_t5x_tensorstore(directory, {'target': target}, root)
  assert pretrained.detect_format(directory) == 't5x'
  plan = t5.plan_t5x(directory)
  legacy = t5.plan_t5x(T5X_LEGACY)
  assert plan.config == legacy.config
  expected = pretrained.parameter_shapes('t5_encoder', plan.config)
  assert core.check_plan(plan, expected) == []
  assert any(p.endswith('decoder/') for p in plan.ignored_prefixes)
  ours = dict(core.iter_converted(plan, expected))
  theirs = dict(core.iter_converted(legacy, expected))
  assert set(ours) == set(theirs) == set(expected)
  for name in expected:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_t5x_tensorstore_fixture_reads_like_tensorstore_and_has_no_encoder():
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  with open(os.path.join(T5X_TENSORSTORE, 'checkpoint'), 'rb') as f:
    specs = flatten_dict(sources.unpack_value(f.read()), sep='/',
                         is_leaf=lambda _, v: isinstance(v, dict) and 'driver' in v)
  lazy = sources.open_t5x(T5X_TENSORSTORE)
  read = 0
  for name, spec in specs.items():
    if not isinstance(spec, dict):
      continue
    spec = dict(spec, kvstore={'driver': 'file', 'path': os.path.join(
        os.path.abspath(T5X_TENSORSTORE), spec['kvstore']['path'])})
    # The fixture has no `.zarray` files: the spec in `checkpoint` is the metadata.
    direct = ts.open(spec, open=True, read=True, assume_metadata=True).result().read().result()
    got = lazy[name].load()
    assert got.dtype == direct.dtype and lazy[name].shape == direct.shape, name
    np.testing.assert_array_equal(got, direct, err_msg=name)
    read += 1
  assert read == 3  # bias, kernel, step
  with pytest.raises(core.ParameterMismatchError, match='no T5 encoder'):
    t5.plan_t5x(T5X_TENSORSTORE)


def test_t5x_config_that_does_not_fit_names_the_parameter_and_both_shapes():
  config = T5EncoderConfig(vocab_size=32128, d_model=8, num_heads=4, head_dim=3,
                           num_layers=2, d_ff=32)
  with pytest.raises(core.ParameterMismatchError) as e:
    t5.plan_t5x(T5X_LEGACY, config)
  message = str(e.value)
  assert 'encoder/layers_0/mlp/wi_0/kernel' in message
  assert '(8, 16)' in message and '(8, 32)' in message
  # More layers than the checkpoint: the missing tensor is named; fewer: the unused ones.
  for layers, missing in ((3, 'layers_2'), (1, 'unused.*layers_1')):
    with pytest.raises(core.ParameterMismatchError, match=missing):
      pretrained.load_pretrained(T5X_LEGACY, t5_config=T5EncoderConfig(
          vocab_size=32128, d_model=8, num_heads=4, head_dim=3, num_layers=layers, d_ff=16))


def test_truncated_t5x_file_is_a_checkpoint_format_error(tmp_path):
  data = open(T5X_LEGACY, 'rb').read()
  path = tmp_path / 'checkpoint_0'
  path.write_bytes(data[:len(data) * 2 // 3])
  with pytest.raises(sources.CheckpointFormatError):
    pretrained.load_pretrained(str(path))
