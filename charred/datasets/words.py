"""Deterministic train/validation(/test) word lists for the typography data.

Real words come from wordfreq's English frequency list so that evaluation can
bucket spelling accuracy by frequency as DrawText does; random lowercase
letter strings probe spelling of words the text encoder has never seen.
Validation words never appear in training (case-insensitively), so
validation measures generalisation to unseen words rather than memorisation.
No TensorFlow here.
"""
from __future__ import annotations

import dataclasses
import functools
import string

import numpy as np
import wordfreq

_LANG = "en"
_LETTERS = np.array(list(string.ascii_lowercase))
# Tags that separate the random streams drawn from one seed.
_SHUFFLE, _VALIDATION, _RANDOM, _TEST = 0, 1, 2, 3

# DrawText-style frequency buckets by Zipf frequency (log10 per 1e9 words).
FREQUENT, COMMON, RARE, UNSEEN = "frequent", "common", "rare", "unseen"
BUCKETS = (FREQUENT, COMMON, RARE, UNSEEN)


@dataclasses.dataclass(frozen=True)
class WordSplitConfig:
  """How the word lists are drawn.

  Attributes:
    seed: seeds the shuffle, the validation draw and the random strings.
    vocabulary_size: how many of wordfreq's top English words to consider.
    min_length: shortest word (characters), inclusive.
    max_length: longest word (characters), inclusive.
    num_validation: number of validation words (real + random).
    random_fraction: fraction of random letter strings in each split.
    train_random_fraction: the train split's fraction instead, when not None; the
      validation words stay those of `random_fraction`, so arms that train on
      different mixes are scored on the same held-out words.
    train_only: words never drawn for validation (nor test) because caption
      templates contain them, so every training caption would show them.
    num_test: number of test words (real + random, `random_fraction` of them random),
      taken out of what would be the train list after the validation draw, so that
      train and validation of num_test=0 are untouched and validation is the same
      words for every num_test. Test words are never used for a choice.
  """
  seed: int = 0
  vocabulary_size: int = 30000
  min_length: int = 3
  max_length: int = 8
  num_validation: int = 300
  random_fraction: float = 0.2
  train_random_fraction: float | None = None
  train_only: tuple[str, ...] = ("sign", "that", "says")
  num_test: int = 0


@functools.lru_cache(maxsize=None)
def real_words(vocabulary_size: int, min_length: int, max_length: int) -> tuple[str, ...]:
  """ASCII lowercase alphabetic words in frequency-rank order (most frequent first)."""
  words, seen = [], set()
  for w in wordfreq.top_n_list(_LANG, vocabulary_size):
    if (w.isascii() and w.isalpha() and w.islower()
        and min_length <= len(w) <= max_length and w not in seen):
      seen.add(w)
      words.append(w)
  return tuple(words)


@functools.lru_cache(maxsize=None)
def zipf_frequency(word: str) -> float:
  return wordfreq.zipf_frequency(word.lower(), _LANG)


def frequency_bucket(word: str) -> str:
  """'frequent' (zipf >= 4), 'common' [3, 4), 'rare' (0, 3) or 'unseen' (0, e.g. random strings)."""
  z = zipf_frequency(word)
  if z >= 4.0:
    return FREQUENT
  if z >= 3.0:
    return COMMON
  if z > 0.0:
    return RARE
  return UNSEEN


def _random_strings(rng: np.random.Generator, n: int, config: WordSplitConfig,
                    taken: set[str]) -> list[str]:
  """`n` distinct letter strings that are not real words (zipf == 0) nor in `taken`."""
  out = []
  while len(out) < n:
    length = int(rng.integers(config.min_length, config.max_length + 1))
    s = "".join(rng.choice(_LETTERS, size=length))
    # zipf == 0 keeps them out of every real-word list and in the 'unseen' bucket.
    if s not in taken and zipf_frequency(s) == 0.0:
      taken.add(s)
      out.append(s)
  return out


@functools.lru_cache(maxsize=None)
def _word_splits(config: WordSplitConfig
                 ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  if not 0.0 <= config.random_fraction < 1.0:
    raise ValueError(f"random_fraction must be in [0, 1), got {config.random_fraction}.")
  train_fraction = (config.random_fraction if config.train_random_fraction is None
                    else config.train_random_fraction)
  if not 0.0 <= train_fraction < 1.0:
    raise ValueError(f"train_random_fraction must be in [0, 1), got {train_fraction}.")
  words = real_words(config.vocabulary_size, config.min_length, config.max_length)
  num_random_val = int(round(config.num_validation * config.random_fraction))
  num_real_val = config.num_validation - num_random_val
  if num_real_val >= len(words) // 2:
    raise ValueError(f"num_validation={config.num_validation} is too large for "
                     f"{len(words)} candidate words.")

  # Validation: one word per contiguous frequency-rank stratum, so validation
  # spans frequent to rare words like the vocabulary does.
  val_rng = np.random.default_rng([config.seed, _VALIDATION])
  edges = np.linspace(0, len(words), num_real_val + 1).astype(int)
  train_only = {w.lower() for w in config.train_only}
  val_idx = set()
  for lo, hi in zip(edges[:-1], edges[1:]):
    candidates = [i for i in range(lo, hi) if words[i] not in train_only]
    val_idx.add(candidates[int(val_rng.integers(len(candidates)))])
  val_real = [words[i] for i in sorted(val_idx)]
  train_real = [w for i, w in enumerate(words) if i not in val_idx]

  # Random strings: train gets the same fraction of its (larger) list.
  num_random_train = int(round(len(train_real) * train_fraction / (1.0 - train_fraction)))
  rand_rng = np.random.default_rng([config.seed, _RANDOM])
  taken = set(words)
  val_random = _random_strings(rand_rng, num_random_val, config, taken)
  train_random = _random_strings(rand_rng, num_random_train, config, taken)

  shuffle_rng = np.random.default_rng([config.seed, _SHUFFLE])
  train = train_real + train_random
  validation = val_real + val_random
  train = [train[i] for i in shuffle_rng.permutation(len(train))]
  if train_fraction != config.random_fraction:
    # Validation is ordered after the default mix's train permutation, whatever the
    # training mix, so that every mix is scored on the same held-out prompts in one order.
    shuffle_rng = np.random.default_rng([config.seed, _SHUFFLE])
    shuffle_rng.permutation(len(train_real) + int(round(
        len(train_real) * config.random_fraction / (1.0 - config.random_fraction))))
  validation = [validation[i] for i in shuffle_rng.permutation(len(validation))]

  overlap = {w.lower() for w in train} & {w.lower() for w in validation}
  if overlap:  # Guaranteed by construction; checked because evaluation relies on it.
    raise RuntimeError(f"train/validation overlap: {sorted(overlap)[:10]}")
  test = []
  if config.num_test:
    train, test = _test_split(config, train, train_real, train_random)
  overlap = {w.lower() for w in test} & ({w.lower() for w in train} |
                                         {w.lower() for w in validation})
  if overlap:
    raise RuntimeError(f"test overlaps train or validation: {sorted(overlap)[:10]}")
  return tuple(train), tuple(validation), tuple(test)


def _test_split(config: WordSplitConfig, train: list[str], train_real: list[str],
                train_random: list[str]) -> tuple[list[str], list[str]]:
  """(train without the test words, test words): real words one per frequency-rank
  stratum of the train real words (none of `train_only`), random strings drawn from the
  train ones, in the validation draw's proportions; train keeps its order."""
  num_random = int(round(config.num_test * config.random_fraction))
  num_real = config.num_test - num_random
  if num_real >= len(train_real) // 2 or num_random > len(train_random) // 2:
    raise ValueError(f"num_test={config.num_test} is too large for {len(train_real)} "
                     f"train words.")
  rng = np.random.default_rng([config.seed, _TEST])
  train_only = {w.lower() for w in config.train_only}
  edges = np.linspace(0, len(train_real), num_real + 1).astype(int)
  picked = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    candidates = [i for i in range(lo, hi) if train_real[i] not in train_only]
    picked.append(train_real[candidates[int(rng.integers(len(candidates)))]])
  picked += [train_random[i] for i in sorted(
      rng.choice(len(train_random), size=num_random, replace=False))]
  test = [picked[i] for i in rng.permutation(len(picked))]
  held = set(test)
  return [w for w in train if w not in held], test


def word_splits(config: WordSplitConfig = WordSplitConfig()) -> dict[str, list[str]]:
  """Returns {'train': [...], 'validation': [...]} and, with `config.num_test`, 'test':
  lowercase, disjoint, shuffled per seed."""
  train, validation, test = _word_splits(config)
  out = {"train": list(train), "validation": list(validation)}
  if config.num_test:
    out["test"] = list(test)
  return out
