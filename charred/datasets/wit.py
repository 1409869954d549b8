"""`wit_images` TFDS builder: WiT (Wikipedia-based Image Text) with local images.

(Named `wit_images` because TFDS's catalog already registers `wit`, the
metadata-only TSV rows without images.)

Nothing is downloaded: `manual_dir` holds WiT's published TSV files
(`wit_v1.train.all-00000-of-00010.tsv.gz`, ...; gzipped or not) with their
17 columns (language, page_url, image_url, ..., mime_type, original_height,
original_width, ...), tab-separated with a header row and double-quoted fields
where needed, and the images as local files:

  <manual_dir>/images/<sha1 hex of the UTF-8 image_url><ext>

where <ext> is the lowercased extension of the URL's path ('.jpg' for
'.../Foo.JPG', '' when there is none); `image_filename(image_url)` computes
it, for download scripts. Files named `*.train.*`, `*.val.*` and `*.test.*`
feed the train, validation and test splits; any other `*.tsv[.gz]` feeds train.

The caption is the reference description, else the alt text, else the
attribution description without its leading language name ('English: A
cat' -> 'A cat'); `caption_source` says which. The key is
'<TSV file name>:<row>' (rows count from 0, header excluded).

Bad rows are skipped and counted by reason (see `web_images`) in
`<data_dir>/wit_images/<config>/<version>/skipped_<split>.json`. A malformed
TSV (missing columns, a row with the wrong number of fields or a
non-numeric size, a damaged gzip stream) raises ValueError naming the file and
row.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import hashlib
import io
import posixpath
import re
from typing import Iterator
import urllib.parse
import zlib

from etils import epath
import langcodes
import numpy as np
import tensorflow_datasets as tfds

from charred.datasets import web_images

SOURCE = "wit"
IMAGES_DIR = "images"

COLUMNS = (
    "language", "page_url", "image_url", "page_title", "section_title",
    "hierarchical_section_title", "caption_reference_description",
    "caption_attribution_description", "caption_alt_text_description", "mime_type",
    "original_height", "original_width", "is_main_image", "attribution_passes_lang_id",
    "page_changed_recently", "context_page_description", "context_section_description",
)
# Caption fields in order of preference, and the name `caption_source` gives each.
CAPTION_FIELDS = (
    ("caption_reference_description", "reference"),
    ("caption_alt_text_description", "alt_text"),
    ("caption_attribution_description", "attribution"),
)
_SPLIT_OF_TAG = {"train": "train", "val": "validation", "test": "test"}

_DESCRIPTION = """\
WiT (Wikipedia-based Image Text, 37.6 M image-text rows in 108 languages) with
images from local files. Captions are reference descriptions, else alt texts,
else attribution descriptions.
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put WiT's TSV files (https://github.com/google-research-datasets/wit/blob/main/DATA.md)
in <manual_dir> and each image at <manual_dir>/images/<name>, with <name> =
charred.datasets.wit.image_filename(image_url): the SHA-1 hex digest of the URL
plus the URL's lowercased file extension. Then pass
`download_config=tfds.download.DownloadConfig(manual_dir=<manual_dir>)`.
"""


@dataclasses.dataclass(eq=False)
class WitConfig(tfds.core.BuilderConfig):
  """BuilderConfig for `WitImages`.

  Attributes:
    min_side: drops examples whose decoded image has a side shorter than this.
  """
  min_side: int = 256


DEFAULT = WitConfig(name="default", description="Decoded short side >= 256.")


def image_filename(image_url: str) -> str:
  """Local file name of `image_url` under `<manual_dir>/images/`."""
  digest = hashlib.sha1(image_url.encode("utf-8")).hexdigest()
  ext = posixpath.splitext(urllib.parse.urlsplit(image_url).path)[1].lower()
  return digest + ext


# 'English: ', 'Français : ', 'Norsk bokmål: ': up to three words and a colon.
_PREFIX = re.compile(r"^\s*([^\W\d_]+(?:[ -][^\W\d_]+){0,2})\s?:\s+", re.UNICODE)


def strip_language_prefix(text: str) -> str:
  """`text` without a leading '<language name>: ' as Commons descriptions carry."""
  match = _PREFIX.match(text)
  if not match:
    return text
  try:
    langcodes.find(match.group(1))  # Names in any language, via language_data.
  except LookupError:
    return text
  return text[match.end():]


def split_of_file(name: str) -> str:
  """The split a TSV file feeds, from WiT's naming ('wit_v1.val.all-...')."""
  for part in name.split(".")[1:]:
    if part in _SPLIT_OF_TAG:
      return _SPLIT_OF_TAG[part]
  return "train"


def _open_text(path: epath.Path):
  # Invalid UTF-8 survives as lone surrogates and is caught per field.
  raw = path.open("rb")
  if path.name.endswith(".gz"):
    raw = gzip.GzipFile(fileobj=raw)
  return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def read_tsv(path: epath.Path) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields (row, {column: value}) of a WiT TSV; ValueError on malformed input."""
  # WiT's context descriptions can exceed csv's default 128 KiB field limit.
  csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))
  row = -1
  with _open_text(path) as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
    try:
      header = next(reader, None)
      if header is None:
        raise ValueError(f"{path}: empty file, expected a header row")
      missing = [c for c in COLUMNS if c not in header]
      if missing:
        raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)}")
      for row, fields in enumerate(reader):
        if len(fields) != len(header):
          raise ValueError(f"{path}: row {row} (ending on line {reader.line_num}): expected "
                           f"{len(header)} tab-separated fields, got {len(fields)}")
        yield row, dict(zip(header, fields))
    except (OSError, EOFError, zlib.error, csv.Error) as e:
      # gzip.BadGzipFile is an OSError; EOFError is a truncated gzip stream.
      raise ValueError(f"{path}: row {row + 1}: unreadable ({type(e).__name__}: {e})") from None


def wit_caption(fields: dict[str, str]) -> tuple[str | None, str, str | None]:
  """(caption, caption_source, None) or (None, '', skip reason) of one row."""
  invalid = False
  for column, source in CAPTION_FIELDS:
    caption, reason = web_images.decode_caption(fields[column])
    if reason == web_images.CAPTION_INVALID_UTF8:
      invalid = True  # Only if no other field has a valid caption.
    if caption is None:
      continue
    if source == "attribution":
      caption = strip_language_prefix(caption).strip()
      if not caption:
        continue
    return caption, source, None
  return None, "", (web_images.CAPTION_INVALID_UTF8 if invalid else web_images.CAPTION_EMPTY)


def _size(fields: dict[str, str], column: str, path: epath.Path, row: int) -> int:
  value = fields[column].strip()
  if not value:
    return -1
  try:
    return int(float(value))
  except (ValueError, OverflowError):  # 'wide', 'nan', 'inf'.
    raise ValueError(f"{path}: row {row}: {column} {value!r} is not a number") from None


class WitImages(web_images.BeamWhenAsked, tfds.core.GeneratorBasedBuilder):
  """WiT image-text rows with their images from local files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [DEFAULT]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=web_images.example_features(
            url=tfds.features.Text(),
            original_width=np.int32,  # From the TSV; -1 when empty.
            original_height=np.int32,
            caption_source=tfds.features.Text(),  # reference / alt_text / attribution
            page_title=tfds.features.Text(),
        ),
        homepage="https://github.com/google-research-datasets/wit",
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    files: dict[str, list[epath.Path]] = {}
    for path in sorted(manual_dir.iterdir()):
      if path.name.endswith((".tsv", ".tsv.gz")):
        files.setdefault(split_of_file(path.name), []).append(path)
    if not files:
      raise ValueError(f"{manual_dir}: no WiT TSV files (*.tsv, *.tsv.gz).")
    return {split: self._generate_examples(split, paths, manual_dir / IMAGES_DIR)
            for split, paths in files.items()}

  def _generate_examples(self, split: str, paths: list[epath.Path], images_dir: epath.Path):
    return self.generate(split, [str(p) for p in paths],
                         functools.partial(tsv_examples, images_dir=str(images_dir),
                                           min_side=self.builder_config.min_side))


def tsv_examples(path: str, counter: web_images.SkipCounter, images_dir: str,
                 min_side: int) -> Iterator[tuple[str, dict]]:
  """Examples of one TSV file (a source shard), counting the rows skipped."""
  path = epath.Path(path)
  rows = ((f"{path.name}:{row}", (row, fields)) for row, fields in read_tsv(path))
  return web_images.record_examples(rows, counter, functools.partial(
      _example, path=path, images_dir=epath.Path(images_dir), min_side=min_side))


def _example(key: str, record: tuple[int, dict[str, str]], path: epath.Path,
             images_dir: epath.Path, min_side: int) -> tuple[dict | None, str | None]:
  """The feature dict of one TSV row (`record`: its number and fields), or (None, skip
  reason)."""
  row, fields = record
  width, height = (_size(fields, c, path, row) for c in ("original_width", "original_height"))
  caption, caption_source, reason = wit_caption(fields)
  if reason:
    return None, reason
  url, title = fields["image_url"], fields["page_title"]
  if not url:
    return None, web_images.IMAGE_MISSING
  if not (web_images.is_valid_utf8(url) and web_images.is_valid_utf8(title)):
    return None, web_images.METADATA_INVALID_UTF8
  image, reason = web_images.load_image(images_dir / image_filename(url), min_side)
  if reason:
    return None, reason
  nan = float("nan")
  return dict(
      image=image.data, caption=caption,
      language=web_images.normalize_language(fields["language"]),
      key=key, width=image.width, height=image.height, source=SOURCE,
      similarity=nan, pwatermark=nan, punsafe=nan, aesthetic_score=nan,
      url=url, original_width=width, original_height=height,
      caption_source=caption_source, page_title=title,
  ), None
