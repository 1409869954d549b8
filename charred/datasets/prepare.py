r"""Writes a TFDS split as JPEG XL shards + manifest (see `jxl_shards`).

  python -m charred.datasets.prepare --builder=NAME[/CONFIG] --split=train --out=DIR \
      [--data_dir=...] [--manual_dir=...] [--format=array_record|tfrecord] \
      [--quality=<distance>|q<quality>|lossless] [--effort=3] [--decoding_speed=2] \
      [--examples_per_shard=N] [--max_pixels=N] [--num_workers=N] [--overwrite]

The builder is generated first if `data_dir` does not hold it yet (builders that read
local files take them from `--manual_dir`); `charred.datasets.<NAME>` is imported to
register it. Examples need `image` and `caption`; `key` defaults to the TFDS id and
`language` to ''. Images are taken as stored (no TFDS decoding) and re-encoded as JPEG XL
from their decoded pixels: by default lossy at Butteraugli distance 1.0 (see
`jxl_shards.JxlSettings` for why effort 3 / decoding speed 2); `--quality=lossless`
keeps them pixel-exact. `--split` takes
TFDS slicing (`train[:1000]`). DIR must not exist or be empty unless --overwrite (which
deletes it); manifest.json is written last, so a DIR without one is unfinished.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import time
from typing import Any, Iterator

from absl import app
from absl import flags
from absl import logging

from charred.datasets import jxl_shards

_BUILDER = flags.DEFINE_string("builder", None, "TFDS builder NAME[/CONFIG][:VERSION].")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Local source files of the builder.")
_SPLIT = flags.DEFINE_string("split", "train", "Split, with TFDS slicing if wanted.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_FORMAT = flags.DEFINE_enum("format", "array_record", list(jxl_shards.FORMATS),
                            "Record file format.")
_QUALITY = flags.DEFINE_string("quality", "1.0",
                               "'lossless', a Butteraugli distance (1.0, d1.0) or a "
                               "libjxl quality (q90).")
_EFFORT = flags.DEFINE_integer("effort", jxl_shards.JxlSettings.effort, "libjxl effort 1-9.")
_DECODING_SPEED = flags.DEFINE_integer("decoding_speed", jxl_shards.JxlSettings.decoding_speed,
                                       "libjxl decoding speed tier 0-4.")
_EXAMPLES_PER_SHARD = flags.DEFINE_integer("examples_per_shard", 1000, "Records per shard.")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", None,
                                   "Downscale larger images to this many pixels.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Encoder threads (all cores).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete and replace an existing --out.")

_OPTIONAL_TEXT = ("language", "source")


# TFDS names of charred's builders whose module is named otherwise (TFDS has its own `wit`).
_BUILDER_MODULES = {"wit_images": "wit"}


def _register(builder_name: str) -> None:
  """Imports charred.datasets.<module>, whose import registers the builder with TFDS."""
  module = builder_name.split("/")[0].split(":")[0]
  module = _BUILDER_MODULES.get(module, module)
  try:
    importlib.import_module(f"charred.datasets.{module}")
  except ModuleNotFoundError as e:
    if e.name != f"charred.datasets.{module}":
      raise


def load_builder(builder_name: str, data_dir: str | None = None,
                 manual_dir: str | None = None):
  """The TFDS builder `builder_name`, generated into `data_dir` if needed."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _register(builder_name)
  try:
    builder = tfds.builder(builder_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown TFDS builder {builder_name!r}: "
                     f"{str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    print(f"Generating {builder_name} into {builder.data_dir} ...", flush=True)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def iter_examples(builder, split: str) -> Iterator[dict[str, Any]]:
  """The split's examples as `jxl_shards.make_record` inputs, images still encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = builder.info.features
  for name in ("image", "caption"):
    if name not in features:
      raise ValueError(f"{builder.name}: no {name!r} feature (has {sorted(features)}).")
  decoders = {"image": tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  extras = [k for k in (*_OPTIONAL_TEXT, *jxl_shards.EXTRA_FLOAT_KEYS) if k in features]
  for ex in tfds.as_numpy(ds):
    out = dict(image=ex["image"], caption=ex["caption"],
               key=ex["key"] if "key" in features else ex["tfds_id"])
    for k in extras:
      out[k] = ex[k]
    yield out


def prepare(builder_name: str, split: str, out: str, *, data_dir: str | None = None,
            manual_dir: str | None = None, record_format: str = "array_record",
            settings: jxl_shards.JxlSettings | None = None,
            examples_per_shard: int = 1000, max_pixels: int | None = None,
            num_workers: int | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes `builder_name`'s `split` as JPEG XL shards into `out`; returns the manifest."""
  if os.path.exists(out) and os.listdir(out) and not overwrite:  # Before any slow work.
    raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it.")
  builder = load_builder(builder_name, data_dir, manual_dir)
  source = dict(builder=builder_name, name=builder.name,
                config=builder.builder_config.name if builder.builder_config else None,
                version=str(builder.version), data_dir=str(builder.data_dir))
  return jxl_shards.write_shards(
      iter_examples(builder, split), out, settings=settings or jxl_shards.JxlSettings(),
      record_format=record_format,
      examples_per_shard=examples_per_shard,
      split=re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_"), source=source,
      max_pixels=max_pixels, num_workers=num_workers, overwrite=overwrite,
      log=lambda line: print(line, flush=True))


def main(argv):
  prog = "python -m charred.datasets.prepare"
  logging.set_verbosity(logging.ERROR)  # TFDS logs every dataset it constructs.
  if len(argv) > 1:
    sys.exit(f"{prog}: error: unexpected arguments {argv[1:]}")
  start = time.time()
  try:
    if not _BUILDER.value or not _OUT.value:
      raise ValueError("--builder and --out are required.")
    settings = jxl_shards.JxlSettings.parse(_QUALITY.value, effort=_EFFORT.value,
                                            decoding_speed=_DECODING_SPEED.value)
    manifest = prepare(_BUILDER.value, _SPLIT.value, _OUT.value, data_dir=_DATA_DIR.value,
                       manual_dir=_MANUAL_DIR.value, record_format=_FORMAT.value,
                       settings=settings, examples_per_shard=_EXAMPLES_PER_SHARD.value,
                       max_pixels=_MAX_PIXELS.value, num_workers=_NUM_WORKERS.value,
                       overwrite=_OVERWRITE.value)
  except (ValueError, OSError) as e:
    from charred.configs import gin_utils  # pylint: disable=g-import-not-at-top
    gin_utils.exit_with_error(prog, e)
  skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
  print(f"{manifest['num_records']} records in {len(manifest['shards'])} shards, "
        f"{manifest['total_bytes']:,} bytes -> {_OUT.value} (skipped: {skipped}; "
        f"{time.time() - start:.1f} s)")


if __name__ == "__main__":
  app.run(main)
