r"""Language rebalancing on a fixture: achieved against target distribution.

  python benchmarks/language_balance.py

Registers the skewed multilingual caption fixture of tests/test_languages.py (418
captions, 72 % English, a quarter without language metadata, so langid labels them) as a
SeqIO task, counts its languages, registers the rebalanced mixture (mT5's alpha = 0.3 over
mC4's per-language sizes, restricted to the languages present), samples 6,000 examples
and prints raw and achieved proportions against the target, with total variation
distances. The last line is one JSON object with the distances.
"""

import collections
import json
import os
import sys

import seqio
import tensorflow_datasets as tfds

from charred.datasets import languages

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
import test_languages as fixture  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_SAMPLES = 6000


def main():
  fixture._register_source_task('language_balance_source')  # pylint: disable=protected-access
  source = seqio.get_mixture_or_task('language_balance_source').source.get_dataset('train')
  counts = languages.count_languages(source)
  languages.register_rebalanced_mixture('language_balance_mix', 'language_balance_source',
                                        counts)
  ds = seqio.get_mixture_or_task('language_balance_mix').get_dataset(
      {'text_tokens': 64}, split='train', seed=0,
      passthrough_features=['language']).take(NUM_SAMPLES)
  achieved = collections.Counter(ex['language'].decode() for ex in tfds.as_numpy(ds))
  present = languages.target_distribution(languages=counts)
  full = languages.target_distribution()
  raw_report = languages.language_report(counts, present)
  report = languages.language_report(achieved, present)
  print(f'Raw fixture against the target over its {len(counts)} languages:\n{raw_report}')
  print(f'Rebalanced mixture, {NUM_SAMPLES} samples:\n{report}')
  figures = {
      'benchmark': 'language_balance', 'samples': NUM_SAMPLES,
      'tv_raw_present': raw_report.total_variation,
      'tv_rebalanced_present': report.total_variation,
      'tv_raw_all_mc4': languages.language_report(counts, full).total_variation,
      'tv_rebalanced_all_mc4': languages.language_report(achieved, full).total_variation,
  }
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
