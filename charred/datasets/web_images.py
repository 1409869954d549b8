"""Shared pieces of the image-text builders (`laion_hr`, `wit_images`, `doc_layout`,
`scene_text`, `textcaps`, `calligraphy`).

Bad input never crashes a build: images and captions are probed here and come
back as `(value, None)` or `(None, reason)`, and the builders count every
skipped example by reason in a `SkipCounter`, written next to the prepared
data as `skipped_<split>.json`. Only the example schema needs TFDS, and it is
imported lazily, so probing also serves TF-free tools.

Every builder yields the same example schema (`example_features`): the image
(encoded bytes as delivered where TensorFlow decodes them, else re-encoded),
the caption, an ISO 639-1 language ('' when unknown), a unique key, the decoded
width and height, the source name, and float32 metadata (NaN when absent).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import math
import os
import pickle
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

from absl import logging
from etils import epath
import langcodes
import numpy as np
from PIL import Image

# Skip reasons: '<what>_<why>', one per example, the first check that fails.
CAPTION_EMPTY = "caption_empty"
CAPTION_INVALID_UTF8 = "caption_invalid_utf8"
IMAGE_MISSING = "image_missing"
IMAGE_EMPTY = "image_empty"
IMAGE_CORRUPT = "image_corrupt"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_TOO_SMALL = "image_too_small"
METADATA_INVALID_UTF8 = "metadata_invalid_utf8"
METADATA_MISSING = "metadata_missing"

# Float metadata of the common schema; NaN where a source lacks it.
FLOAT_FEATURES = ("similarity", "pwatermark", "punsafe", "aesthetic_score")

# What TensorFlow's decode_image reads as one 3-channel frame without help.
_KEEP_MODES = {"JPEG": ("RGB", "L"), "MPO": ("RGB", "L"), "PNG": ("RGB", "L", "P")}
# Lossy sources are re-encoded as JPEG (PNG would multiply their size); others as PNG.
_LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")
REENCODE_JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class ProbedImage:
  """An image that decodes: bytes to store (JPEG or PNG) and its decoded size."""
  data: bytes
  width: int
  height: int
  source_format: str  # As PIL names it ('JPEG', 'PNG', 'WEBP', ...).
  reencoded: bool


def _verify_decodes(data: bytes) -> tuple[str, str, int, int, bool]:
  """Decodes `data` fully (JPEG at 1/8 scale); returns format, mode, size, transparency."""
  with Image.open(io.BytesIO(data)) as im:
    fmt, mode, (width, height) = im.format, im.mode, im.size
    transparent = "transparency" in im.info
    if fmt in ("JPEG", "MPO"):
      # DCT scaling still entropy-decodes every block, so truncated or corrupt
      # data fails as in a full decode, at a fraction of the cost.
      im.draft(None, (max(1, width // 8), max(1, height // 8)))
    im.load()
  return fmt, mode, width, height, transparent


def _reencode(data: bytes, fmt: str) -> bytes:
  """RGB JPEG or PNG of the first frame, transparency composited over white."""
  with Image.open(io.BytesIO(data)) as im:
    im.load()
    if im.mode.startswith("I"):
      # 16-bit grayscale: PIL's convert() would clip it to 255, not rescale it.
      levels = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257
      im = Image.fromarray(np.round(levels).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
      rgba = im.convert("RGBA")
      rgb = Image.new("RGB", rgba.size, (255, 255, 255))
      rgb.paste(rgba, mask=rgba.getchannel("A"))
    else:
      rgb = im.convert("RGB")
  buf = io.BytesIO()
  if fmt in _LOSSY_FORMATS:
    rgb.save(buf, format="JPEG", quality=REENCODE_JPEG_QUALITY)
  else:
    rgb.save(buf, format="PNG")
  return buf.getvalue()


def probe_image(data: bytes | None) -> tuple[ProbedImage | None, str | None]:
  """Checks that `data` decodes; returns (image, None) or (None, skip reason).

  JPEG (RGB or grayscale) and PNG (RGB, grayscale or opaque palette) bytes are
  kept as delivered; anything else that PIL decodes (WebP, GIF, CMYK JPEG,
  16-bit or transparent PNG, ...) is re-encoded so that `tf.image.decode_image`
  yields one 3-channel frame of the same size.
  """
  if not data:
    return None, IMAGE_EMPTY
  try:
    fmt, mode, width, height, transparent = _verify_decodes(data)
    if width <= 0 or height <= 0:
      return None, IMAGE_EMPTY
    if mode in _KEEP_MODES.get(fmt, ()) and not transparent:
      return ProbedImage(data, width, height, fmt, reencoded=False), None
    return ProbedImage(_reencode(data, fmt), width, height, fmt, reencoded=True), None
  except Image.DecompressionBombError:
    return None, IMAGE_TOO_LARGE
  except Exception:  # pylint: disable=broad-except
    # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data.
    return None, IMAGE_CORRUPT


def read_image_file(path: str | os.PathLike[str]) -> tuple[bytes | None, str | None]:
  """The bytes of a local image file, or (None, IMAGE_MISSING)."""
  try:
    with open(path, "rb") as f:
      return f.read(), None
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    return None, IMAGE_MISSING


def load_image(path: str | os.PathLike[str], min_side: int = 0
               ) -> tuple[ProbedImage | None, str | None]:
  """A local image file, probed, with each side at least `min_side`; or (None, reason)."""
  data, reason = read_image_file(path)
  if reason:
    return None, reason
  image, reason = probe_image(data)
  if reason:
    return None, reason
  if min(image.width, image.height) < min_side:
    return None, IMAGE_TOO_SMALL
  return image, None


def decode_caption(raw: bytes | str | None) -> tuple[str | None, str | None]:
  """A caption from raw bytes (or a str read with errors='surrogateescape').

  Returns (caption stripped of surrounding whitespace, None) or (None, reason).
  """
  if raw is None:
    return None, CAPTION_EMPTY
  if not is_valid_utf8(raw):
    return None, CAPTION_INVALID_UTF8
  text = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).strip()
  return (text, None) if text else (None, CAPTION_EMPTY)


def is_valid_utf8(value: bytes | str) -> bool:
  """Strict UTF-8 for bytes; no lone surrogates (escaped bad bytes) for str."""
  try:
    if isinstance(value, bytes):
      value.decode("utf-8")
    else:
      value.encode("utf-8")
  except UnicodeError:
    return False
  return True


# Wikipedia editions whose code is no language tag.
_LANGUAGE_ALIASES = {"simple": "en"}


@functools.lru_cache(maxsize=4096)
def normalize_language(code: str | None) -> str:
  """ISO 639-1 code of a metadata language tag ('zh-TW' -> 'zh', 'iw' -> 'he');
  '' for missing, unknown or tags without a two-letter code ('ceb', 'nolang')."""
  if not code:
    return ""
  code = _LANGUAGE_ALIASES.get(code.strip().lower(), code.strip())
  try:
    language = langcodes.Language.get(langcodes.standardize_tag(code)).language
  except (ValueError, LookupError):
    return ""
  return language if language and len(language) == 2 else ""


def float_or_nan(value: Any) -> float:
  """A float metadata value; None and '' become NaN. Raises ValueError otherwise."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return math.nan
  if isinstance(value, bool):
    raise ValueError(f"{value!r} is not a number")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{value!r} is not a number") from None


def above(value: float, limit: float) -> bool:
  """Whether metadata `value` exceeds `limit`; unknown (NaN) values never do.

  Compared in float32, the precision of the scores (LAION's parquet columns and
  the stored features): a pwatermark of float32(0.8) is not above 0.8.
  """
  return not math.isnan(value) and np.float32(value) > np.float32(limit)


class SkipCounter:
  """Counts kept examples and skipped ones by reason, for one split."""

  def __init__(self):
    self.kept = 0
    self.skipped: collections.Counter[str] = collections.Counter()

  def keep(self) -> None:
    self.kept += 1

  def skip(self, reason: str, count: int = 1) -> None:
    if count:
      self.skipped[reason] += count

  @property
  def total_skipped(self) -> int:
    return sum(self.skipped.values())

  def as_dict(self) -> dict[str, Any]:
    return {"kept": self.kept, "total_skipped": self.total_skipped,
            "skipped": dict(sorted(self.skipped.items()))}

  def summary(self, dataset: str, split: str) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
    return (f"{dataset} {split}: kept {self.kept}, skipped {self.total_skipped}"
            + (f" ({reasons})" if reasons else ""))


def merge_counters(counters) -> SkipCounter:
  """One SkipCounter summing several (Beam workers each count their own source shards)."""
  total = SkipCounter()
  for c in counters:
    total.kept += c.kept
    total.skipped.update(c.skipped)
  return total


def skip_report_path(data_dir: str | os.PathLike[str], split: str) -> epath.Path:
  """`<data_dir>/skipped_<split>.json`, data_dir being a builder's version dir."""
  return epath.Path(data_dir) / f"skipped_{split}.json"


def write_skip_report(data_dir: str | os.PathLike[str], dataset: str, split: str,
                      counter: SkipCounter) -> None:
  """Logs a one-line summary and writes the counts next to the prepared data."""
  logging.info(counter.summary(dataset, split))
  report = {"dataset": dataset, "split": split, **counter.as_dict()}
  skip_report_path(data_dir, split).write_text(json.dumps(report, indent=2))


def read_skip_report(data_dir: str | os.PathLike[str], split: str) -> dict[str, Any]:
  """The counts `write_skip_report` wrote for `split` (pass `builder.data_dir`)."""
  return json.loads(skip_report_path(data_dir, split).read_text())


def example_features(**extra):
  """The common example schema plus builder-specific `extra` features."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.features.FeaturesDict({
      # No encoding_format: the bytes are stored as given (JPEG or PNG).
      "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      "caption": tfds.features.Text(),
      "language": tfds.features.Text(),
      "key": tfds.features.Text(),
      "width": np.int32,
      "height": np.int32,
      "source": tfds.features.Text(),
      **{name: np.float32 for name in FLOAT_FEATURES},
      **extra,
  })


# Generation, in one process or through Beam.

# One source shard's examples, counting what it skips: `(shard, counter) -> (key, example)s`.
# A module-level function (or a partial of one), so that Beam can pickle it.
ShardExamples = Callable[[Any, SkipCounter], Iterator[tuple[str, dict[str, Any]]]]
# One record's example: `(key, record) -> (example, None)` or `(None, skip reason)`.
RecordExample = Callable[[str, Any], tuple[dict[str, Any] | None, str | None]]
_SKIPS = "skips"
# Records per shard of builders whose driver parses one annotation file for all images:
# enough to amortise a Beam element, few enough to spread a split over the workers.
RECORDS_PER_CHUNK = 256


def chunked(records: Sequence[Any], size: int = RECORDS_PER_CHUNK) -> list[list[Any]]:
  """`records` cut into lists of at most `size`, in order: picklable source shards."""
  return [list(records[i:i + size]) for i in range(0, len(records), size)]


def record_examples(chunk: Iterable[tuple[str, Any]], counter: SkipCounter,
                    example: RecordExample) -> Iterator[tuple[str, dict[str, Any]]]:
  """A `ShardExamples` over a chunk of (key, record) pairs (with `example` bound by a
  partial), keeping or skipping each record as `example` says; also a builder's loop over
  the records of one source file."""
  for key, record in chunk:
    out, reason = example(key, record)
    if out is None:
      counter.skip(reason)
    else:
      counter.keep()
      yield key, out


def beam_requested(download_config) -> bool:
  """Whether a build was given a Beam runner or pipeline options (`tfds build
  --beam_pipeline_options=...`, `prepare --runner=...`); without, builds stay in-process."""
  return download_config is not None and (download_config.beam_runner is not None
                                          or download_config.beam_options is not None)


def _beam_shard(pickled: bytes, shard_examples: ShardExamples):
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  counter = SkipCounter()
  yield from shard_examples(pickle.loads(pickled), counter)
  yield beam.pvalue.TaggedOutput(_SKIPS, counter)


def generate_beam(shards: Sequence[Any], shard_examples: ShardExamples, data_dir: str,
                  dataset: str, split: str, skipped: SkipCounter | None = None):
  """A `beam.PTransform` generating the examples of `shards` on Beam workers, one source
  shard per element, and writing the merged skip report (plus `skipped`, what the driver
  dropped while parsing) once all are read."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  beam = tfds.core.lazy_imports.apache_beam
  driver = skipped or SkipCounter()

  @beam.ptransform_fn
  def Generate(pipeline):  # pylint: disable=invalid-name
    # Shards travel pickled: Beam's coder encodes str as strict UTF-8, and parsed records
    # keep invalid UTF-8 as lone surrogates, to be skipped by reason where they are read.
    out = (pipeline | "Shards" >> beam.Create([pickle.dumps(s) for s in shards])
           | "Examples" >> beam.FlatMap(_beam_shard, shard_examples).with_outputs(
               _SKIPS, main="examples"))
    _ = (out[_SKIPS] | "MergeSkips" >> beam.CombineGlobally(merge_counters)
         | "SkipReport" >> beam.Map(lambda c: write_skip_report(
             data_dir, dataset, split, merge_counters([driver, c]))))
    return out.examples

  return Generate()  # pylint: disable=no-value-for-parameter


def generate_local(shards: Sequence[Any], shard_examples: ShardExamples, data_dir: str,
                   dataset: str, split: str, skipped: SkipCounter | None = None
                   ) -> Iterator[tuple[str, dict[str, Any]]]:
  """The same examples as `generate_beam`, in this process."""
  counter = merge_counters([skipped] if skipped else [])
  for shard in shards:
    yield from shard_examples(shard, counter)
  write_skip_report(data_dir, dataset, split, counter)


class ModuleFile:
  """A builder's `code_path`: the file of the module defining it. TFDS 4.9.10's default
  touches the `importlib_resources` backport, which it only requires on Python < 3.9
  (ModuleNotFoundError on 3.11 without it); the path is all TFDS needs (to look for a
  checksums file next to it; there is none as nothing is downloaded)."""

  def __get__(self, obj, cls=None) -> epath.Path:
    return epath.Path(sys.modules[(cls or type(obj)).__module__].__file__)


class BeamWhenAsked:
  """A GeneratorBasedBuilder mixin: `generate` goes through Beam when the build was given
  a runner or pipeline options and Beam is installed, else runs in this process (small
  data, CI). Both paths share the builder's per-shard function, so the examples and skip
  counts are the same."""

  code_path = ModuleFile()

  def _download_and_prepare(self, dl_manager, download_config=None):  # pylint: disable=arguments-differ
    self._use_beam = beam_requested(download_config)
    return super()._download_and_prepare(dl_manager, download_config)  # pytype: disable=attribute-error

  def generate(self, split: str, shards: Sequence[Any], shard_examples: ShardExamples,
               skipped: SkipCounter | None = None):
    """`skipped`: what the driver already dropped (e.g. while parsing an annotation file),
    added to the split's skip report."""
    make = generate_beam if getattr(self, "_use_beam", False) else generate_local
    return make(shards, shard_examples, str(self.data_dir),
                f"{self.name}/{self.builder_config.name}", split, skipped)

  def generate_records(self, split: str, records: Sequence[tuple[str, Any]],
                       example: RecordExample, skipped: SkipCounter | None = None):
    """`generate` over the (key, record) pairs the driver parsed from an annotation file,
    in chunks: `example` (picklable) makes each record's example where the chunk runs."""
    return self.generate(split, chunked(records),
                         functools.partial(record_examples, example=example), skipped)
