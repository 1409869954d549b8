"""Writers of tiny web image-text fixtures in their published formats.

- img2dataset's webdataset output (`write_img2dataset_shard`): the tar laid
  out as webdataset's TarWriter (which img2dataset uses) writes it, and the
  parquet with img2dataset's schema and key format, with the columns its
  laion-high-resolution example saves.
- WiT's TSV files (`write_wit_tsv`): 17 columns, a header, tab-separated,
  QUOTE_MINIMAL, optionally gzipped; images at images/<sha1(url)><ext>.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import posixpath
import tarfile
import time
import urllib.parse

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq

# Images.


def image_array(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
  """Smooth uint8 content (JPEG decoders agree on it to a level or two)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  phases = rng.uniform(0, 2 * np.pi, size=channels)
  freq = rng.uniform(0.02, 0.06, size=(channels, 2))
  planes = [127.5 + 100 * np.sin(freq[c, 0] * x + freq[c, 1] * y + phases[c])
            for c in range(channels)]
  return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kwargs) -> bytes:
  image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
  if mode:
    image = image.convert(mode)
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
  return encode(image_array(width, height, seed), "JPEG", mode=mode, quality=92)


def decode(data: bytes) -> np.ndarray:
  """What PIL decodes, as uint8 [H, W, C]."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB") if im.mode not in ("RGB", "RGBA") else im)


# img2dataset webdataset output.

# img2dataset's output parquet columns after the saved input columns of the
# laion-high-resolution example ("similarity","hash","punsafe","pwatermark","LANGUAGE").
_SAVED_COLUMNS = [("similarity", pa.float64()), ("hash", pa.int64()),
                  ("punsafe", pa.float32()), ("pwatermark", pa.float32()),
                  ("LANGUAGE", pa.string())]
_IMG2DATASET_COLUMNS = [
    ("caption", pa.string()), ("url", pa.string()), ("key", pa.string()),
    ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("original_width", pa.int32()),
    ("original_height", pa.int32()), ("exif", pa.string()), ("sha256", pa.string())]
IMG2DATASET_SCHEMA = pa.schema(_SAVED_COLUMNS + _IMG2DATASET_COLUMNS)


@dataclasses.dataclass
class LaionRow:
  """One input row of LAION-HR and what img2dataset made of it.

  `image` None means a failed download (a parquet row only); `txt` overrides
  the tar's caption member bytes (e.g. invalid UTF-8); `in_tar` False leaves a
  successful row out of the tar; `json` overrides the metadata member.
  """
  caption: str
  image: bytes | None
  similarity: float = 0.3
  pwatermark: float | None = 0.1
  punsafe: float | None = 0.01
  language: str = "en"
  txt: bytes | None = None
  in_tar: bool = True
  json: bytes | None = None
  # LAION-Aesthetics' score, saved as an additional column ("aesthetic") when any row has one.
  aesthetic: float | None = None


def img2dataset_key(shard_id: int, index: int, number_sample_per_shard: int = 10000,
                    oom_shard_count: int = 5) -> str:
  """img2dataset's `compute_key`: shard id then row index, zero-padded."""
  oom_sample_per_shard = math.ceil(math.log10(number_sample_per_shard))
  return f"{10 ** oom_sample_per_shard * shard_id + index:0{oom_sample_per_shard + oom_shard_count}d}"


def _pil_size(data: bytes) -> tuple[int | None, int | None]:
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.size
  except Exception:  # pylint: disable=broad-except
    return None, None


def _write_webdataset_tar(path: str, samples: list[dict[str, bytes | str]]) -> None:
  """A tar as webdataset's TarWriter (img2dataset's writer) makes it: a stream
  ('w|', PAX), per sample the members '<key>.<ext>' in sorted extension order,
  mode 0o444, owner 'bigdata'."""
  now = time.time()
  with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
    for sample in samples:
      for ext in sorted(k for k in sample if k != "__key__"):
        data = sample[ext]
        data = data.encode("utf-8") if isinstance(data, str) else data
        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
        info.size, info.mtime, info.mode = len(data), now, 0o444
        info.uname = info.gname = "bigdata"
        tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shard(folder: str, shard_id: int, rows: list[LaionRow], *,
                            with_parquet: bool = True) -> list[str]:
  """Writes `{shard:05d}.tar`, `.parquet` and `_stats.json`; returns the keys."""
  os.makedirs(folder, exist_ok=True)
  shard = f"{shard_id:05d}"
  metas, keys, samples = [], [], []
  with_aesthetic = any(r.aesthetic is not None for r in rows)
  for i, row in enumerate(rows):
    key = img2dataset_key(shard_id, i)
    keys.append(key)
    width, height = _pil_size(row.image) if row.image else (None, None)
    ok = row.image is not None
    meta = {
        "similarity": row.similarity, "hash": 1000 + i, "punsafe": row.punsafe,
        "pwatermark": row.pwatermark, "LANGUAGE": row.language, "caption": row.caption,
        "url": f"https://example.com/{shard}/{i}.jpg", "key": key,
        "status": "success" if ok else "failed_to_download",
        "error_message": None if ok else "HTTP Error 404: Not Found",
        "width": width, "height": height, "original_width": width,
        "original_height": height, "exif": "{}" if ok else None,
        "sha256": hashlib.sha256(row.image).hexdigest() if ok else None,
    }
    if with_aesthetic:
      meta = {"aesthetic": row.aesthetic, **meta}
    metas.append(meta)
    if ok and row.in_tar:
      samples.append({"__key__": key, "jpg": row.image,
                      "txt": row.txt if row.txt is not None else row.caption,
                      "json": row.json if row.json is not None else json.dumps(meta, indent=4)})
  _write_webdataset_tar(os.path.join(folder, f"{shard}.tar"), samples)
  if with_parquet:
    schema = IMG2DATASET_SCHEMA
    if with_aesthetic:
      schema = pa.schema([("aesthetic", pa.float64()), *zip(schema.names, schema.types)])
    table = pa.Table.from_pylist(metas, schema=schema)
    pq.write_table(table, os.path.join(folder, f"{shard}.parquet"))
  with open(os.path.join(folder, f"{shard}_stats.json"), "w") as f:
    json.dump({"count": len(rows), "successes": sum(r.image is not None for r in rows)}, f)
  return keys


# WiT.

WIT_COLUMNS = (
    "language", "page_url", "image_url", "page_title", "section_title",
    "hierarchical_section_title", "caption_reference_description",
    "caption_attribution_description", "caption_alt_text_description", "mime_type",
    "original_height", "original_width", "is_main_image", "attribution_passes_lang_id",
    "page_changed_recently", "context_page_description", "context_section_description")
# Stands for bytes that are not UTF-8 (written raw by write_wit_tsv).
INVALID_UTF8 = "\u2603INVALID\u2603"


def wit_row(n: int, **fields) -> dict[str, str]:
  """A WiT row with plausible defaults; `fields` override columns."""
  row = {
      "language": "en", "page_url": f"https://en.wikipedia.org/wiki/Page_{n}",
      "image_url": f"https://upload.wikimedia.org/wikipedia/commons/a/ab/Image_{n}.jpg",
      "page_title": f"Page {n}", "section_title": "", "hierarchical_section_title": f"Page {n}",
      "caption_reference_description": "", "caption_attribution_description": "",
      "caption_alt_text_description": "", "mime_type": "image/jpeg",
      "original_height": "600", "original_width": "800", "is_main_image": "true",
      "attribution_passes_lang_id": "false", "page_changed_recently": "true",
      "context_page_description": f"Page {n} is a page.\nIt has two lines.",
      "context_section_description": "",
  }
  row.update(fields)
  return row


def write_wit_tsv(path: str, rows: list[dict[str, str]], columns=WIT_COLUMNS) -> None:
  """A WiT TSV (gzipped when `path` ends in .gz); INVALID_UTF8 becomes b'\\xff\\xfe'."""
  text = io.StringIO()
  writer = csv.writer(text, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow([row[c] for c in columns] if isinstance(row, dict) else row)
  data = text.getvalue().encode("utf-8").replace(INVALID_UTF8.encode("utf-8"), b"\xff\xfe")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)


def wit_image_path(manual_dir: str, image_url: str) -> str:
  """<manual_dir>/images/<sha1 hex of the URL><lowercased URL path extension>."""
  ext = posixpath.splitext(urllib.parse.urlsplit(image_url).path)[1].lower()
  return os.path.join(manual_dir, "images",
                      hashlib.sha1(image_url.encode("utf-8")).hexdigest() + ext)


def write_wit_image(manual_dir: str, image_url: str, data: bytes) -> None:
  path = wit_image_path(manual_dir, image_url)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


# A LAION-HR download at scale (benchmarks/prepare_scale.py, tests/test_prepare_beam.py).

# Bad rows of `write_laion_hr_fixture`, by row number: which skip reason each gives.
def laion_bad_row(i: int) -> str | None:
  """The skip reason row `i` of the fixture is made to give, or None for a good row."""
  if i % 97 == 13:
    return "image_corrupt"  # a JPEG cut in half
  if i % 89 == 7:
    return "caption_invalid_utf8"
  if i % 101 == 50:
    return "not_downloaded"  # img2dataset's failed_to_download: a parquet row only
  return None


def write_laion_hr_fixture(folder: str, num_rows: int, *, seed: int = 0,
                           rows_per_shard: int = 500, min_side: int = 160,
                           max_side: int = 320) -> dict[str, int]:
  """An img2dataset LAION-HR download of `num_rows` rows (shards of `rows_per_shard`):
  photo-like JPEGs (quality 90) of random sizes in [min_side, max_side], fixed by `seed`,
  with ~3 % bad rows (`laion_bad_row`). Returns the expected skip counts by reason."""
  from photo_fixtures import photo  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  expected: dict[str, int] = {}
  for shard_id, start in enumerate(range(0, num_rows, rows_per_shard)):
    rows = []
    for i in range(start, min(start + rows_per_shard, num_rows)):
      width, height = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
      data = encode(photo(height, width, seed=seed * 1_000_003 + i), "JPEG", quality=90)
      reason = laion_bad_row(i)
      if reason:
        expected[reason] = expected.get(reason, 0) + 1
      if reason == "image_corrupt":
        data = data[: len(data) // 2]
      rows.append(LaionRow(f"Photo {i}: a {'red' if i % 2 else 'blue'} sign reading "
                           f"'OPEN {i}'", None if reason == "not_downloaded" else data,
                           txt=b"caf\xe9 \xff" if reason == "caption_invalid_utf8" else None,
                           language=("en", "de", "fr")[i % 3]))
    write_img2dataset_shard(folder, shard_id, rows)
  return dict(sorted(expected.items()))


def shard_contents(out: str) -> dict:
  """What two runs of `prepare` must agree on: the manifest bar its time, and per shard
  every record's fields with a digest of its decoded pixels in place of the codestream
  (NaN metadata as 'nan', so that equal records compare equal)."""
  from charred.datasets import jxl_shards  # pylint: disable=g-import-not-at-top
  manifest = jxl_shards.read_manifest(out)
  manifest = {k: v for k, v in manifest.items() if k != "created"}
  shards = jxl_shards.JxlShards(out, verify=True)
  records = []
  for r in shards:
    pixels = jxl_shards.decode_image(r.pop("image"))
    r = {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
    records.append(dict(r, pixels=hashlib.sha256(pixels.tobytes()).hexdigest()))
  shards.close()
  return dict(manifest=manifest, records=records)
