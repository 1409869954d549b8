"""Lazy, tensor-by-tensor readers for the checkpoint formats charred converts from.

Each `open_*` function returns `{name: LazyTensor}` without reading any tensor data: a
converter loads one tensor, transforms it, writes it and lets it go, so peak memory is
bounded by the largest tensor rather than the checkpoint (ByT5-XXL's encoder is 36 GB in
float32). Names are the format's own: dotted for PyTorch (`down_blocks.0.resnets.0.conv1.weight`),
'/'-joined paths for Flax msgpack and t5x (`target/encoder/layers_0/attention/key/kernel`).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Callable

import ml_dtypes
import msgpack
import numpy as np


class CheckpointFormatError(ValueError):
  """A checkpoint file that cannot be read: truncated, corrupt or of an unexpected format."""


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  shape: tuple[int, ...]
  dtype: np.dtype
  load: Callable[[], np.ndarray] = dataclasses.field(repr=False)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _np_dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name in ('bfloat16', 'bf16') else np.dtype(name)


# --- safetensors ---------------------------------------------------------------------------


def open_safetensors(path: str) -> dict[str, LazyTensor]:
  """A .safetensors file, memory-mapped (bfloat16 included, through ml_dtypes). The
  library itself refuses truncated files (data not covering the header's offsets)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    handle = safe_open(path, framework='np')
    names = list(handle.keys())
    tensors = {}
    for name in names:
      sl = handle.get_slice(name)
      tensors[name] = LazyTensor(tuple(sl.get_shape()), _np_dtype(_SAFETENSORS_DTYPES.get(
          sl.get_dtype(), sl.get_dtype().lower())), lambda n=name: handle.get_tensor(n))
  except Exception as e:  # safetensors raises SafetensorError and OSError variants.
    raise CheckpointFormatError(f'{path}: not a readable safetensors file ({e}).') from e
  return tensors


_SAFETENSORS_DTYPES = {'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'F64': 'float64',
                       'I64': 'int64', 'I32': 'int32', 'I16': 'int16', 'I8': 'int8',
                       'U8': 'uint8', 'BOOL': 'bool'}


# --- PyTorch .bin (torch.save zip archives), weights-only ----------------------------------


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def open_torch_bin(path: str) -> dict[str, LazyTensor]:
  """A `torch.save`d state dict, read with `weights_only=True` (no arbitrary pickles) and
  memory-mapped where the file is a zip archive, as every torch >= 1.6 writes."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointFormatError(f'{path}: reading PyTorch .bin files needs torch '
                                '(pip install torch).') from e
  try:
    try:
      state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError as e:
      if 'mmap' not in str(e):
        raise
      state = torch.load(path, map_location='cpu', weights_only=True)  # legacy format
  except Exception as e:  # torch raises many types on corrupt archives.
    raise CheckpointFormatError(f'{path}: not a readable PyTorch weights file ({e}).') from e
  if not isinstance(state, dict):
    raise CheckpointFormatError(f'{path}: expected a state dict, got {type(state).__name__}.')
  dtype_of = lambda t: np.dtype(ml_dtypes.bfloat16) if str(t.dtype) == 'torch.bfloat16' else (
      np.dtype(str(t.dtype).replace('torch.', '')))
  return {name: LazyTensor(tuple(t.shape), dtype_of(t), lambda t=t: _torch_to_numpy(t))
          for name, t in state.items() if hasattr(t, 'shape')}


# --- Flax msgpack (diffusers Flax, t5x legacy), indexed without reading the data -----------

# msgpack type bytes (https://github.com/msgpack/msgpack/blob/master/spec.md).
_FIXED_SIZES = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4,
                0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8, 0xd4: 2, 0xd5: 3, 0xd6: 5,
                0xd7: 9, 0xd8: 17}
_LENGTH_PREFIXED = {0xc4: (1, 0), 0xc5: (2, 0), 0xc6: (4, 0),  # bin: (length bytes, extra)
                    0xc7: (1, 1), 0xc8: (2, 1), 0xc9: (4, 1),  # ext: + 1 type byte
                    0xd9: (1, 0), 0xda: (2, 0), 0xdb: (4, 0)}  # str
_UINT = {1: '>B', 2: '>H', 4: '>I'}
_CHUNKED_ARRAY_KEY = '__msgpack_chunked_array__'  # flax's encoding of arrays > 1 GiB.


class _Reader:
  """Walks a msgpack file by seeking past payloads (never reading tensor data)."""

  def __init__(self, f, path: str):
    self.f, self.path = f, path
    self.size = os.fstat(f.fileno()).st_size

  def read(self, n: int) -> bytes:
    data = self.f.read(n)
    if len(data) != n:
      raise CheckpointFormatError(f'{self.path}: truncated msgpack at byte {self.f.tell()}.')
    return data

  def uint(self, n: int) -> int:
    return struct.unpack(_UINT[n], self.read(n))[0]

  def container_length(self, b: int) -> tuple[str, int] | None:
    """('map'|'array', length) if type byte b starts a container, else None."""
    if 0x80 <= b <= 0x8f:
      return 'map', b & 0x0f
    if 0x90 <= b <= 0x9f:
      return 'array', b & 0x0f
    if b in (0xde, 0xdf):
      return 'map', self.uint(2 if b == 0xde else 4)
    if b in (0xdc, 0xdd):
      return 'array', self.uint(2 if b == 0xdc else 4)
    return None

  def skip(self) -> None:
    b = self.read(1)[0]
    container = self.container_length(b)
    if container:
      kind, n = container
      for _ in range(2 * n if kind == 'map' else n):
        self.skip()
    elif b <= 0x7f or b >= 0xe0:
      pass
    elif 0xa0 <= b <= 0xbf:
      self.seek_forward(b & 0x1f)
    elif b in _FIXED_SIZES:
      self.seek_forward(_FIXED_SIZES[b])
    elif b in _LENGTH_PREFIXED:
      n, extra = _LENGTH_PREFIXED[b]
      self.seek_forward(self.uint(n) + extra)
    else:
      raise CheckpointFormatError(f'{self.path}: invalid msgpack type byte {b:#x} at '
                                  f'{self.f.tell() - 1}.')

  def seek_forward(self, n: int) -> None:
    end = self.f.tell() + n
    if end > self.size:
      raise CheckpointFormatError(f'{self.path}: truncated msgpack (an entry ends at byte '
                                  f'{end}, the file has {self.size}).')
    self.f.seek(end)

  def key(self) -> str:
    start = self.f.tell()
    self.skip()
    end = self.f.tell()
    self.f.seek(start)
    key = msgpack.unpackb(self.read(end - start), raw=False, strict_map_key=False)
    return key.decode() if isinstance(key, bytes) else str(key)


def _ext_hook(code: int, data: bytes):
  """Flax's msgpack extension types: 1 ndarray, 2 complex, 3 numpy scalar."""
  if code in (1, 3):
    shape, dtype, buffer = msgpack.unpackb(data, raw=False)
    return np.frombuffer(buffer, dtype=_np_dtype(dtype)).reshape(shape)
  if code == 2:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  return msgpack.ExtType(code, data)


def unpack_value(data: bytes):
  """One msgpack value decoded with flax's array extensions, chunked arrays joined."""
  value = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
  if isinstance(value, dict) and value.get(_CHUNKED_ARRAY_KEY):
    # flax stores tuples as {'0': ..., '1': ...} maps.
    as_list = lambda d: [d[k] for k in sorted(d, key=int)] if isinstance(d, dict) else list(d)
    chunks = as_list(value['chunks'])
    return np.concatenate([np.ravel(c) for c in chunks]).reshape(as_list(value['shape']))
  return value


def index_msgpack(path: str) -> dict[str, tuple[int, int]]:
  """'/'-joined path -> (offset, length) of every leaf of a msgpack file of nested maps."""
  index = {}
  with open(path, 'rb') as f:
    reader = _Reader(f, path)

    def walk(prefix: str):
      start = f.tell()
      b = reader.read(1)[0]
      container = reader.container_length(b)
      if container and container[0] == 'map':
        entries_start = f.tell()
        keys = []
        for _ in range(container[1]):
          keys.append(reader.key())
          reader.skip()
        if _CHUNKED_ARRAY_KEY not in keys:
          f.seek(entries_start)
          for _ in range(container[1]):
            k = reader.key()
            walk(f'{prefix}/{k}' if prefix else k)
          return
      f.seek(start)
      reader.skip()
      index[prefix] = (start, f.tell() - start)

    walk('')
    if f.tell() != reader.size:
      raise CheckpointFormatError(f'{path}: {reader.size - f.tell()} trailing bytes after the '
                                  'msgpack value.')
  return index


def _read_value(path: str, offset: int, length: int):
  with open(path, 'rb') as f:
    f.seek(offset)
    return unpack_value(f.read(length))


def open_flax_msgpack(path: str) -> dict[str, LazyTensor]:
  """A flax.serialization msgpack file (diffusers Flax weights, t5x legacy checkpoints).

  Leaves that are not arrays (t5x's `version`, spec dicts) are read eagerly and returned
  under `LazyTensor(shape=(), dtype=object)`; arrays stay on disk until loaded.
  """
  tensors = {}
  for name, (offset, length) in index_msgpack(path).items():
    head = _peek_array_header(path, offset, length)
    load = lambda o=offset, n=length: np.asarray(_read_value(path, o, n))
    if head is None:
      value = _read_value(path, offset, length)
      tensors[name] = LazyTensor((), np.dtype(object), lambda v=value: v)
    else:
      tensors[name] = LazyTensor(head[0], head[1], load)
  return tensors


def _peek_array_header(path: str, offset: int, length: int):
  """(shape, dtype) of a flax ndarray value without reading its buffer, else None."""
  del length
  with open(path, 'rb') as f:
    f.seek(offset)
    return _array_header(_Reader(f, path))


def _array_header(reader: _Reader):
  f = reader.f
  start = f.tell()
  b = reader.read(1)[0]
  container = reader.container_length(b)
  if container and container[0] == 'map':  # flax's chunked array: {shape, chunks, ...}
    shape = dtype = None
    for _ in range(container[1]):
      key = reader.key()
      value_start = f.tell()
      if key == 'shape':
        reader.skip()
        end = f.tell()
        f.seek(value_start)
        raw = msgpack.unpackb(reader.read(end - value_start), raw=False, strict_map_key=False)
        shape = tuple(raw[k] for k in sorted(raw, key=int)) if isinstance(raw, dict) else tuple(raw)
      elif key == 'chunks':
        chunks = reader.container_length(reader.read(1)[0])
        if chunks and chunks[1]:
          if chunks[0] == 'map':
            reader.key()
          first = _array_header(reader)
          dtype = first[1] if first else None
        f.seek(value_start)
        reader.skip()
      else:
        reader.skip()
    return (shape, dtype) if shape is not None and dtype is not None else None
  if b not in (0xc7, 0xc8, 0xc9):
    f.seek(start)
    return None
  n = {0xc7: 1, 0xc8: 2, 0xc9: 4}[b]
  reader.read(n)
  if reader.read(1)[0] not in (1, 3):
    return None
  # The ext payload is a msgpack array [shape, dtype, buffer]; read the first two.
  unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 16)
  if unpacker.read_array_header() != 3:
    return None
  shape, dtype = unpacker.unpack(), unpacker.unpack()
  return tuple(shape), _np_dtype(dtype)


# --- t5x ------------------------------------------------------------------------------------


def _is_tensorstore_spec(value) -> bool:
  return isinstance(value, dict) and 'driver' in value and 'kvstore' in value


def open_t5x(path: str) -> dict[str, LazyTensor]:
  """A t5x checkpoint: the legacy single msgpack file, or a directory holding the
  tensorstore layout (a small `checkpoint` msgpack whose leaves are tensorstore specs of
  zarr arrays stored beside it, one directory per parameter)."""
  if os.path.isfile(path):
    return open_flax_msgpack(path)
  index_path = os.path.join(path, 'checkpoint')
  if not os.path.isfile(index_path):
    raise CheckpointFormatError(f'{path}: no t5x `checkpoint` file in this directory.')
  with open(index_path, 'rb') as f:
    try:
      tree = unpack_value(f.read())
    except Exception as e:  # msgpack raises several types on corrupt input.
      raise CheckpointFormatError(f'{index_path}: not a readable msgpack file ({e}).') from e
  tensors = {}

  def walk(prefix, node):
    if _is_tensorstore_spec(node):
      tensors[prefix] = _tensorstore_leaf(path, prefix, node)
    elif isinstance(node, dict):
      for k, v in node.items():
        walk(f'{prefix}/{k}' if prefix else str(k), v)
    else:
      value = np.asarray(node)
      tensors[prefix] = LazyTensor(value.shape, value.dtype, lambda v=value: v)

  walk('', tree)
  return tensors


def _tensorstore_leaf(directory: str, name: str, spec: dict) -> LazyTensor:
  spec = dict(spec)
  # t5x records the kvstore as written (gfile / gs:// paths, relative to the checkpoint
  # directory); read the local copy beside the `checkpoint` file instead.
  relative = spec['kvstore']['path'].rstrip('/').split('/')[-1]
  spec['kvstore'] = {'driver': 'file',
                     'path': os.path.join(os.path.abspath(directory), relative) + '/'}
  metadata = spec.get('metadata', {})
  if 'shape' not in metadata or 'dtype' not in spec:
    raise CheckpointFormatError(f'{directory}: tensorstore spec of {name} lacks shape or dtype.')

  def load():
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(spec['kvstore']['path']):
      raise CheckpointFormatError(f'{directory}: the data of {name} '
                                  f'({spec["kvstore"]["path"]}) is missing.')
    try:
      # t5x's spec carries the zarr metadata; some copies lack the `.zarray` file.
      has_metadata = os.path.exists(os.path.join(spec['kvstore']['path'], '.zarray'))
      store = ts.open(spec, open=True, read=True, assume_metadata=not has_metadata).result()
      return np.asarray(store.read().result())
    except Exception as e:  # tensorstore raises ValueError for corrupt chunks.
      raise CheckpointFormatError(f'{directory}: cannot read {name}: {e}') from e

  return LazyTensor(tuple(metadata['shape']), _np_dtype(spec['dtype']), load)
