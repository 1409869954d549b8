"""Quality filters for web image-text examples: SeqIO preprocessors that count what they drop.

Each filter maps a tf.data dataset of the common web schema (`caption`, `width`,
`height`, `similarity`, `pwatermark`, `punsafe`, ...) to the examples that pass, and
files every example it sees under one outcome: 'kept', or the first rule it fails.
Outcomes are counted in int64 tf.Variables updated inside the filter predicate (tf.data
evaluates predicates one element at a time), so the counts are exact for every element
the pipeline has pulled through the filter. Read them from `COUNTS` (the default) or a
`FilterCounts` passed as `counts=`. Parameters bind with functools.partial:

  preprocessors=[functools.partial(filters.caption_length, min_bytes=8),
                 functools.partial(filters.image_size, min_side=256), ...]

Rules use TF string ops (RE2 regular expressions), except `language_confidence`, which
runs langid in a tf.py_function.
"""
from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

from charred.datasets import languages

KEPT = "kept"


class FilterCounts:
  """Outcome counters of named filters, as tf.Variables that dataset functions update."""

  def __init__(self):
    self._counters: dict[str, tuple[tuple[str, ...], tf.Variable]] = {}

  def counter(self, name: str, outcomes: Sequence[str]) -> tf.Variable:
    """The int64 [len(outcomes)] counter of filter `name`, created on first use."""
    outcomes = tuple(outcomes)
    if name in self._counters:
      known, variable = self._counters[name]
      if known != outcomes:
        raise ValueError(f"Filter {name!r} already counts outcomes {known}, not {outcomes}.")
      return variable
    with tf.init_scope(), tf.device("/CPU:0"):  # Eager, even if built inside a tf.function.
      variable = tf.Variable(tf.zeros([len(outcomes)], tf.int64), trainable=False)
    self._counters[name] = (outcomes, variable)
    return variable

  def as_dict(self) -> dict[str, dict[str, int]]:
    """{filter name: {outcome: count}}, 'kept' first."""
    return {name: dict(zip(outcomes, variable.numpy().tolist()))
            for name, (outcomes, variable) in self._counters.items()}

  def flat(self, prefix: str = "filters") -> dict[str, int]:
    """{'<prefix>/<filter>/<outcome>': count}, for a metric writer."""
    return {f"{prefix}/{name}/{outcome}": n
            for name, per_outcome in self.as_dict().items() for outcome, n in per_outcome.items()}

  def dropped(self, name: str) -> int:
    return sum(n for outcome, n in self.as_dict()[name].items() if outcome != KEPT)

  def reset(self) -> None:
    for _, variable in self._counters.values():
      variable.assign(tf.zeros_like(variable))

  def __str__(self) -> str:
    return "\n".join(f"{name}: " + ", ".join(f"{o} {n}" for o, n in per_outcome.items())
                     for name, per_outcome in self.as_dict().items())


COUNTS = FilterCounts()


def counting_filter(ds: tf.data.Dataset, name: str, outcomes: Sequence[str],
                    outcome_fn: Callable[[dict[str, tf.Tensor]], tf.Tensor],
                    counts: FilterCounts | None = None,
                    num_passing: int = 1) -> tf.data.Dataset:
  """Keeps the examples whose outcome (an int32 index into `outcomes`, computed by
  `outcome_fn`) is one of the first `num_passing`, counting every outcome."""
  counter = (counts or COUNTS).counter(name, outcomes)
  depth = len(outcomes)

  def keep(ex):
    outcome = outcome_fn(ex)
    update = counter.assign_add(tf.one_hot(outcome, depth, dtype=tf.int64))
    with tf.control_dependencies([update]):
      return outcome < num_passing

  return ds.filter(keep)


def first_failure(failures: Sequence[tf.Tensor]) -> tf.Tensor:
  """1 + the index of the first true condition of `failures`, 0 if none is true."""
  outcome = tf.constant(0, tf.int32)
  for i in reversed(range(len(failures))):
    outcome = tf.where(failures[i], tf.constant(i + 1, tf.int32), outcome)
  return outcome


_FALSE = tf.constant(False)


def _words(caption: tf.Tensor) -> tf.Tensor:
  """Lower-cased words without punctuation or symbols (Unicode-aware)."""
  text = tf.strings.lower(caption, encoding="utf-8")
  return tf.strings.split(tf.strings.regex_replace(text, r"[\pP\pS]+", " "))


# --- captions ------------------------------------------------------------------------------


def valid_caption(ds: tf.data.Dataset, counts: FilterCounts | None = None,
                  name: str = "valid_caption", caption_key: str = "caption") -> tf.data.Dataset:
  """Drops captions that are not valid UTF-8 ('invalid_utf8') or are blank ('empty')."""

  def outcome(ex):
    caption = ex[caption_key]
    repaired = tf.strings.unicode_transcode(caption, "UTF-8", "UTF-8", errors="replace")
    return first_failure([tf.not_equal(repaired, caption),
                          tf.equal(tf.strings.length(tf.strings.strip(caption)), 0)])

  return counting_filter(ds, name, (KEPT, "invalid_utf8", "empty"), outcome, counts)


def caption_length(ds: tf.data.Dataset, min_bytes: int | None = 5,
                   max_bytes: int | None = None, min_words: int | None = None,
                   max_words: int | None = None, counts: FilterCounts | None = None,
                   name: str = "caption_length",
                   caption_key: str = "caption") -> tf.data.Dataset:
  """Drops captions with fewer/more UTF-8 bytes or whitespace-separated words than allowed
  ('too_short' / 'too_long'; surrounding whitespace does not count)."""

  def outcome(ex):
    caption = tf.strings.strip(ex[caption_key])
    num_bytes = tf.strings.length(caption)
    num_words = tf.size(tf.strings.split(caption))
    short, long = [_FALSE], [_FALSE]
    if min_bytes is not None:
      short.append(num_bytes < min_bytes)
    if min_words is not None:
      short.append(num_words < min_words)
    if max_bytes is not None:
      long.append(num_bytes > max_bytes)
    if max_words is not None:
      long.append(num_words > max_words)
    return first_failure([tf.reduce_any(short), tf.reduce_any(long)])

  return counting_filter(ds, name, (KEPT, "too_short", "too_long"), outcome, counts)


def _repeated_fraction(items: tf.Tensor) -> tf.Tensor:
  """1 - unique / total (0 for no items)."""
  total = tf.size(items)
  unique = tf.size(tf.unique(items).y)
  return tf.where(total > 0, 1.0 - tf.cast(unique, tf.float32) / tf.cast(
      tf.maximum(total, 1), tf.float32), 0.0)


def repetition(ds: tf.data.Dataset, max_repeated_word_fraction: float = 0.5,
               max_repeated_ngram_fraction: float = 0.3, ngram: int = 3,
               min_words: int = 4, counts: FilterCounts | None = None,
               name: str = "repetition", caption_key: str = "caption") -> tf.data.Dataset:
  """Drops captions whose words or word n-grams repeat: 'repeated_words' when more than
  `max_repeated_word_fraction` of the words are repeats of earlier ones (1 - unique /
  total, case and punctuation ignored), 'repeated_ngrams' likewise for `ngram`-grams.
  Captions of fewer than `min_words` words pass."""

  def outcome(ex):
    words = _words(ex[caption_key])
    enough = tf.size(words) >= min_words
    grams = tf.strings.ngrams(words, ngram, separator=" ")
    return first_failure([
        enough & (_repeated_fraction(words) > max_repeated_word_fraction),
        enough & (_repeated_fraction(grams) > max_repeated_ngram_fraction)])

  return counting_filter(ds, name, (KEPT, "repeated_words", "repeated_ngrams"), outcome,
                         counts)


# Matched anywhere in the lower-cased caption (RE2 syntax; \b is an ASCII word boundary).
BOILERPLATE_PATTERNS = (
    r"\bclick (here|to)\b",
    r"\bstock (photos?|images?|pictures?|footage|illustrations?|vectors?)\b",
    r"\bimage may contain\b",
    r"^\s*untitled\b",
    r"\bno (image |photo )?description\b",
    r"\b(image|photo|picture|preview) (is )?(not |un)available\b",
    r"\broyalty[- ]free\b",
    r"\b(shutterstock|alamy|dreamstime|depositphotos|istockphoto|123rf|getty ?images)\b",
    r"\b(placeholder|default) image\b",
    r"\bsee (more|details|full size)\b",
)


def boilerplate(ds: tf.data.Dataset, patterns: Sequence[str] = BOILERPLATE_PATTERNS,
                counts: FilterCounts | None = None, name: str = "boilerplate",
                caption_key: str = "caption") -> tf.data.Dataset:
  """Drops captions containing a junk pattern ('boilerplate'): stock-photo credits,
  'click here', 'image may contain', 'untitled', 'no description', ..."""
  pattern = "(?s).*(?:" + "|".join(f"(?:{p})" for p in patterns) + ").*"

  def outcome(ex):
    text = tf.strings.lower(ex[caption_key], encoding="utf-8")
    return first_failure([tf.strings.regex_full_match(text, pattern)])

  return counting_filter(ds, name, (KEPT, "boilerplate"), outcome, counts)


_URL = r"(?:https?://|ftp://|www\.)\S*|[\w-]+(?:\.[\w-]+)+/\S*"
_IMAGE_EXTENSIONS = "jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif|svg|psd|raw|cr2|nef|dng"
_FILENAME = "|".join([
    rf".*\.(?:{_IMAGE_EXTENSIONS})",  # anything ending in an image file extension
    # camera and app file names: IMG_1234, DSC0001, PXL_20210101_123456789, P1010001
    r"(?:img|dsc[nf]?|pict?|gopr|mvimg|pxl|vid|p|photo|image|picture|screenshot|scan"
    r"|file|capture|snapshot|wp)[\s_-]*\d[\d\s_.:-]*",
    r"[0-9a-f]{16,}",  # hashes
    r"[\d\s_.:-]+",  # numbers and dates alone
])


def url_or_filename(ds: tf.data.Dataset, counts: FilterCounts | None = None,
                    name: str = "url_or_filename",
                    caption_key: str = "caption") -> tf.data.Dataset:
  """Drops captions that are only a URL ('url') or a file name, camera name, hash or
  number ('filename'), e.g. 'https://x.org/a.jpg', 'IMG_1234.JPG', 'DSC0001', 'photo.jpeg'."""

  def outcome(ex):
    text = tf.strings.strip(tf.strings.lower(ex[caption_key], encoding="utf-8"))
    return first_failure([tf.strings.regex_full_match(text, f"(?s)(?:{_URL})"),
                          tf.strings.regex_full_match(text, f"(?s)(?:{_FILENAME})")])

  return counting_filter(ds, name, (KEPT, "url", "filename"), outcome, counts)


def language_confidence(ds: tf.data.Dataset, min_confidence: float = 0.5,
                        counts: FilterCounts | None = None, name: str = "language_confidence",
                        caption_key: str = "caption") -> tf.data.Dataset:
  """Drops captions whose langid probability (of its best language, `languages.identify`)
  is below `min_confidence` ('low_confidence'): gibberish, mixed or very short text.
  Runs langid in a tf.py_function, about 3 ms per caption on one core."""

  def confidence(caption):
    return languages.identify(caption.numpy())[1]

  def outcome(ex):
    p = tf.py_function(confidence, [ex[caption_key]], tf.float64)
    p.set_shape([])
    return first_failure([p < min_confidence])

  return counting_filter(ds, name, (KEPT, "low_confidence"), outcome, counts)


# --- images and metadata -------------------------------------------------------------------


def image_size(ds: tf.data.Dataset, min_side: int | None = None,
               min_pixels: int | None = None, max_aspect_ratio: float | None = None,
               counts: FilterCounts | None = None, name: str = "image_size",
               width_key: str = "width", height_key: str = "height") -> tf.data.Dataset:
  """Drops images by their `width`/`height`: 'zero_size' (a side <= 0), 'too_small'
  (shorter side < `min_side`), 'too_few_pixels' (w * h < `min_pixels`), 'aspect_ratio'
  (longer / shorter side > `max_aspect_ratio`)."""

  def outcome(ex):
    w = tf.cast(ex[width_key], tf.int64)
    h = tf.cast(ex[height_key], tf.int64)
    short, long = tf.minimum(w, h), tf.maximum(w, h)
    return first_failure([
        short <= 0,
        _FALSE if min_side is None else short < min_side,
        _FALSE if min_pixels is None else w * h < min_pixels,
        _FALSE if max_aspect_ratio is None else (
            tf.cast(long, tf.float64) > max_aspect_ratio * tf.cast(short, tf.float64)),
    ])

  return counting_filter(ds, name, (KEPT, "zero_size", "too_small", "too_few_pixels",
                                    "aspect_ratio"), outcome, counts)


def metadata_scores(ds: tf.data.Dataset, max_pwatermark: float | None = None,
                    max_punsafe: float | None = None, min_similarity: float | None = None,
                    counts: FilterCounts | None = None,
                    name: str = "metadata_scores") -> tf.data.Dataset:
  """Drops by LAION's metadata scores: 'watermark' (pwatermark >= `max_pwatermark`),
  'unsafe' (punsafe >= `max_punsafe`), 'low_similarity' (CLIP similarity <
  `min_similarity`). Absent scores (NaN, or no such feature) pass. CHARRED kept LAION-HR
  rows with pwatermark < 0.6 and punsafe < 1.0."""

  def score(ex, key):
    return tf.cast(ex[key], tf.float32) if key in ex else tf.constant(float("nan"))

  def outcome(ex):
    # Comparisons with NaN are false, so absent scores never fail.
    return first_failure([
        _FALSE if max_pwatermark is None else score(ex, "pwatermark") >= max_pwatermark,
        _FALSE if max_punsafe is None else score(ex, "punsafe") >= max_punsafe,
        _FALSE if min_similarity is None else score(ex, "similarity") < min_similarity,
    ])

  return counting_filter(ds, name, (KEPT, "watermark", "unsafe", "low_similarity"), outcome,
                         counts)
