"""The examples `prepare` turns into JPEG XL shards: a TFDS builder's split or a SeqIO
task's, as `jxl_shards.make_record` inputs with their images still encoded. Shared by the
single-process writer (`prepare`) and the Beam workers (`prepare_beam`)."""
from __future__ import annotations

import importlib
from typing import Any, Iterator

from charred.datasets import jxl_shards

# Text features carried into the shards when a source has them.
_OPTIONAL_TEXT = ("language", "source")


# TFDS names of charred's builders whose module is named otherwise (TFDS has its own `wit`).
_BUILDER_MODULES = {"wit_images": "wit"}


def register_builder(builder_name: str) -> None:
  """Imports charred.datasets.<module>, whose import registers the builder with TFDS."""
  module = builder_name.split("/")[0].split(":")[0]
  module = _BUILDER_MODULES.get(module, module)
  try:
    importlib.import_module(f"charred.datasets.{module}")
  except ModuleNotFoundError as e:
    if e.name != f"charred.datasets.{module}":
      raise


def load_builder(builder_name: str, data_dir: str | None = None,
                 manual_dir: str | None = None, beam_options=None):
  """The TFDS builder `builder_name`, generated into `data_dir` if needed (through Beam
  with `beam_options`, by builders that support it)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  register_builder(builder_name)
  try:
    builder = tfds.builder(builder_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown TFDS builder {builder_name!r}: "
                     f"{str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    print(f"Generating {builder_name} into {builder.data_dir} ...", flush=True)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                     beam_options=beam_options))
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


def iter_task_examples(task_name: str, split: str,
                       num_epochs: int | None = 1) -> Iterator[dict[str, Any]]:
  """A SeqIO task's or mixture's examples in order (a mixture's draws seeded), as
  `jxl_shards.make_record` inputs (the tasks keep their images encoded)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  provider = seqio.get_mixture_or_task(task_name)
  keep = ("image", "caption", "key", *_OPTIONAL_TEXT, *jxl_shards.EXTRA_FLOAT_KEYS)
  # A mixture keeps only its output features unless told otherwise.
  extra = ({"passthrough_features": keep} if isinstance(provider, seqio.Mixture) else {})
  ds = provider.get_dataset(None, split=split, shuffle=False, seed=0, num_epochs=num_epochs,
                            **extra)
  for ex in tfds.as_numpy(ds):
    yield {k: ex[k] for k in keep if k in ex}
