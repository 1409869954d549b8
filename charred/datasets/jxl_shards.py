"""Shards of JPEG XL images with captions: writer, manifest and random-access reader.

Layout of an output directory (`write_shards`, `python -m charred.prepare`):

  <split>-00000.array_record     records (or .tfrecord), `examples_per_shard` each
  <split>-00000.index.npy        per-record width, height, caption_bytes (int32)
  ...
  manifest.json                  written last, atomically: its presence marks a finished
                                 output (shards, record counts, bytes, sha256, codec, source)

Record encoding: one msgpack map per record, with `image` (the JPEG XL codestream, RGB
8 bit), `key`, `caption`, `language` (str), `width`, `height` (int) and, when the source
has them, `source` (str) and the float metadata of `EXTRA_FLOAT_KEYS`. msgpack rather
than tf.train.Example so that hosts without TensorFlow read the shards (only writing
TFRecord files uses TensorFlow's writer, for its CRCs). The `.index.npy` sidecars let a
reader assign aspect-ratio and caption-length buckets without reading any image.

Reading: `JxlShards(dir)` gives random access by global record number (ArrayRecord files
through array_record's data source, which needs `group_size:1`, written here; TFRecord
files through an offset table built by scanning the record headers). ArrayRecord costs
~100 bytes per record and pads each file to a multiple of 64 KiB.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import functools
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import struct
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgpack
import numpy as np
from PIL import Image, ImageOps

MANIFEST = "manifest.json"
FORMATS = ("array_record", "tfrecord")
FORMAT_VERSION = 1
EXTRA_FLOAT_KEYS = ("similarity", "pwatermark", "punsafe", "aesthetic_score")
INDEX_DTYPE = np.dtype([("width", "<i4"), ("height", "<i4"), ("caption_bytes", "<i4")])
# Random access needs one record per chunk; JPEG XL does not compress further.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"

# Reasons an input example is skipped (counted in the manifest's `skipped`).
EMPTY_IMAGE = "empty_image"  # no bytes, or a zero width/height
CORRUPT_IMAGE = "corrupt_image"  # PIL cannot decode it (truncated, not an image, ...)
TOO_LARGE_IMAGE = "too_large_image"  # PIL's decompression-bomb guard
INVALID_CAPTION = "invalid_caption"  # not UTF-8, or missing
MISSING_KEY = "missing_key"


class SkipExample(Exception):
  """An input example that cannot become a record; `reason` is one of the constants."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class JxlSettings:
  """libjxl encoder settings.

  Attributes:
    lossless: modular lossless coding (pixel-exact round trip).
    distance: Butteraugli distance of lossy coding (libjxl's `cjxl -d`; 1.0 is
      "visually lossless"); ignored when lossless.
    quality: libjxl quality 0-100 (`cjxl -q`), used instead of `distance` when set.
    effort: encoder effort 1-9 (libjxl's default is 7): time against size.
    decoding_speed: 0-4 (libjxl's default 0); higher decodes faster for slightly
      larger files.

  The defaults favour decoding speed, which bounds a training input pipeline: on
  ~1 MP photo-like images (benchmarks/input_pipeline.py), distance 1.0 at effort 3 and
  decoding speed 2 decodes ~2x faster than at effort 3 / speed 0 and ~4x faster than at
  libjxl's defaults (effort 7 / speed 0, whose decoder-side filters cost the most), at
  about JPEG quality 90's PSNR in ~2/3 of its bytes.
  """
  lossless: bool = False
  distance: float | None = 1.0
  quality: float | None = None
  effort: int = 3
  decoding_speed: int = 2

  @classmethod
  def parse(cls, text: str, **kwargs) -> JxlSettings:
    """`lossless`, a distance (`1.0` or `d1.0`) or a quality (`q90`)."""
    text = text.strip().lower()
    try:
      if text == "lossless":
        return cls(lossless=True, distance=None, **kwargs)
      if text.startswith("q"):
        return cls(distance=None, quality=float(text[1:]), **kwargs)
      return cls(distance=float(text.removeprefix("d")), **kwargs)
    except ValueError:
      raise ValueError(f"quality {text!r} is not 'lossless', a distance such as 1.0 "
                       "(or d1.0), or a quality such as q90.") from None

  def encode(self, rgb: np.ndarray) -> bytes:
    """Encodes a uint8 [H, W, 3] array."""
    if self.lossless:
      kwargs = dict(lossless=True)
    elif self.quality is not None:
      kwargs = dict(level=self.quality)
    else:
      kwargs = dict(distance=self.distance)
    import imagecodecs  # pylint: disable=g-import-not-at-top
    return imagecodecs.jpegxl_encode(rgb, effort=self.effort,
                                     decodingspeed=self.decoding_speed or None,
                                     numthreads=1, **kwargs)

  def to_json(self) -> dict[str, Any]:
    import imagecodecs  # pylint: disable=g-import-not-at-top
    return dict(name="jpegxl", libjxl=imagecodecs.jpegxl_version(),
                imagecodecs=imagecodecs.__version__, **dataclasses.asdict(self))


def decode_image(data: bytes) -> np.ndarray:
  """A record's JPEG XL codestream -> uint8 [H, W, 3]."""
  # One thread per image: callers decode several images at once instead.
  import imagecodecs  # pylint: disable=g-import-not-at-top
  return imagecodecs.jpegxl_decode(data, numthreads=1)


def to_rgb_array(image: bytes | np.ndarray, max_pixels: int | None = None) -> np.ndarray:
  """Encoded image bytes (any format PIL reads) or an array -> uint8 [H, W, 3].

  EXIF orientation is applied; transparent images are composited over white (what a
  viewer shows, rather than the arbitrary colour under alpha 0); images larger than
  `max_pixels` are downscaled (Lanczos) to fit, keeping the aspect ratio.
  Raises SkipExample for empty, corrupt or decompression-bomb inputs.
  """
  if isinstance(image, np.ndarray):
    if image.size == 0:
      raise SkipExample(EMPTY_IMAGE)
    img = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1
                          else image)
  else:
    if not image:
      raise SkipExample(EMPTY_IMAGE)
    try:
      img = Image.open(io.BytesIO(image))
      img.load()
      img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
      raise SkipExample(TOO_LARGE_IMAGE, str(e)) from None
    except Exception as e:  # PIL raises many types for damaged files  # pylint: disable=broad-except
      raise SkipExample(CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None
  if img.width == 0 or img.height == 0:
    raise SkipExample(EMPTY_IMAGE)
  if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  if img.mode != "RGB":
    img = img.convert("RGB")
  if max_pixels and img.width * img.height > max_pixels:
    scale = math.sqrt(max_pixels / (img.width * img.height))
    size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
    img = img.resize(size, Image.LANCZOS, reducing_gap=3.0)
  return np.asarray(img)


def decode_text(value: Any, reason: str) -> str:
  """`value` (bytes, str or a 0-d array) as text; SkipExample(reason) if missing or not UTF-8."""
  if value is None:
    raise SkipExample(reason, "missing")
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise SkipExample(reason, str(e)) from None
  return str(value)


def make_record(example: dict[str, Any], settings: JxlSettings,
                max_pixels: int | None = None) -> dict[str, Any]:
  """An input example -> a record dict (raises SkipExample).

  `example` holds `image` (encoded bytes or a uint8 array), `caption`, `key`, and
  optionally `language`, `source` and the floats of EXTRA_FLOAT_KEYS (bytes or str).
  """
  caption = decode_text(example.get("caption"), INVALID_CAPTION)
  key = decode_text(example.get("key"), MISSING_KEY)
  if not key:
    raise SkipExample(MISSING_KEY)
  language = decode_text(example.get("language", ""), INVALID_CAPTION)
  rgb = to_rgb_array(example.get("image"), max_pixels)
  record = dict(key=key, caption=caption, language=language,
                width=int(rgb.shape[1]), height=int(rgb.shape[0]),
                image=settings.encode(rgb))
  if "source" in example:
    record["source"] = decode_text(example["source"], INVALID_CAPTION)
  for name in EXTRA_FLOAT_KEYS:
    if name in example:
      record[name] = float(example[name])
  return record


def serialize_record(record: dict[str, Any]) -> bytes:
  return msgpack.packb(record, use_bin_type=True)


def parse_record(data: bytes) -> dict[str, Any]:
  return msgpack.unpackb(data, raw=False)


# Writing.


def shard_name(split: str, index: int, record_format: str) -> str:
  return f"{split}-{index:05d}.{record_format}"


class _TFRecordWriter:
  """TensorFlow's writer (for the framing's masked CRC32C); only TFRecord output needs TF."""

  def __init__(self, path: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._writer = tf.io.TFRecordWriter(path)

  def write(self, data: bytes) -> None:
    self._writer.write(data)

  def close(self) -> None:
    self._writer.close()


def _open_writer(path: str, record_format: str):
  if record_format == "array_record":
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    return array_record_module.ArrayRecordWriter(path, ARRAY_RECORD_OPTIONS)
  return _TFRecordWriter(path)


def sha256_file(path: str) -> str:
  """The hex sha256 of a file, read in 4 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _ordered_map(fn: Callable, items: Iterable, num_workers: int) -> Iterator:
  """`map(fn, items)` on a thread pool, in order, with a bounded number in flight."""
  if num_workers <= 1:
    yield from map(fn, items)
    return
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    pending = collections.deque(pool.submit(fn, x)
                                for x in itertools.islice(items, 4 * num_workers))
    while pending:
      result = pending.popleft().result()
      for x in itertools.islice(items, 1):
        pending.append(pool.submit(fn, x))
      yield result


def check_output_dir(out_dir: str, overwrite: bool) -> bool:
  """Whether `out_dir` holds something (a non-empty folder or a file); refused unless
  `overwrite`. Cheap, so callers check before any slow work."""
  taken = os.path.exists(out_dir) and (not os.path.isdir(out_dir) or bool(os.listdir(out_dir)))
  if taken and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to "
                          "replace it.")
  return taken


def prepare_output_dir(out_dir: str, overwrite: bool) -> None:
  """Creates `out_dir`; an existing non-empty one is refused, or deleted with `overwrite`."""
  if check_output_dir(out_dir, overwrite):
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest):  # From now on the old output reads as unfinished.
      os.remove(manifest)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    else:
      os.remove(out_dir)
  os.makedirs(out_dir, exist_ok=True)


def write_json_atomically(path: str, value: Any) -> None:
  """Writes `value` under a temporary name, syncs, then renames: readers see all or nothing."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def check_write_options(record_format: str, examples_per_shard: int) -> None:
  """Refuses bad writer options before any slow work (one line each)."""
  if record_format not in FORMATS:
    raise ValueError(f"format {record_format!r} is not one of {FORMATS}.")
  if examples_per_shard < 1:
    raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}.")


def _encode_example(example: dict[str, Any], settings: JxlSettings,
                    max_pixels: int | None = None) -> dict[str, Any] | SkipExample:
  try:
    return make_record(example, settings, max_pixels)
  except SkipExample as e:
    return e


def encode_examples(examples: Iterable[dict[str, Any]], settings: JxlSettings,
                    max_pixels: int | None, num_workers: int,
                    skipped: collections.Counter) -> Iterator[dict[str, Any]]:
  """`make_record` of each example on `num_workers` threads (libjxl releases the GIL), in
  input order; skipped examples are counted by reason into `skipped`, not yielded."""
  encode = functools.partial(_encode_example, settings=settings, max_pixels=max_pixels)
  for record in _ordered_map(encode, examples, num_workers):
    if isinstance(record, SkipExample):
      skipped[record.reason] += 1
    else:
      yield record


def shard_entry_names(split: str, index: int, record_format: str) -> dict[str, str]:
  """A shard's manifest entry before writing: its record file and index sidecar."""
  name = shard_name(split, index, record_format)
  return dict(path=name, index=name.rsplit(".", 1)[0] + ".index.npy")


def write_records(records: Iterable[dict[str, Any]], out_dir: str, split: str, index: int,
                  record_format: str) -> tuple[dict[str, Any], int]:
  """Writes one shard (records + `.index.npy`) into `out_dir`; returns its manifest entry
  and the JPEG XL bytes it holds. The single-process writer and Beam's workers both
  write shards through here, so the files are the same byte for byte."""
  entry = shard_entry_names(split, index, record_format)
  path, index_path = (os.path.join(out_dir, entry[k]) for k in ("path", "index"))
  writer, rows, image_bytes = _open_writer(path, record_format), [], 0
  try:
    for record in records:
      writer.write(serialize_record(record))
      rows.append((record["width"], record["height"], len(record["caption"].encode())))
      image_bytes += len(record["image"])
  finally:
    writer.close()
  np.save(index_path, np.array(rows, dtype=INDEX_DTYPE))
  entry.update(num_records=len(rows), num_bytes=os.path.getsize(path),
               sha256=sha256_file(path), index_sha256=sha256_file(index_path))
  return entry, image_bytes


def make_manifest(*, settings: JxlSettings, record_format: str, split: str,
                  shards: Sequence[dict[str, Any]], num_read: int,
                  skipped: dict[str, int], image_bytes: int,
                  source: dict[str, Any] | None = None, max_pixels: int | None = None,
                  filtered: dict[str, Any] | None = None) -> dict[str, Any]:
  """The manifest of finished shards (entries as `write_records` returns them)."""
  return dict(
      format_version=FORMAT_VERSION,
      record_format=record_format,
      record_encoding="msgpack map: image (JPEG XL codestream), key, caption, language, "
                      "width, height [, source, " + ", ".join(EXTRA_FLOAT_KEYS) + "]",
      codec=settings.to_json(),
      max_pixels=max_pixels,
      source=dict(source or {}, split=split),
      shards=list(shards),
      num_records=sum(s["num_records"] for s in shards),
      num_examples_read=num_read,
      skipped=dict(sorted(skipped.items())),
      filtered=filtered or {},
      total_bytes=sum(s["num_bytes"] for s in shards),
      image_bytes=image_bytes,
      created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  )


def merge_skipped(*counts: dict[str, int]) -> dict[str, int]:
  """Skip counts by reason, summed (Beam workers count their own)."""
  total = collections.Counter()
  for c in counts:
    total.update(c)
  return dict(sorted(total.items()))


def write_shards(examples: Iterable[dict[str, Any]], out_dir: str, *,
                 settings: JxlSettings = JxlSettings(), record_format: str = "array_record",
                 examples_per_shard: int = 1000, split: str = "train",
                 source: dict[str, Any] | None = None, max_pixels: int | None = None,
                 num_workers: int | None = None, overwrite: bool = False,
                 log: Callable[[str], None] | None = None,
                 filtered: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
  """Encodes `examples` (see `make_record`) into JPEG XL shards + manifest; returns it.

  Examples keep their input order. Bad examples are skipped and counted by reason
  in the manifest's `skipped`. Encoding runs on `num_workers` threads (default: all
  cores), as libjxl releases the GIL. `filtered()`, called once `examples` is spent, gives
  the manifest's `filtered`: what quality filters upstream dropped, by filter and reason.
  (`prepare_beam` writes the same shards from Beam workers.)
  """
  check_write_options(record_format, examples_per_shard)
  prepare_output_dir(out_dir, overwrite)
  skipped = collections.Counter()
  stream = encode_examples(examples, settings, max_pixels,
                           num_workers or os.cpu_count() or 1, skipped)
  shards, image_bytes = [], 0
  while (first := next(stream, None)) is not None:
    shard = itertools.chain([first], itertools.islice(stream, examples_per_shard - 1))
    entry, n_bytes = write_records(shard, out_dir, split, len(shards), record_format)
    shards.append(entry)
    image_bytes += n_bytes
    if log:
      log(f"  {entry['path']}: {entry['num_records']} records, {entry['num_bytes']:,} bytes")
  num_read = sum(e["num_records"] for e in shards) + sum(skipped.values())
  manifest = make_manifest(settings=settings, record_format=record_format, split=split,
                           shards=shards, num_read=num_read, skipped=skipped,
                           image_bytes=image_bytes, source=source, max_pixels=max_pixels,
                           filtered=filtered() if filtered else {})
  write_json_atomically(os.path.join(out_dir, MANIFEST), manifest)
  return manifest


# Reading.


def read_manifest(out_dir: str) -> dict[str, Any]:
  if not os.path.isdir(out_dir):
    raise FileNotFoundError(f"{out_dir} is not a folder.")
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{out_dir} has no {MANIFEST}: not a finished JPEG XL shard "
                            "output (still being written, or failed).")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {manifest.get('format_version')} is not "
                     f"{FORMAT_VERSION}.")
  if (manifest.get("codec") or {}).get("name") != "jpegxl":  # e.g. an encoder cache's
    raise ValueError(f"{out_dir} is not a JPEG XL shard output (python -m "
                     "charred.prepare): its manifest names no JPEG XL codec.")
  if manifest.get("record_format") not in FORMATS:
    raise ValueError(f"{path}: record_format {manifest.get('record_format')!r} is not one "
                     f"of {FORMATS}.")
  return manifest


@dataclasses.dataclass(frozen=True)
class _FileInstruction:
  """What array_record's data source takes instead of opening every file to count it."""
  filename: str
  skip: int
  take: int
  examples_in_shard: int


class _TFRecordFile:
  """Random access into one TFRecord file through an offset table of its records."""

  def __init__(self, path: str, num_records: int):
    self._path = path
    offsets, lengths = [], []
    with open(path, "rb") as f:
      pos, size = 0, os.fstat(f.fileno()).st_size
      while pos < size:  # Header: uint64 length, uint32 CRC; then data, uint32 CRC.
        f.seek(pos)
        header = f.read(12)
        if len(header) < 12:
          raise ValueError(f"{path}: truncated TFRecord header at byte {pos}.")
        (length,) = struct.unpack("<Q", header[:8])
        offsets.append(pos + 12)
        lengths.append(length)
        pos += 12 + length + 4
      if pos != size:
        raise ValueError(f"{path}: truncated TFRecord record at byte {offsets[-1] - 12}.")
    if len(offsets) != num_records:
      raise ValueError(f"{path}: {len(offsets)} records, the manifest says {num_records}.")
    self._offsets, self._lengths = offsets, lengths
    self._file = open(path, "rb")

  def read(self, positions: Sequence[int]) -> list[bytes]:
    # os.pread: no shared file position, so threads may read concurrently.
    return [os.pread(self._file.fileno(), self._lengths[p], self._offsets[p])
            for p in positions]

  def close(self) -> None:
    self._file.close()


def check_shard_sizes(out_dir: str, shards: Sequence[dict[str, Any]]) -> None:
  """Every shard a manifest lists (`path`, `num_bytes`) exists with its size: a missing or
  truncated file is a one-line error, not a short read later."""
  for shard in shards:
    path = os.path.join(out_dir, shard["path"])
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is listed in the manifest but missing.")
    if os.path.getsize(path) != shard["num_bytes"]:
      raise ValueError(f"{path}: {os.path.getsize(path)} bytes, the manifest says "
                       f"{shard['num_bytes']}.")


class JxlShards:
  """Random access to the records of a `write_shards` output, by global record number.

  Attributes:
    manifest: the parsed manifest.json.
    index: structured array [num_records] of (width, height, caption_bytes).
  """

  def __init__(self, out_dir: str, verify: bool = False):
    self.out_dir = out_dir
    self.manifest = read_manifest(out_dir)
    shards = self.manifest["shards"]
    check_shard_sizes(out_dir, shards)
    for shard in shards:
      for name, digest in ((shard["path"], "sha256"), (shard["index"], "index_sha256")):
        if verify and sha256_file(os.path.join(out_dir, name)) != shard[digest]:
          raise ValueError(f"{os.path.join(out_dir, name)}: sha256 differs from the "
                           "manifest (corrupt file).")
    indices = [np.load(os.path.join(out_dir, s["index"])) for s in shards]
    for shard, index in zip(shards, indices):
      if len(index) != shard["num_records"]:
        raise ValueError(f"{shard['index']}: {len(index)} rows, the manifest says "
                         f"{shard['num_records']}.")
    self.index = (np.concatenate(indices) if indices else np.zeros(0, INDEX_DTYPE))
    self._starts = np.cumsum([0] + [s["num_records"] for s in shards])
    self._source, self._tfrecords = None, []
    if self.manifest["record_format"] == "array_record" and shards:
      from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
      self._source = array_record_data_source.ArrayRecordDataSource([
          _FileInstruction(os.path.join(out_dir, s["path"]), 0, s["num_records"],
                           s["num_records"]) for s in shards])
    elif shards:
      self._tfrecords = [_TFRecordFile(os.path.join(out_dir, s["path"]), s["num_records"])
                         for s in shards]

  def __len__(self) -> int:
    return int(self._starts[-1])

  def read_bytes(self, keys: Sequence[int]) -> list[bytes]:
    """Serialized records by global record number."""
    keys = [int(k) for k in keys]
    for k in keys:
      if not 0 <= k < len(self):
        raise IndexError(f"record {k} is not in [0, {len(self)}).")
    if self._source is not None:
      if len(keys) == 1:  # __getitems__ starts a thread pool per call.
        return [self._source[keys[0]]]
      return list(self._source.__getitems__(keys))
    shard_of = np.searchsorted(self._starts, keys, side="right") - 1
    return [self._tfrecords[s].read([k - self._starts[s]])[0] for s, k in zip(shard_of, keys)]

  def read(self, keys: Sequence[int]) -> list[dict[str, Any]]:
    """Parsed records (see `parse_record`) by global record number."""
    return [parse_record(b) for b in self.read_bytes(keys)]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    """All records in order."""
    for start in range(0, len(self), 256):
      yield from self.read(range(start, min(start + 256, len(self))))

  def close(self) -> None:
    if self._source is not None:
      self._source.__exit__(None, None, None)  # closes its readers
    for f in self._tfrecords:
      f.close()
