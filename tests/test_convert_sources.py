"""Lazy checkpoint readers and charred's own format, against the writers' own readers."""

import os

from flax import serialization
from flax.traverse_util import flatten_dict
import ml_dtypes
import numpy as np
import pytest

from charred.models import pretrained
from charred.models.convert import sources
from charred.models.t5_encoder import T5EncoderConfig

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
T5X_LEGACY = os.path.join(FIXTURES, 't5x', 'test_t5_tiny.checkpoint_0')


def test_streamed_msgpack_equals_flax_restore_on_a_t5x_checkpoint():
  with open(T5X_LEGACY, 'rb') as f:
    reference = flatten_dict(serialization.msgpack_restore(f.read()), sep='/')
  lazy = sources.open_flax_msgpack(T5X_LEGACY)
  assert set(lazy) == set(reference)
  for name, value in reference.items():
    got = lazy[name].load()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(value), err_msg=name)
    if isinstance(value, np.ndarray):
      assert lazy[name].shape == value.shape and lazy[name].dtype == value.dtype


def test_streamed_msgpack_reads_chunked_and_bfloat16_arrays(tmp_path, monkeypatch):
  # flax splits arrays larger than MAX_CHUNK_SIZE bytes; shrink it to exercise that path.
  monkeypatch.setattr(serialization, 'MAX_CHUNK_SIZE', 64)
  rng = np.random.default_rng(0)
  tree = {'a': {'big': rng.normal(size=(20, 7)).astype(np.float32),
                'bf16': rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16)},
          'step': np.int32(7), 'empty': {}}
  path = tmp_path / 'x.msgpack'
  path.write_bytes(serialization.msgpack_serialize(tree))
  reference = flatten_dict(serialization.msgpack_restore(path.read_bytes()), sep='/')
  lazy = sources.open_flax_msgpack(str(path))
  assert set(lazy) == set(reference) == {'a/big', 'a/bf16', 'step'}
  for name, value in reference.items():
    np.testing.assert_array_equal(np.asarray(lazy[name].load()), value)
  assert lazy['a/big'].shape == (20, 7) and lazy['a/bf16'].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize('cut', [0.5, 0.999])
def test_truncated_msgpack_is_a_clear_error(tmp_path, cut):
  data = open(T5X_LEGACY, 'rb').read()
  path = tmp_path / 'truncated'
  path.write_bytes(data[:int(len(data) * cut)])
  with pytest.raises(sources.CheckpointFormatError, match='truncated'):
    sources.open_flax_msgpack(str(path))


def test_safetensors_reader_matches_safetensors_and_detects_truncation(tmp_path):
  from safetensors.numpy import load_file, save_file
  rng = np.random.default_rng(1)
  tensors = {'w': rng.normal(size=(4, 3)).astype(np.float32),
             'h': rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
             'i': np.arange(6, dtype=np.int64).reshape(2, 3)}
  path = str(tmp_path / 'm.safetensors')
  save_file(tensors, path)
  reference, lazy = load_file(path), sources.open_safetensors(path)
  for name, value in reference.items():
    assert lazy[name].shape == value.shape and lazy[name].dtype == value.dtype
    np.testing.assert_array_equal(lazy[name].load(), value)
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:-10])
  with pytest.raises(sources.CheckpointFormatError, match='m.safetensors: not a readable'):
    sources.open_safetensors(path)


def test_torch_reader_is_weights_only(tmp_path):
  torch = pytest.importorskip('torch')
  state = {'w': torch.randn(3, 4), 'b': torch.randn(4).to(torch.bfloat16)}
  path = str(tmp_path / 'pytorch_model.bin')
  torch.save(state, path)
  lazy = sources.open_torch_bin(path)
  np.testing.assert_array_equal(lazy['w'].load(), state['w'].numpy())
  np.testing.assert_array_equal(lazy['b'].load().astype(np.float32),
                                state['b'].float().numpy())
  # Arbitrary pickled objects are refused, not executed.
  torch.save({'w': torch.randn(2), 'evil': pytest.raises}, path)
  with pytest.raises(sources.CheckpointFormatError, match='not a readable PyTorch'):
    sources.open_torch_bin(path)


def _tiny_t5():
  return T5EncoderConfig(vocab_size=32, d_model=16, num_heads=2, head_dim=8, num_layers=2,
                         d_ff=24)


def _random_tensors(kind, config, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32)
          for k, s in pretrained.parameter_shapes(kind, config).items()}


def test_charred_format_round_trip(tmp_path):
  config = _tiny_t5()
  tensors = _random_tensors('t5_encoder', config)
  out = str(tmp_path / 'model')
  count = pretrained.save_pretrained(out, 't5_encoder', config, tensors.items())
  assert count == pretrained.count_parameters('t5_encoder', config)
  assert pretrained.detect_format(out) == 'charred'
  kind, restored_config, params = pretrained.read_charred_model(out)
  assert kind == 't5_encoder' and restored_config == config
  flat = flatten_dict(params, sep='/')
  assert set(flat) == set(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(flat[name], value)
  module, params = pretrained.load_pretrained(out)
  ids = np.array([[5, 6, 7, 1, 0]])
  assert module.apply({'params': params}, ids, (ids > 0).astype(np.int32)).shape == (1, 5, 16)
  assert sorted(os.listdir(tmp_path)) == ['model']  # no temporary leftovers
  with pytest.raises(FileExistsError):
    pretrained.save_pretrained(out, 't5_encoder', config, tensors.items())


def test_failed_save_leaves_nothing_behind(tmp_path):
  config = _tiny_t5()
  tensors = list(_random_tensors('t5_encoder', config).items())

  def failing():
    yield tensors[0]
    raise OSError('disk full')

  out = str(tmp_path / 'model')
  with pytest.raises(OSError, match='disk full'):
    pretrained.save_pretrained(out, 't5_encoder', config, failing())
  assert os.listdir(tmp_path) == []


def test_detect_format_names_what_it_expected(tmp_path):
  assert pretrained.detect_format(T5X_LEGACY) == 't5x'
  assert pretrained.detect_format(os.path.join(FIXTURES, 'diffusers_flax', 'unet')) == 'diffusers'
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(ValueError, match='not a recognised checkpoint'):
    pretrained.detect_format(str(tmp_path))
  with pytest.raises(ValueError, match='not a t5x msgpack'):
    pretrained.detect_format(str(tmp_path / 'notes.txt'))
