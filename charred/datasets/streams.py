"""Epoch streams of random-access examples, cut into per-host batches, as Grain datasets.

Both TF-free batchers (the rendered signs, `signs`, and the encoder cache,
`encoder_cache`) read examples by index. Their stream is the concatenation of epochs, epoch
e visiting the examples in `order(e)`, cut into global batches of `batch_size *
shard_count` rows, of which shard i reads rows [i * batch_size, (i + 1) * batch_size).
`epoch_batches` is that stream as a `grain.MapDataset` (element k: this shard's rows of
global batch k, read when accessed); `iterate` reads it with Grain's checkpointable,
optionally prefetching iterator, whose state counts batches from the stream's start.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Sequence

import numpy as np


def epoch_batches(num_examples: int, order: Callable[[int], Sequence[int]], batch_size: int,
                  read: Callable[[np.ndarray, list[int]], Any], *, repeat: bool = True,
                  shard_index: int = 0, shard_count: int = 1, name: str = 'the stream'):
  """The stream as a `grain.MapDataset`: element k is `read(positions, indices)` for this
  shard's rows of global batch k (their stream positions and example indices). Without
  `repeat`, only the full global batches of one epoch. `name` says in errors what the
  examples are."""
  import grain  # pylint: disable=g-import-not-at-top
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
  import grain  # pylint: disable=g-import-not-at-top
  iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=max(prefetch, 0))))
  if start_batch:
    iterator.set_state(dict(iterator.get_state(), next_index=start_batch))
  return iterator
