"""Epoch streams of random-access examples, cut into per-host batches, as Grain datasets.

Both TF-free batchers (the rendered signs, `signs`, and the encoder cache,
`encoder_cache`) read examples by index. Their stream is the concatenation of epochs, epoch
e visiting the examples in `order(e)`, cut into global batches of `batch_size *
shard_count` rows, of which shard i reads rows [i * batch_size, (i + 1) * batch_size).
`epoch_batches` is that stream as a `grain.MapDataset` (element k: this shard's rows of
global batch k, read when accessed); `iterate` reads it with Grain's checkpointable,
optionally prefetching iterator, whose state counts batches from the stream's start.
`bucket_batches` plans global batches of one bucket each (bucketing's aspect buckets) as
a checkpointable Grain `IterDataset`; `RestartableIterator` puts a stream that can only
restart at a batch index (tf.data's) behind the same iterator protocol.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np


def epoch_batches(num_examples: int, order: Callable[[int], Sequence[int]], batch_size: int,
                  read: Callable[[np.ndarray, list[int]], Any], *, repeat: bool = True,
                  shard_index: int = 0, shard_count: int = 1, name: str = 'the stream'):
  """The stream as a `grain.MapDataset`: element k is `read(positions, indices)` for this
  shard's rows of global batch k (their stream positions and example indices). Without
  `repeat`, only the full global batches of one epoch. `name` says in errors what the
  examples are."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} is not in [0, shard_count={shard_count}).')
  global_batch = batch_size * shard_count
  if num_examples < global_batch:
    raise ValueError(f'{name} has {num_examples} examples, fewer than one batch of '
                     f'{global_batch}.')
  orders = functools.lru_cache(maxsize=2)(order)

  def batch(k: int):
    first = k * global_batch + shard_index * batch_size
    positions = np.arange(first, first + batch_size)
    epochs, within = np.divmod(positions, num_examples)
    return read(positions, [int(orders(int(e))[i]) for e, i in zip(epochs, within)])

  stop = sys.maxsize if repeat else num_examples // global_batch
  return grain.MapDataset.range(stop).map(batch)


def iterate(dataset, start_batch: int = 0, prefetch: int = 0):
  """Grain's iterator over `dataset` from element `start_batch` on, reading `prefetch`
  elements ahead on a background thread (0: none). `get_state()` / `set_state()`
  checkpoint it; the state's position counts from element 0, so it agrees with
  `start_batch`."""
  iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=max(prefetch, 0))))
  if start_batch:
    iterator.set_state(dict(iterator.get_state(), next_index=start_batch))
  return iterator


class RestartableIterator(grain.DatasetIterator):
  """A stream that restarts at any batch (`start(k)` yields the stream from batch k on,
  as tf.data's skip arithmetic in `pipeline.make_iterator` does) behind Grain's iterator
  protocol: its state is `{'next_index': k}`, as `iterate`'s. The stream is started lazily,
  so `set_state` right after construction starts it once."""

  def __init__(self, start: Callable[[int], Iterator[Any]], start_batch: int = 0):
    super().__init__()
    self._start = start
    self.set_state({'next_index': start_batch})

  def __next__(self):
    if self._iterator is None:
      self._iterator = self._start(self._next_index)
    element = next(self._iterator)
    self._next_index += 1
    return element

  def get_state(self) -> dict[str, int]:
    return {'next_index': self._next_index}

  def set_state(self, state: dict[str, int]) -> None:
    self._next_index, self._iterator = int(state['next_index']), None

  def _get_next_index(self) -> int:
    return self._next_index

  def _set_next_index(self, index: int) -> None:
    self.set_state({'next_index': index})


def epoch_chunks(num_examples: int, permute: Callable[[int, np.ndarray], np.ndarray],
                 chunk_size: int = 4096):
  """The epoch stream of example indices in chunks, as a `grain.MapDataset`: element k is
  chunk c of epoch e (`divmod(k, chunks per epoch)`), `permute(e, positions)` for the
  positions [c * chunk_size, (c + 1) * chunk_size) of that epoch (the last chunk of an
  epoch may be shorter). Chunks let a permutation computed pointwise (a Feistel network)
  serve any number of examples without a per-epoch index array."""
  per_epoch = -(-num_examples // chunk_size)

  def chunk(k: int) -> np.ndarray:
    epoch, c = divmod(k, per_epoch)
    return np.asarray(permute(epoch, np.arange(c * chunk_size,
                                               min((c + 1) * chunk_size, num_examples))))

  return grain.MapDataset.range(sys.maxsize).map(chunk)


def bucket_batches(num_examples: int, permute: Callable[[int, np.ndarray], np.ndarray],
                   bucket_of: np.ndarray, global_batch_size: int, *, repeat: bool = True,
                   chunk_size: int = 4096):
  """Global batches of one bucket each, as a checkpointable `grain.IterDataset`.

  Epoch e visits the examples in the order `permute(e, positions)` gives (see
  `epoch_chunks`), appending each to its bucket's buffer (`bucket_of[index]`); a buffer
  that reaches `global_batch_size` becomes the next element, a dict of `bucket` (int),
  `indices` (int64 [global_batch_size]) and `number` (the batch's number in the stream).
  Buffers carry over across epochs, so nothing is dropped; without `repeat` the stream
  ends after one epoch, leaving the partial buffers. The iterator's state is small and
  JSON-able: `epoch`, `position` (examples of the epoch taken), `num_batches`, and
  `pending` ({str(bucket): [indices]}, the partial buffers).
  """
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size {global_batch_size} must be >= 1.')
  bucket_of = np.asarray(bucket_of)
  if bucket_of.shape != (num_examples,):
    raise ValueError(f'bucket_of has shape {bucket_of.shape}, not ({num_examples},).')
  return _BucketBatchesDataset(epoch_chunks(num_examples, permute, chunk_size), bucket_of,
                               global_batch_size, repeat, chunk_size)


class _BucketBatchesDataset(grain.IterDataset):

  def __init__(self, chunks, bucket_of: np.ndarray, global_batch_size: int, repeat: bool,
               chunk_size: int):
    super().__init__(chunks)
    self._args = (chunks, bucket_of, global_batch_size, repeat, chunk_size)

  def __iter__(self):
    return _BucketBatchesIterator(*self._args)

  def __str__(self) -> str:
    return f'BucketBatches(global_batch_size={self._args[2]})'


class _BucketBatchesIterator(grain.DatasetIterator):
  """Reads the chunks by index, so that `set_state` costs one chunk."""

  def __init__(self, chunks, bucket_of: np.ndarray, global_batch_size: int, repeat: bool,
               chunk_size: int):
    super().__init__()
    self._chunks, self._bucket_of = chunks, bucket_of
    self._global_batch_size, self._repeat, self._chunk_size = global_batch_size, repeat, chunk_size
    self._per_epoch = -(-len(bucket_of) // chunk_size)
    self.set_state(dict(epoch=0, position=0, num_batches=0, pending={}))

  def _index_at(self, position: int) -> int:
    k = self._epoch * self._per_epoch + position // self._chunk_size
    if self._chunk is None or self._chunk[0] != k:
      self._chunk = (k, self._chunks[k])
    return int(self._chunk[1][position % self._chunk_size])

  def __next__(self) -> dict[str, Any]:
    while True:
      if self._position == len(self._bucket_of):
        if not self._repeat:
          raise StopIteration
        self._epoch, self._position = self._epoch + 1, 0
      index = self._index_at(self._position)
      self._position += 1
      bucket = int(self._bucket_of[index])
      waiting = self._pending.setdefault(bucket, [])
      waiting.append(index)
      if len(waiting) == self._global_batch_size:
        del self._pending[bucket]
        self._num_batches += 1
        return dict(bucket=bucket, indices=np.asarray(waiting, np.int64),
                    number=self._num_batches - 1)

  def get_state(self) -> dict[str, Any]:
    return dict(epoch=self._epoch, position=self._position, num_batches=self._num_batches,
                pending={str(k): list(v) for k, v in sorted(self._pending.items()) if v})

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._position = int(state['epoch']), int(state['position'])
    self._num_batches = int(state['num_batches'])
    self._pending = {int(k): [int(i) for i in v] for k, v in state['pending'].items()}
    self._chunk = None
