"""Word lists: deterministic, disjoint, within bounds, frequency-bucketed."""
import collections

import pytest

from charred.datasets import words

# A smaller vocabulary keeps the test fast; the logic is the same.
CONFIG = words.WordSplitConfig(seed=0, vocabulary_size=8000, num_validation=200)


def test_deterministic_per_seed():
  a = words.word_splits(CONFIG)
  words._word_splits.cache_clear()  # Recompute rather than hit the cache.
  b = words.word_splits(CONFIG)
  assert a == b
  c = words.word_splits(words.WordSplitConfig(seed=1, vocabulary_size=8000, num_validation=200))
  assert a["train"] != c["train"]
  assert a["validation"] != c["validation"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_disjoint_case_insensitive_and_bounded(seed):
  config = words.WordSplitConfig(seed=seed, vocabulary_size=8000, num_validation=200)
  splits = words.word_splits(config)
  train, val = splits["train"], splits["validation"]
  assert len(val) == 200 and len(train) > 1000
  assert not {w.lower() for w in train} & {w.lower() for w in val}
  for split in (train, val):
    assert len(set(split)) == len(split)
    for w in split:
      assert config.min_length <= len(w) <= config.max_length
      assert w.isascii() and w.isalpha() and w.islower()


def test_random_fraction_and_buckets():
  splits = words.word_splits(CONFIG)
  for name, split in splits.items():
    buckets = collections.Counter(words.frequency_bucket(w) for w in split)
    # Random strings are exactly the words with zipf frequency 0.
    fraction = buckets[words.UNSEEN] / len(split)
    assert abs(fraction - CONFIG.random_fraction) < 0.02, (name, buckets)
    assert buckets[words.FREQUENT] > 0 and buckets[words.COMMON] > 0, (name, buckets)


def test_validation_spans_frequency_ranks():
  real = words.real_words(CONFIG.vocabulary_size, CONFIG.min_length, CONFIG.max_length)
  rank = {w: i for i, w in enumerate(real)}
  val_ranks = sorted(rank[w] for w in words.word_splits(CONFIG)["validation"] if w in rank)
  assert val_ranks[0] < len(real) * 0.05 and val_ranks[-1] > len(real) * 0.95


def test_frequency_bucket_values():
  assert words.frequency_bucket("the") == words.FREQUENT
  assert words.frequency_bucket("The") == words.FREQUENT
  assert words.frequency_bucket("qzxvwk") == words.UNSEEN
  z = words.zipf_frequency("saxophone")
  expected = words.COMMON if 3 <= z < 4 else words.RARE if 0 < z < 3 else words.FREQUENT
  assert words.frequency_bucket("saxophone") == expected
  assert set(words.BUCKETS) == {"frequent", "common", "rare", "unseen"}


@pytest.mark.parametrize("train_fraction", [0.0, 0.5])
def test_train_random_fraction_changes_training_words_only(train_fraction):
  import dataclasses
  base = words.word_splits(CONFIG)
  mix = words.word_splits(dataclasses.replace(CONFIG, train_random_fraction=train_fraction))
  assert mix["validation"] == base["validation"]  # same held-out words, same order
  real = [w for w in base["train"] if words.frequency_bucket(w) != words.UNSEEN]
  assert sorted(w for w in mix["train"] if words.frequency_bucket(w) != words.UNSEEN) == sorted(real)
  randoms = [w for w in mix["train"] if words.frequency_bucket(w) == words.UNSEEN]
  # n random / (n + real) = f  =>  n = real * f / (1 - f)
  assert len(randoms) == round(len(real) * train_fraction / (1 - train_fraction))
  assert not set(randoms) & set(mix["validation"])
  with pytest.raises(ValueError, match="train_random_fraction"):
    words.word_splits(dataclasses.replace(CONFIG, train_random_fraction=1.0))


def test_invalid_config():
  with pytest.raises(ValueError):
    words.word_splits(words.WordSplitConfig(vocabulary_size=100, num_validation=200))
  with pytest.raises(ValueError):
    words.word_splits(words.WordSplitConfig(random_fraction=1.0))


def test_test_split_comes_out_of_train_and_leaves_validation_alone():
  import dataclasses  # pylint: disable=g-import-not-at-top
  plain = words.word_splits(CONFIG)
  assert "test" not in plain  # num_test=0: the splits every earlier config had
  with_test = words.word_splits(dataclasses.replace(CONFIG, num_test=100))
  test = with_test["test"]
  assert len(test) == len(set(test)) == 100
  assert with_test["validation"] == plain["validation"]
  assert with_test["train"] == [w for w in plain["train"] if w not in set(test)]
  lowered = {w.lower() for w in test}
  assert not lowered & {w.lower() for w in with_test["train"] + with_test["validation"]}
  assert not lowered & set(CONFIG.train_only)
  buckets = collections.Counter(words.frequency_bucket(w) for w in test)
  assert buckets[words.UNSEEN] == 20 and len(buckets) >= 3  # random_fraction, all buckets
