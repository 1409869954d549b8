"""Epoch streams cut into per-host batches (datasets.streams), against the arithmetic done
by hand."""

import numpy as np
import pytest

from charred.datasets import streams


def test_epoch_batches_cut_the_epoch_stream_into_host_rows():
  n = 7  # two shards of 2 rows: global batches of 4 straddle epochs
  order = lambda epoch: list(np.random.default_rng(epoch).permutation(n))
  stream = [int(i) for e in range(6) for i in order(e)]  # epochs one after another
  read = lambda positions, indices: (list(positions), indices)
  for shard in (0, 1):
    dataset = streams.epoch_batches(n, order, 2, read, shard_index=shard, shard_count=2)
    for k in range(8):
      first = 4 * k + 2 * shard
      assert dataset[k] == ([first, first + 1], stream[first:first + 2])
  once = streams.epoch_batches(n, order, 2, read, repeat=False, shard_count=2)
  assert len(once) == 1  # only whole global batches of one epoch
  with pytest.raises(ValueError, match='fewer than one batch of 8'):
    streams.epoch_batches(n, order, 4, read, shard_count=2)
  with pytest.raises(ValueError, match='shard_index 2 is not in'):
    streams.epoch_batches(n, order, 2, read, shard_index=2, shard_count=2)


@pytest.mark.parametrize('prefetch', [0, 3])
def test_iterator_state_and_start_batch_count_the_same_batches(prefetch):
  dataset = streams.epoch_batches(5, lambda e: list(range(5)), 1,
                                  lambda positions, indices: int(positions[0]))
  running = streams.iterate(dataset, prefetch=prefetch)
  assert [next(running) for _ in range(3)] == [0, 1, 2]
  resumed = streams.iterate(dataset, start_batch=3, prefetch=prefetch)
  assert resumed.get_state() == running.get_state()
  assert [next(resumed) for _ in range(2)] == [3, 4]
  restored = streams.iterate(dataset, prefetch=prefetch)
  restored.set_state(running.get_state())
  assert next(restored) == 3
