"""SeqIO tasks over the web image-text builders (`laion_hr`, `wit_images`).

Same model inputs as the typography tasks (`tasks.py`): the caption tokenized
with ByT5's `seqio.ByteVocabulary`, trimmed to leave room for EOS and
EOS-terminated, as 'text_tokens'; the common-schema features next to it.
Padding to the model's text length is left to the input pipeline.

`web_task` is what `charred.datasets.prepare --task` reads: a web source with named
quality filters (`FILTERS`) ahead of tokenisation, each counting what it drops, so the
filters decide what reaches the JPEG XL shards and so training.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Sequence

import seqio
import tensorflow_datasets as tfds

from charred.datasets import filters
# Importing registers the builders with TFDS, where seqio looks them up.
from charred.datasets import laion_hr  # pylint: disable=unused-import
from charred.datasets import tasks
from charred.datasets import web_images
from charred.datasets import wit  # pylint: disable=unused-import

# Features passed through untouched next to the tokens.
PASSTHROUGH_KEYS = ("image", "caption", "language", "width", "height", "key")
# What a prepared shard keeps of each example: the common schema, its scores included.
SHARD_KEYS = (*PASSTHROUGH_KEYS, "source", *web_images.FLOAT_FEATURES)

# The web sources `web_task` reads, by name: builder configs without thresholds of their
# own, so that every quality decision is one of the named filters and is counted.
WEB_SOURCES = {"laion_hr": "laion_hr/unfiltered", "wit": "wit_images/default"}
# Quality filters by name (charred.datasets.filters), with their default parameters.
FILTERS = {
    "valid_caption": filters.valid_caption,
    "caption_length": filters.caption_length,
    "url_or_filename": filters.url_or_filename,
    "boilerplate": filters.boilerplate,
    "repetition": filters.repetition,
    "language_confidence": filters.language_confidence,
    "image_size": filters.image_size,
    "metadata_scores": filters.metadata_scores,
}
DEFAULT_FILTERS = ("valid_caption", "caption_length", "url_or_filename", "boilerplate",
                   "repetition")
# The arguments of the tasks registered here, by name.
_REGISTERED: dict[str, tuple[Any, ...]] = {}


def register_source_task(name: str, tfds_name: str, data_dir: str | None = None,
                         decode_image: bool = True,
                         source_preprocessors: Sequence[Callable[..., Any]] = (),
                         passthrough_keys: Sequence[str] = PASSTHROUGH_KEYS) -> str:
  """Registers (once) a seqio.Task over a prepared web dataset; returns its name.

  Args:
    name: the task name, e.g. 'laion_hr'.
    tfds_name: 'laion_hr/default:1.0.0', 'wit_images/default', ...
    data_dir: where the dataset was prepared (TFDS's default when None).
    decode_image: False keeps 'image' as the stored JPEG/PNG bytes (a scalar
      tf.string), for decoding later in the pipeline.
    source_preprocessors: seqio preprocessors run on the full TFDS examples
      (every feature, float metadata included) before tokenization, e.g.
      quality filters.
    passthrough_keys: the features kept next to the tokens.
  """
  args = (tfds_name, data_dir, decode_image, tuple(source_preprocessors),
          tuple(passthrough_keys))
  if name in seqio.TaskRegistry.names():
    if _REGISTERED.get(name) != args:
      raise ValueError(f"SeqIO task {name!r} is already registered with "
                       f"{_REGISTERED.get(name, 'other arguments')}, not {args} "
                       "(tfds_name, data_dir, decode_image, source_preprocessors, "
                       "passthrough_keys).")
    return name
  decoders = None if decode_image else {"image": tfds.decode.SkipDecoding()}
  source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir,
                                decoders=decoders)
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[*source_preprocessors, *tasks.caption_preprocessors(passthrough_keys)],
      output_features=tasks.OUTPUT_FEATURES,
  )
  _REGISTERED[name] = args
  return name


def check_web_task(source: str, filter_names: Sequence[str]) -> None:
  """One line for a web source or filter name that does not exist."""
  if source not in WEB_SOURCES:
    raise ValueError(f"unknown web source {source!r}; the sources are "
                     f"{', '.join(WEB_SOURCES)}.")
  for name in filter_names:
    if name not in FILTERS:
      raise ValueError(f"unknown filter {name!r}; the filters are {', '.join(FILTERS)}.")


def web_task(source: str, filter_names: Sequence[str] = DEFAULT_FILTERS,
             data_dir: str | None = None,
             counts: filters.FilterCounts | None = None) -> str:
  """Registers the task over web source `source` (a `WEB_SOURCES` name) with the named
  filters, in order, ahead of tokenisation; returns its name. Images stay encoded (the
  shards re-encode them) and every `SHARD_KEYS` feature is kept. Each filter counts its
  outcomes in `counts` (default: `filters.COUNTS`). Registering the same source and
  filters again replaces the task, so its counts are those of the latest `counts`."""
  check_web_task(source, filter_names)
  counts = counts if counts is not None else filters.COUNTS
  digest = hashlib.sha1(repr((tuple(filter_names), data_dir)).encode()).hexdigest()[:8]
  name = f"{source}_filtered_{digest}"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
    _REGISTERED.pop(name, None)
  preprocessors = [functools.partial(FILTERS[f], counts=counts) for f in filter_names]
  builder = WEB_SOURCES[source]
  version = tfds.builder_cls(builder.split("/")[0]).VERSION  # seqio wants it explicit
  return register_source_task(name, f"{builder}:{version}", data_dir, decode_image=False,
                              source_preprocessors=preprocessors,
                              passthrough_keys=SHARD_KEYS)
