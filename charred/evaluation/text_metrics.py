"""Spelling metrics for OCR'd text: exact match and normalised edit distance.

Both sides are normalised with `normalize` first, which only strips what OCR
tends to add around a word (whitespace, quotes, punctuation); letter case and
everything inside the word are kept, so `exact_match` is case-sensitive and
`exact_match_ci` additionally folds case. `ned` is AnyText's "normalised edit
distance", reported as a similarity: 1 - Levenshtein(p, t) / max(|p|, |t|),
averaged over words; 1.0 is perfect and an empty prediction scores 0.
"""
from __future__ import annotations

import collections
import string
from typing import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

# Characters removed from both ends of a string; ASCII punctuation plus the
# typographic quotes and dashes OCR engines like to emit.
STRIP_CHARS = string.whitespace + string.punctuation + "\u2018\u2019\u201c\u201d\u00b4`\u2013\u2014\u00b7\u3002\uff0c\uff1a"


def normalize(text: str) -> str:
  """Strips surrounding whitespace, quotes and punctuation; nothing else.

  E.g. ' "Hello." ' -> 'Hello', but 'don't' and 'Hello World' are unchanged
  and case is kept.
  """
  return text.strip(STRIP_CHARS)


def similarity(prediction: str, target: str) -> float:
  """1 - Levenshtein distance / length of the longer string (1.0 if both empty)."""
  return Levenshtein.normalized_similarity(prediction, target)


def score(predictions: Sequence[str], targets: Sequence[str],
          buckets: Sequence[str] | None = None) -> dict[str, float]:
  """Scores OCR predictions against the rendered target strings.

  Args:
    predictions: OCR output per image.
    targets: the text each image should show (cased as intended).
    buckets: optional group name per word (e.g. a frequency bucket); adds an
      `exact_match_ci/<bucket>` entry per distinct bucket.

  Returns:
    dict with `exact_match` (case-sensitive), `exact_match_ci`
    (case-insensitive), `ned` (mean normalised edit similarity, 1.0 best;
    case-sensitive), `num_words` and, with buckets, per-bucket entries.
    Metrics are fractions in [0, 1]; NaN when there are no words.
  """
  if len(predictions) != len(targets):
    raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets.")
  if buckets is not None and len(buckets) != len(targets):
    raise ValueError(f"{len(buckets)} buckets but {len(targets)} targets.")
  preds = [normalize(p) for p in predictions]
  targs = [normalize(t) for t in targets]
  exact = np.array([p == t for p, t in zip(preds, targs)], dtype=np.float64)
  exact_ci = np.array([p.lower() == t.lower() for p, t in zip(preds, targs)],
                      dtype=np.float64)
  ned = np.array([similarity(p, t) for p, t in zip(preds, targs)], dtype=np.float64)

  def mean(x):
    return float(x.mean()) if x.size else float("nan")

  metrics = dict(exact_match=mean(exact), exact_match_ci=mean(exact_ci),
                 ned=mean(ned), num_words=len(targs))
  if buckets is not None:
    groups = collections.defaultdict(list)
    for i, bucket in enumerate(buckets):
      groups[bucket].append(i)
    for bucket, idx in sorted(groups.items()):
      metrics[f"exact_match_ci/{bucket}"] = mean(exact_ci[idx])
  return metrics
