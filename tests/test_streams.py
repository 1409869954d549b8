"""Epoch streams cut into per-host batches (datasets.streams), against the arithmetic done
by hand."""

import json

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


def test_bucket_batches_by_hand():
  # 7 examples in buckets 0, 1, 0, 1, 1, 0, 0; epoch 1 reversed; global batches of 2.
  bucket_of = np.array([0, 1, 0, 1, 1, 0, 0])
  permute = lambda epoch, positions: 6 - positions if epoch % 2 else positions
  expected = [(0, [0, 2]), (1, [1, 3]), (0, [5, 6]),  # epoch 0 leaves 4 in bucket 1
              (0, [6, 5]), (1, [4, 4]), (1, [3, 1]), (0, [2, 0])]  # epoch 1: 6 5 4 3 2 1 0
  it = iter(streams.bucket_batches(7, permute, bucket_of, 2, chunk_size=3))
  got = [next(it) for _ in range(7)]
  assert [(b['bucket'], b['indices'].tolist()) for b in got] == expected
  assert [b['number'] for b in got] == list(range(7))
  # One epoch only: the partial buffers are left.
  once = iter(streams.bucket_batches(7, permute, bucket_of, 2, repeat=False, chunk_size=3))
  assert len(list(once)) == 3 and once.get_state()['pending'] == {'1': [4]}


def test_bucket_batches_state_resumes_exactly():
  rng = np.random.default_rng(0)
  bucket_of = rng.integers(0, 4, 50)
  permute = lambda epoch, positions: np.random.default_rng(epoch).permutation(50)[positions]
  make = lambda: iter(streams.bucket_batches(50, permute, bucket_of, 3, chunk_size=8))
  straight = make()
  reference = [next(straight)['indices'].tolist() for _ in range(60)]
  for cut in (0, 7, 16, 33):
    it = make()
    for _ in range(cut):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make()
    resumed.set_state(state)
    assert [next(resumed)['indices'].tolist() for _ in range(60 - cut)] == reference[cut:]
  # Every epoch visits each example once: over 60 batches (3.6 epochs) no example is
  # drawn more than 4 times.
  assert np.bincount(np.concatenate(reference), minlength=50).max() <= 4


def test_restartable_iterator_restarts_at_the_saved_batch():
  started = []

  def start(k):
    started.append(k)
    return iter(range(k, 100))
  it = streams.RestartableIterator(start, start_batch=5)
  it.set_state({'next_index': 7})  # lazily started: one start, at 7
  assert [next(it), next(it)] == [7, 8] and started == [7]
  assert it.get_state() == {'next_index': 9}
  it.set_state({'next_index': 2})
  assert next(it) == 2 and started == [7, 2]
