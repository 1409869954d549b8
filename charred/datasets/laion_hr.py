"""`laion_hr` TFDS builder: LAION-High-Resolution as img2dataset downloads it.

Nothing is downloaded: `manual_dir` holds img2dataset's webdataset output, as
its laion-high-resolution example writes it (`--output_format webdataset
--url_col URL --caption_col TEXT --save_additional_columns
'["similarity","hash","punsafe","pwatermark","LANGUAGE"]'`). Per shard NNNNN:

- `NNNNN.tar`: one sample per downloaded image, members `<key>.jpg` (the
  image; with `--skip_reencode` the original bytes, whatever their format),
  `<key>.txt` (the caption) and `<key>.json` (the sample's metadata row);
- `NNNNN.parquet`: one row per input row, downloaded or not: the saved
  columns, `caption`, `url`, then `key`, `status` ('success',
  'failed_to_download', 'failed_to_resize'), `error_message`, `width`,
  `height`, `original_width`, `original_height`, `exif`, `sha256`;
- `NNNNN_stats.json`: ignored.

Metadata comes from the parquet row of a sample's key, else from its `.json`
member (for shards without a parquet file). The caption is the `.txt` member,
else the metadata's `caption` (or `TEXT`). Keys are img2dataset's: the shard
id followed by the row index, unique across the shards of one output folder.

Bad samples are skipped and counted by reason in
`<data_dir>/laion_hr/<config>/<version>/skipped_train.json`: besides the
reasons of `web_images`, 'not_downloaded' (parquet rows img2dataset failed
on), 'missing_from_tar' (downloaded rows whose sample is not in the tar),
'tar_truncated' (rows lost after a tar's data ends early; every complete
sample before the damage is kept), 'duplicate_key', 'watermark' and 'unsafe'
(above the config's thresholds; unknown scores pass). A parquet file that
cannot be read, lacks `key`/`status`, or has a row with an empty or repeated
key or a non-numeric score raises ValueError naming the file and row (rows
count from 0).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterator

from absl import logging
from etils import epath
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from charred.datasets import web_images
from charred.datasets import webdataset_tar

SOURCE = "laion_hr"

NOT_DOWNLOADED = "not_downloaded"
MISSING_FROM_TAR = "missing_from_tar"
TAR_TRUNCATED = "tar_truncated"
DUPLICATE_KEY = "duplicate_key"
WATERMARK = "watermark"
UNSAFE = "unsafe"

# img2dataset's `--encode_format` choices (the member extension of the image).
IMAGE_EXTENSIONS = ("jpg", "png", "webp")
SUCCESS = "success"

# Metadata fields and the columns (parquet) or keys (json) they are read from,
# first present wins: img2dataset's names, then LAION's own.
_TEXT_COLUMNS = {
    "caption": ("caption", "TEXT"),
    "url": ("url", "URL"),
    "language": ("LANGUAGE", "language"),
    "status": ("status",),
}
_FLOAT_COLUMNS = {
    "similarity": ("similarity",),
    "pwatermark": ("pwatermark",),
    "punsafe": ("punsafe",),
    "aesthetic_score": ("aesthetic_score", "AESTHETIC_SCORE", "aesthetic"),
    # Of the image img2dataset downloaded, else LAION's WIDTH/HEIGHT.
    "original_width": ("original_width", "WIDTH"),
    "original_height": ("original_height", "HEIGHT"),
}
_REQUIRED_COLUMNS = ("key", "status")

_DESCRIPTION = """\
LAION-High-Resolution (LAION-5B images of at least 1024 px on each side) from a
local img2dataset download (webdataset tars + parquet metadata). Examples are
filtered by watermark and NSFW probability and by decoded image size.
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the metadata (https://huggingface.co/datasets/laion/laion-high-resolution)
and the images with img2dataset, e.g.
  img2dataset --url_list laion-high-resolution --input_format parquet \\
    --url_col URL --caption_col TEXT --output_format webdataset \\
    --output_folder <manual_dir> --image_size 1024 --resize_only_if_bigger=True \\
    --resize_mode keep_ratio --skip_reencode=True \\
    --save_additional_columns '["similarity","hash","punsafe","pwatermark","LANGUAGE"]'
then pass `download_config=tfds.download.DownloadConfig(manual_dir=<manual_dir>)`.
<manual_dir> must hold the NNNNN.tar and NNNNN.parquet files directly.
"""


@dataclasses.dataclass(eq=False)
class LaionHrConfig(tfds.core.BuilderConfig):
  """BuilderConfig for `LaionHr`.

  Attributes:
    max_pwatermark: drops examples whose watermark probability exceeds this.
    max_punsafe: drops examples whose NSFW probability exceeds this.
    min_side: drops examples whose decoded image has a side shorter than this
      (img2dataset's documented command resizes the short side to 1024).
  """
  max_pwatermark: float = 0.8
  max_punsafe: float = 0.5
  min_side: int = 1024


DEFAULT = LaionHrConfig(
    name="default",
    description="pwatermark <= 0.8, punsafe <= 0.5, decoded short side >= 1024.")
# For the quality-filter preprocessors downstream: only bad input is dropped.
UNFILTERED = LaionHrConfig(
    name="unfiltered", description="No score or size thresholds.",
    max_pwatermark=math.inf, max_punsafe=math.inf, min_side=0)


@dataclasses.dataclass(frozen=True)
class SampleMetadata:
  """One sample's metadata (from its parquet row or its `.json` member)."""
  status: str
  url: str
  language: str
  caption: str | None
  similarity: float = math.nan
  pwatermark: float = math.nan
  punsafe: float = math.nan
  aesthetic_score: float = math.nan
  original_width: float = math.nan
  original_height: float = math.nan


def _first_present(record: dict[str, Any], names: tuple[str, ...]) -> Any:
  for name in names:
    if name in record:
      return record[name]
  return None


def _metadata(record: dict[str, Any]) -> SampleMetadata:
  """SampleMetadata of a parquet row or json dict; ValueError names a bad column."""
  text = {f: _first_present(record, cols) for f, cols in _TEXT_COLUMNS.items()}
  floats = {}
  for field, columns in _FLOAT_COLUMNS.items():
    value = _first_present(record, columns)
    try:
      floats[field] = web_images.float_or_nan(value)
    except ValueError as e:
      raise ValueError(f"column {field}: {e}") from None
  return SampleMetadata(
      status=text["status"] or "", url=text["url"] or "", language=text["language"] or "",
      caption=text["caption"], **floats)


def _as_text(value: Any) -> Any:
  # String columns are read as binary (see _binary_strings); bad bytes
  # survive as lone surrogates for the per-field UTF-8 checks.
  return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _binary_strings(table: pa.Table) -> pa.Table:
  """`table` with string columns as binary: invalid UTF-8 must reach the per-field checks."""
  def cast(column):
    if pa.types.is_string(column.type):
      return column.cast(pa.binary())
    if pa.types.is_large_string(column.type):
      return column.cast(pa.large_binary())
    return column
  return pa.table({n: cast(c) for n, c in zip(table.column_names, table.columns)})


def _parquet_records(f, path: epath.Path) -> Iterator[tuple[int, dict[str, Any]]]:
  """(row, {column: value}) of the metadata columns of an open parquet file."""
  try:
    parquet = pq.ParquetFile(f)
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path}: not a readable parquet file ({e})") from None
  names = parquet.schema_arrow.names
  missing = [c for c in _REQUIRED_COLUMNS if c not in names]
  if missing:
    raise ValueError(f"{path}: no column {', '.join(missing)}; expected img2dataset's "
                     "output parquet (key, status, ...)")
  wanted = {"key"} | {c for cols in (*_TEXT_COLUMNS.values(), *_FLOAT_COLUMNS.values())
                      for c in cols}
  columns = [c for c in names if c in wanted]
  start = 0
  for group in range(parquet.num_row_groups):
    end = start + parquet.metadata.row_group(group).num_rows
    try:
      table = _binary_strings(parquet.read_row_group(group, columns=columns))
    except (pa.ArrowException, OSError) as e:
      raise ValueError(f"{path}: rows {start}-{end - 1}: unreadable ({e})") from None
    for row, record in enumerate(table.to_pylist(), start):
      yield row, {k: _as_text(v) for k, v in record.items()}
    start = end


def read_shard_metadata(path: str | os.PathLike[str]) -> dict[str, SampleMetadata]:
  """Metadata of img2dataset's output parquet by key; ValueError on a malformed file."""
  path = epath.Path(path)
  rows: dict[str, SampleMetadata] = {}
  with path.open("rb") as f:
    for row, record in _parquet_records(f, path):
      key = record["key"]
      if not isinstance(key, str) or not key or not web_images.is_valid_utf8(key):
        raise ValueError(f"{path}: row {row}: invalid key {key!r}")
      if key in rows:
        raise ValueError(f"{path}: row {row}: duplicate key {key!r}")
      try:
        rows[key] = _metadata(record)
      except ValueError as e:
        raise ValueError(f"{path}: row {row}: {e}") from None
  return rows


def _json_metadata(data: bytes | None) -> SampleMetadata | None:
  """Metadata from a sample's `.json` member; None if absent or unusable."""
  if data is None:
    return None
  try:
    record = json.loads(data)
    return _metadata(record) if isinstance(record, dict) else None
  except ValueError:  # Includes JSON and UTF-8 decoding errors.
    return None


def _int_or_minus_one(value: float) -> int:
  return -1 if math.isnan(value) else int(value)


class LaionHr(web_images.BeamWhenAsked, tfds.core.GeneratorBasedBuilder):
  """LAION-High-Resolution from local img2dataset webdataset shards (through Beam when a
  build is given a runner; see `web_images.BeamWhenAsked`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [DEFAULT, UNFILTERED]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=web_images.example_features(
            url=tfds.features.Text(),
            original_width=np.int32,  # -1 when unknown.
            original_height=np.int32,
        ),
        homepage="https://laion.ai/blog/laion-5b/",
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(epath.Path(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir: epath.Path):
    return self.generate("train", source_shards(manual_dir),
                         functools.partial(shard_examples, config=self.builder_config))


def source_shards(manual_dir: str | os.PathLike[str]) -> list[tuple[str | None, str | None]]:
  """(tar, parquet) paths of each img2dataset shard in `manual_dir`, None where absent."""
  manual_dir = epath.Path(manual_dir)
  names = sorted({p.name[:-len(p.suffix)] for p in manual_dir.iterdir()
                  if p.suffix in (".tar", ".parquet")})
  if not names:
    raise ValueError(f"{manual_dir}: no img2dataset shards (NNNNN.tar, NNNNN.parquet).")
  paths = [(manual_dir / f"{n}.tar", manual_dir / f"{n}.parquet") for n in names]
  return [(str(t) if t.exists() else None, str(p) if p.exists() else None) for t, p in paths]


def shard_examples(shard: tuple[str | None, str | None], counter: web_images.SkipCounter,
                   config: LaionHrConfig) -> Iterator[tuple[str, dict]]:
  """Examples of one shard; every parquet row and tar sample is counted once."""
  tar, parquet = (epath.Path(p) if p else None for p in shard)
  rows = read_shard_metadata(parquet) if parquet else {}
  seen: set[str] = set()
  interrupted = False
  if tar:
    try:
      for key, members in webdataset_tar.iter_samples(tar):
        if key in seen:
          counter.skip(DUPLICATE_KEY)
          continue
        seen.add(key)
        example, reason = _example(key, members, rows.get(key), config)
        if example is None:
          counter.skip(reason)
        else:
          counter.keep()
          yield key, example
    except webdataset_tar.TarDamaged as e:
      logging.warning("Skipping the rest of a damaged tar: %s", e)
      interrupted = True
  unseen = [m for k, m in rows.items() if k not in seen]
  counter.skip(NOT_DOWNLOADED, sum(m.status != SUCCESS for m in unseen))
  lost = sum(m.status == SUCCESS for m in unseen)
  counter.skip(TAR_TRUNCATED if interrupted else MISSING_FROM_TAR, lost)
  if interrupted and not parquet:
    counter.skip(TAR_TRUNCATED)  # Without metadata, only the sample being read is known.


def _example(key: str, members: dict[str, bytes], row: SampleMetadata | None,
             config: LaionHrConfig) -> tuple[dict | None, str | None]:
  """The feature dict of one tar sample, or (None, skip reason)."""
  meta = row if row is not None else _json_metadata(members.get("json"))
  if meta is None:
    return None, web_images.METADATA_MISSING
  caption, reason = web_images.decode_caption(
      members["txt"] if "txt" in members else meta.caption)
  if reason:
    return None, reason
  if not web_images.is_valid_utf8(meta.url):
    return None, web_images.METADATA_INVALID_UTF8
  if web_images.above(meta.pwatermark, config.max_pwatermark):
    return None, WATERMARK
  if web_images.above(meta.punsafe, config.max_punsafe):
    return None, UNSAFE
  data = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  if data is None:
    return None, web_images.IMAGE_MISSING
  image, reason = web_images.probe_image(data)
  if reason:
    return None, reason
  if min(image.width, image.height) < config.min_side:
    return None, web_images.IMAGE_TOO_SMALL
  return dict(
      image=image.data, caption=caption,
      language=web_images.normalize_language(meta.language),
      key=key, width=image.width, height=image.height, source=SOURCE,
      similarity=meta.similarity, pwatermark=meta.pwatermark, punsafe=meta.punsafe,
      aesthetic_score=meta.aesthetic_score, url=meta.url,
      original_width=_int_or_minus_one(meta.original_width),
      original_height=_int_or_minus_one(meta.original_height),
  ), None
