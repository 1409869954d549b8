"""Caption languages: offline identification and rebalancing toward mT5's distribution.

ByT5 and mT5 were pretrained on mC4 with languages sampled as p_l ~ n_l^alpha, alpha = 0.3
(Xue et al. 2021, arXiv:2010.11934, section 2): a ByT5-conditioned model has seen every
language, and a caption set is rebalanced here toward that same distribution.

`identify`, `target_distribution`, `sampling_rates` and `language_report` are TF-free;
the tf.data and SeqIO parts import TensorFlow when called.

Language codes are canonicalised to ISO 639-1 where one exists (`canonical_language`):
'iw' (mC4/CLD3's Hebrew) is 'he', langid's 'tl' is 'fil', 'nb'/'nn' are 'no', and region
or script subtags are dropped ('pt-BR' -> 'pt', mC4's romanised 'ru-Latn' -> 'ru').
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Iterable, Mapping

import numpy as np

# mC4 tokens per language, in billions (SentencePiece tokens of the mT5 vocabulary), from the
# mC4 statistics table in the appendix of the mT5 paper (arXiv:2010.11934, "Tokens (B)"
# column), as transcribed in github.com/mayhewsw/multilingual-data-stats, mc4/mc4.csv.
# The 101 languages sum to 6.27 T tokens, matching the paper's "6.3T tokens"; the six
# romanised variants (ru-Latn 0.9, hi-Latn 0.6, el-Latn 0.4, ja-Latn 0.3, zh-Latn 0.2,
# bg-Latn 0.09) are left out. mT5 sampled by pages (examples), not tokens; the two columns
# differ by a factor that varies slowly with the script, which alpha = 0.3 flattens further.
MC4_TOKENS_BILLIONS: dict[str, float] = {
    "en": 2733, "ru": 713, "es": 433, "de": 347, "fr": 318, "ja": 164, "it": 162,
    "pt": 146, "pl": 130, "vi": 116, "nl": 73, "tr": 71, "id": 69, "cs": 63, "ar": 57,
    "fa": 52, "ro": 52, "sv": 45, "el": 43, "uk": 41, "zh": 39, "hu": 39, "da": 29,
    "no": 27, "ko": 26, "fi": 25, "hi": 24, "bg": 22, "sk": 18, "he": 17, "mr": 14,
    "ca": 13, "ms": 13, "th": 11, "lt": 11, "sl": 8.8, "bn": 7.3, "lv": 7, "et": 6.9,
    "mt": 5.2, "cy": 4.9, "az": 4.4, "sr": 4.3, "sq": 4, "ta": 3.4, "ne": 3.2, "kk": 3.1,
    "ml": 2.7, "is": 2.6, "ka": 2.5, "gl": 2.4, "hy": 2.4, "ur": 2.4, "fil": 2.1, "be": 2,
    "mk": 1.8, "mn": 1.8, "af": 1.7, "sd": 1.6, "eu": 1.4, "tg": 1.4, "so": 1.4, "la": 1.3,
    "te": 1.3, "kn": 1.1, "lb": 1, "ky": 1, "sw": 1, "my": 0.9, "uz": 0.9, "gu": 0.8,
    "si": 0.8, "eo": 0.7, "km": 0.6, "pa": 0.6, "ga": 0.5, "fy": 0.4, "ps": 0.4, "gd": 0.4,
    "ku": 0.4, "jv": 0.3, "am": 0.3, "yi": 0.3, "zu": 0.2, "co": 0.2, "ceb": 0.2, "mg": 0.2,
    "sn": 0.2, "hmn": 0.2, "ht": 0.2, "ha": 0.2, "su": 0.1, "ny": 0.1, "lo": 0.1, "mi": 0.1,
    "sm": 0.09, "ig": 0.09, "haw": 0.09, "st": 0.08, "xh": 0.06, "yo": 0.05,
}
MT5_ALPHA = 0.3

# Deprecated ISO 639-1 codes (still emitted by CLD3 and Java) and langid's codes whose mC4
# language has another code.
_ALIASES = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv", "tl": "fil", "nb": "no", "nn": "no"}


def canonical_language(code: str | bytes) -> str:
  """'pt-BR' -> 'pt', 'iw' -> 'he', 'tl' -> 'fil', 'NB' -> 'no'; '' stays ''."""
  if isinstance(code, bytes):
    code = code.decode("utf-8", "replace")
  code = code.strip().lower().replace("_", "-").split("-")[0]
  return _ALIASES.get(code, code)


@functools.cache
def _identifier():
  from langid import langid  # pylint: disable=g-import-not-at-top
  identifier = langid.LanguageIdentifier.from_modelstring(langid.model, norm_probs=True)
  # Only mC4 languages can be targets: a caption in a language langid knows but mC4 lacks
  # (e.g. Croatian) is attributed to the closest mC4 language rather than dropped.
  identifier.set_languages([c for c in identifier.nb_classes
                            if canonical_language(c) in MC4_TOKENS_BILLIONS])
  return identifier


def identify(text: str | bytes) -> tuple[str, float]:
  """Language of `text` by langid: (canonical code, probability in [0, 1]).

  Probabilities are langid's normalised posteriors over the mC4 languages it knows (80
  of 101), those of codes sharing a canonical code summed ('nb' + 'nn' + 'no'). Blank
  text is ('', 0.0). Short or ambiguous text gets a low probability, not an error.
  """
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  return _identify(text)


@functools.lru_cache(maxsize=1 << 16)  # Web captions repeat ('Image', product names).
def _identify(text: str) -> tuple[str, float]:
  if not text.strip():
    return "", 0.0
  probabilities = collections.defaultdict(float)
  for code, p in _identifier().rank(text):
    probabilities[canonical_language(code)] += p
  language = max(probabilities, key=probabilities.get)
  return language, float(probabilities[language])


def resolve_language(language: str | bytes, caption: str | bytes) -> str:
  """The metadata's language when it has one, else langid's guess from the caption."""
  language = canonical_language(language)
  return language if language else identify(caption)[0]


def target_distribution(alpha: float = MT5_ALPHA,
                        languages: Iterable[str] | None = None) -> dict[str, float]:
  """p_l = n_l^alpha / sum_k n_k^alpha over mC4's token counts n_l.

  `languages` restricts (and renormalises) the distribution to those languages; each
  must be one of the 101 (after `canonical_language`). Sorted by decreasing p_l.
  """
  if languages is None:
    codes = list(MC4_TOKENS_BILLIONS)
  else:
    codes = list(dict.fromkeys(canonical_language(c) for c in languages))
    unknown = [c for c in codes if c not in MC4_TOKENS_BILLIONS]
    if unknown:
      raise ValueError(f"Not mC4 languages: {unknown}; see languages.MC4_TOKENS_BILLIONS.")
  weights = np.array([MC4_TOKENS_BILLIONS[c] for c in codes], np.float64) ** alpha
  weights /= weights.sum()
  return dict(sorted(zip(codes, weights.tolist()), key=lambda kv: -kv[1]))


def sampling_rates(language_counts: Mapping[str, int], target: Mapping[str, float],
                   num_examples: int | None = None,
                   max_repeat: float | None = None) -> dict[str, float]:
  """Per-language sampling rates (summing to 1) that move `language_counts` toward `target`.

  Sampling language l with probability r_l (repeating its examples as needed) gives an
  output distribution of exactly r. Without a repeat limit, r is the target restricted to
  the languages present in the data and renormalised: a language absent from the data
  cannot be sampled, and its target mass goes to the others in proportion to their targets
  (so their ratios stay as in the target). Languages of the data that are not in the
  target (or '' for unknown) get rate 0.

  With `num_examples` (length of the planned output stream) and `max_repeat`, no
  language is read more than `max_repeat` times: r_l <= c_l = max_repeat * q_l /
  num_examples. The capped languages keep c_l and the others share the rest in
  proportion to their targets (water-filling), which is the target exactly whenever
  every language has enough data (q_l >= r_l * num_examples / max_repeat). If even all
  caps together are below 1, rates are proportional to the caps (the data's own mix).
  """
  counts = collections.Counter()
  for code, n in language_counts.items():
    counts[canonical_language(code)] += int(n)
  codes = [c for c, p in target.items() if p > 0 and counts[c] > 0]
  if not codes:
    raise ValueError(f"No language has both data and a target share: data has "
                     f"{sorted(c for c in counts if counts[c])}.")
  p = np.array([target[c] for c in codes], np.float64)
  p /= p.sum()
  if num_examples is None or max_repeat is None:
    return dict(zip(codes, p.tolist()))
  caps = max_repeat * np.array([counts[c] for c in codes], np.float64) / num_examples
  if caps.sum() <= 1.0:
    return dict(zip(codes, (caps / caps.sum()).tolist()))
  capped = np.zeros(len(codes), bool)
  while True:  # At most len(codes) rounds: each round caps one more language or stops.
    rates = np.where(capped, caps, p * (1.0 - caps[capped].sum()) / p[~capped].sum())
    over = ~capped & (rates > caps)
    if not over.any():
      return dict(zip(codes, rates.tolist()))
    capped |= over


@dataclasses.dataclass(frozen=True)
class LanguageReport:
  """Achieved vs target language proportions.

  Attributes:
    rows: (language, count, achieved proportion, target proportion), by decreasing target.
    total_variation: 0.5 * sum_l |achieved_l - target_l| over all languages of either.
  """
  rows: tuple[tuple[str, int, float, float], ...]
  total_variation: float

  def __str__(self) -> str:
    lines = [f"{'language':<9}{'count':>9}{'achieved':>10}{'target':>9}"]
    lines += [f"{code or '?':<9}{n:>9}{a:>10.4f}{t:>9.4f}" for code, n, a, t in self.rows]
    lines.append(f"total variation distance: {self.total_variation:.4f}")
    return "\n".join(lines)


def language_report(achieved_counts: Mapping[str, int],
                    target: Mapping[str, float]) -> LanguageReport:
  """Per-language achieved vs target proportions and their total variation distance."""
  counts = collections.Counter()
  for code, n in achieved_counts.items():
    counts[canonical_language(code)] += int(n)
  total = sum(counts.values())
  if total == 0:
    raise ValueError("language_report needs at least one counted example.")
  target_sum = sum(target.values())
  codes = sorted(set(counts) | set(target), key=lambda c: (-target.get(c, 0.0), -counts[c], c))
  rows = tuple((c, counts[c], counts[c] / total, target.get(c, 0.0) / target_sum)
               for c in codes)
  tv = 0.5 * sum(abs(a - t) for _, _, a, t in rows)
  return LanguageReport(rows, tv)


# --- tf.data and SeqIO -----------------------------------------------------------------


def count_languages(ds, caption_key: str = "caption",
                    language_key: str = "language") -> collections.Counter:
  """Examples per language of a tf.data dataset (metadata first, langid when empty)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = ds.map(lambda ex: {k: ex[k] for k in (caption_key, language_key) if k in ex})
  counts = collections.Counter()
  for ex in tfds.as_numpy(ds):
    counts[resolve_language(ex.get(language_key, b""), ex[caption_key])] += 1
  return counts


def annotate_language(ds, caption_key: str = "caption", language_key: str = "language"):
  """Sets `language` to its canonical code, identified by langid where it is empty.

  A preprocessor (ds -> ds). Codes are canonicalised with TF string ops; langid runs in a
  tf.py_function for unlabelled captions only (about 3 ms each on one core), so label
  large sources once, e.g. when preparing shards, rather than at every epoch.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def identify_caption(caption):
    return identify(caption.numpy())[0]

  def annotate(ex):
    ex = dict(ex)
    code = tf.strings.lower(tf.strings.strip(ex.get(language_key, tf.constant(""))))
    code = tf.strings.regex_replace(code, "[-_].*", "")
    for alias, canonical in _ALIASES.items():
      code = tf.where(tf.equal(code, alias), canonical, code)

    def from_caption():
      language = tf.py_function(identify_caption, [ex[caption_key]], tf.string)
      language.set_shape([])
      return language

    ex[language_key] = tf.cond(tf.equal(code, ""), from_caption, lambda: code)
    return ex

  return ds.map(annotate, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def filter_language(ds, language: str, caption_key: str = "caption",
                    language_key: str = "language"):
  """Keeps the examples of one language (annotated as by `annotate_language`)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  language = canonical_language(language)
  ds = annotate_language(ds, caption_key, language_key)
  return ds.filter(lambda ex: tf.equal(ex[language_key], language))


def rebalance(ds, rates: Mapping[str, float], seed: int | None = None, cache: bool = False,
              caption_key: str = "caption", language_key: str = "language"):
  """An endless tf.data stream with languages drawn at `rates` (see `sampling_rates`).

  Each language is a filtered, repeated view of `ds`, so every repeat of a language
  re-reads `ds`, unless `cache` keeps each language's examples in memory after its first
  pass (for caption sets that fit). Web-scale sources should instead be written once
  into per-language shards and mixed.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  codes = [c for c, r in rates.items() if r > 0]
  parts = []
  for code in codes:
    part = filter_language(ds, code, caption_key, language_key)
    parts.append((part.cache() if cache else part).repeat())
  return tf.data.Dataset.sample_from_datasets(parts, [rates[c] for c in codes], seed=seed)


def register_rebalanced_mixture(name: str, task_name: str,
                                language_counts: Mapping[str, int],
                                alpha: float = MT5_ALPHA,
                                languages: Iterable[str] | None = None,
                                num_examples: int | None = None,
                                max_repeat: float | None = None,
                                split: str = "train",
                                caption_key: str = "caption",
                                language_key: str = "language") -> dict[str, float]:
  """Registers seqio tasks `<name>_<lang>` and the seqio.Mixture `name` over them.

  Each task is `task_name` with its source filtered to one language (metadata, else
  langid, on the raw source examples) ahead of the task's own preprocessors; the mixture
  samples them at `sampling_rates(language_counts, target_distribution(alpha,
  languages), num_examples, max_repeat)`, which it returns. `language_counts` are the
  source's examples per language in `split` (e.g. from `count_languages`); they also
  declare each language task's size to seqio, which then caches language tasks of under
  10k examples in memory instead of re-filtering the source at every repeat.
  Every language task reads the whole source, so give it a source that does not decode
  images (e.g. source_tasks.register_source_task(..., decode_image=False)), or mix
  per-language shards at scale. Re-registering a name replaces its tasks and mixture.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  rates = sampling_rates(language_counts, target_distribution(alpha, languages),
                         num_examples, max_repeat)
  counts = collections.Counter()
  for code, n in language_counts.items():
    counts[canonical_language(code)] += int(n)
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  subtasks = []
  for code, rate in rates.items():
    subtask_name = f"{name}_{code}"

    def dataset_fn(split, shuffle_files, seed=None, code=code):
      # seqio passes `seed` on only where one is given.
      seed_arg = {} if seed is None else {"seed": seed}
      ds = task.source.get_dataset(split=split, shuffle=shuffle_files, **seed_arg)
      return filter_language(ds, code, caption_key, language_key)

    source = seqio.FunctionDataSource(dataset_fn, splits=task.source.splits,
                                      num_input_examples={split: counts[code]})
    if subtask_name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(subtask_name)
    seqio.TaskRegistry.add(subtask_name, source=source, preprocessors=task.preprocessors,
                           output_features=task.output_features,
                           postprocess_fn=task.postprocessor,
                           shuffle_buffer_size=task.shuffle_buffer_size)
    subtasks.append((subtask_name, rate))
  seqio.MixtureRegistry.add(name, subtasks)
  return rates
