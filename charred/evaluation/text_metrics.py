"""Spelling metrics for OCR'd text: exact match, edit distances, per-character accuracy.

Both sides are normalised with `normalize` first, which only strips what OCR
tends to add around a word (whitespace, quotes, punctuation); letter case and
everything inside the word are kept. Every metric has a case-sensitive form; the
`_ci` forms compare `str.lower()` of both sides instead. For words i with
normalised prediction p_i and target t_i, and d = Levenshtein distance (unit-cost
insertions, deletions and substitutions):

* `exact_match`: mean over words of [p_i == t_i].
* `ned`: AnyText's "normalised edit distance", reported as a similarity:
  mean over words of 1 - d(p_i, t_i) / max(|p_i|, |t_i|) (1.0 if both are
  empty); 1.0 is perfect and an empty prediction scores 0.
* `char_accuracy`: sum_i m(p_i, t_i) / sum_i |t_i|, a micro average over all
  target characters, where m is the number of target characters that an optimal
  (minimum-distance) alignment pairs with an identical predicted character (its
  "equal" runs; see `matched_chars`). In [0, 1]; an empty prediction scores 0.
* `cer`: character error rate, sum_i d(p_i, t_i) / sum_i |t_i| (micro average).
  0 is perfect, an empty prediction scores 1 and extra characters can push it
  above 1.

Word means are NaN without words; the character ratios are NaN when the targets
hold no characters. `score` also reports them per target length (`<metric>/len_<n>`,
n = |t_i| after normalisation) and per caller-given bucket (`<metric>/<bucket>`).
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

# Characters removed from both ends of a string; ASCII punctuation plus the
# typographic quotes and dashes OCR engines like to emit.
STRIP_CHARS = string.whitespace + string.punctuation + "\u2018\u2019\u201c\u201d\u00b4`\u2013\u2014\u00b7\u3002\uff0c\uff1a"

# Reported per target length (`<key>/len_<n>`) and per bucket (`<key>/<bucket>`).
LENGTH_KEYS = ("exact_match", "exact_match_ci", "char_accuracy", "cer")
BUCKET_KEYS = ("exact_match", "exact_match_ci", "char_accuracy", "ned")
_LENGTH_GROUP = re.compile(r"len_\d+")


def normalize(text: str) -> str:
  """Strips surrounding whitespace, quotes and punctuation; nothing else.

  E.g. ' "Hello." ' -> 'Hello', but 'don't' and 'Hello World' are unchanged
  and case is kept.
  """
  return text.strip(STRIP_CHARS)


def similarity(prediction: str, target: str) -> float:
  """1 - Levenshtein distance / length of the longer string (1.0 if both empty)."""
  return Levenshtein.normalized_similarity(prediction, target)


def matched_chars(prediction: str, target: str) -> int:
  """Characters of `target` aligned to an identical character of `prediction`.

  The alignment is rapidfuzz's minimum-edit-distance one (`Levenshtein.opcodes`),
  and this counts its "equal" runs. Optimal alignments are not unique and may differ
  in matches: for target 'ab' and prediction 'ba' (distance 2), two substitutions
  match nothing, while delete-a, match-b, insert-a matches one (rapidfuzz 3.14 picks
  the latter). Without such ties (e.g. a single edit) the count is
  determined: len(target) - 1 after a substitution or deletion, len(target) after an
  insertion.
  """
  return sum(op.src_end - op.src_start
             for op in Levenshtein.opcodes(target, prediction) if op.tag == "equal")


def _mean(x: np.ndarray) -> float:
  return float(x.mean()) if x.size else float("nan")


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
  total = int(denominator.sum())
  return float(numerator.sum()) / total if total else float("nan")


def _per_word(preds: list[str], targs: list[str]) -> dict[str, np.ndarray]:
  """Per-word counts the metrics aggregate, case-sensitive and case-folded (`_ci`)."""
  def counts(ps, ts, suffix):
    return {f"exact{suffix}": np.array([p == t for p, t in zip(ps, ts)], np.float64),
            f"matched{suffix}": np.array([matched_chars(p, t) for p, t in zip(ps, ts)], np.int64),
            f"distance{suffix}": np.array([Levenshtein.distance(p, t) for p, t in zip(ps, ts)],
                                          np.int64),
            # lower() may change the length (e.g. 'İ'), so each form has its own.
            f"length{suffix}": np.array([len(t) for t in ts], np.int64)}
  out = counts(preds, targs, "")
  out.update(counts([p.lower() for p in preds], [t.lower() for t in targs], "_ci"))
  out["ned"] = np.array([similarity(p, t) for p, t in zip(preds, targs)], np.float64)
  return out


def _summarize(w: dict[str, np.ndarray], idx) -> dict[str, float]:
  """The metrics of the words `idx` (an index array or slice into `w`'s arrays)."""
  metrics = dict(exact_match=_mean(w["exact"][idx]), exact_match_ci=_mean(w["exact_ci"][idx]),
                 ned=_mean(w["ned"][idx]))
  for suffix in ("", "_ci"):
    length = w[f"length{suffix}"][idx]
    metrics[f"char_accuracy{suffix}"] = _ratio(w[f"matched{suffix}"][idx], length)
    metrics[f"cer{suffix}"] = _ratio(w[f"distance{suffix}"][idx], length)
  return metrics


def _groups(keys) -> dict:
  """Word indices per distinct key, in sorted key order."""
  groups = collections.defaultdict(list)
  for i, key in enumerate(keys):
    groups[key].append(i)
  return {key: np.array(idx) for key, idx in sorted(groups.items())}


def score(predictions: Sequence[str], targets: Sequence[str],
          buckets: Sequence[str] | None = None) -> dict[str, float]:
  """Scores OCR predictions against the rendered target strings.

  Args:
    predictions: OCR output per image.
    targets: the text each image should show (cased as intended).
    buckets: optional group name per word (e.g. a frequency bucket); adds
      `<metric>/<bucket>` entries for each metric in BUCKET_KEYS and each
      distinct bucket. Names of the form `len_<n>` are taken by the per-length
      entries and rejected.

  Returns:
    dict with `exact_match`, `exact_match_ci`, `ned`, `char_accuracy`,
    `char_accuracy_ci`, `cer`, `cer_ci` (see the module docstring) and
    `num_words`; for every distinct normalised target length n,
    `<metric>/len_<n>` for each metric in LENGTH_KEYS and `num_words/len_<n>`;
    with buckets, the per-bucket entries.
  """
  if len(predictions) != len(targets):
    raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets.")
  if buckets is not None:
    if len(buckets) != len(targets):
      raise ValueError(f"{len(buckets)} buckets but {len(targets)} targets.")
    clashing = sorted({b for b in buckets if _LENGTH_GROUP.fullmatch(str(b))})
    if clashing:
      raise ValueError(f"Bucket names {clashing} clash with the per-length keys "
                       "`<metric>/len_<n>`; rename them.")
  preds = [normalize(p) for p in predictions]
  targs = [normalize(t) for t in targets]
  w = _per_word(preds, targs)
  metrics = _summarize(w, slice(None))
  metrics["num_words"] = len(targs)
  for n, idx in _groups(w["length"]).items():
    group = _summarize(w, idx)
    metrics.update({f"{k}/len_{n}": group[k] for k in LENGTH_KEYS})
    metrics[f"num_words/len_{n}"] = len(idx)
  if buckets is not None:
    for bucket, idx in _groups(buckets).items():
      group = _summarize(w, idx)
      metrics.update({f"{k}/{bucket}": group[k] for k in BUCKET_KEYS})
  return metrics
