"""SeqIO tasks over the web image-text builders (`laion_hr`, `wit_images`).

Same model inputs as the typography tasks (`tasks.py`): the caption tokenized
with ByT5's `seqio.ByteVocabulary`, trimmed to leave room for EOS and
EOS-terminated, as 'text_tokens'; the common-schema features next to it.
Padding to the model's text length is left to the input pipeline.

`web_task` is what `python -m charred.prepare --task` reads: a web source with named
quality filters (`FILTERS`) ahead of tokenisation, each counting what it drops, so the
filters decide what reaches the JPEG XL shards and so training.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
from typing import Any, Callable, Mapping, Sequence

import seqio
import tensorflow_datasets as tfds

from charred.datasets import aesthetic
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
    # Annotates scores only (`min_score` None) unless given one, e.g. LAION-Aesthetics
    # v2's 5.0 or 6.5: `--filter_args=aesthetic.min_score=6.5`.
    "aesthetic": aesthetic.annotate_and_filter,
}
# Filter parameters that are the pipeline's, not the user's.
_FIXED_PARAMETERS = ("ds", "counts", "name")
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


def filter_parameters(name: str) -> tuple[str, ...]:
  """The parameters filter `name` takes from `filter_args`."""
  return tuple(p for p in inspect.signature(FILTERS[name]).parameters
               if p not in _FIXED_PARAMETERS)


def parse_filter_args(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
  """['aesthetic.min_score=6.5', ...] -> {'aesthetic': {'min_score': 6.5}}; values are
  Python literals (a bare word is taken as a string)."""
  args: dict[str, dict[str, Any]] = {}
  for spec in specs:
    target, sep, text = spec.partition("=")
    name, dot, parameter = target.strip().partition(".")
    if not (sep and dot and name and parameter):
      raise ValueError(f"filter argument {spec!r} is not FILTER.PARAMETER=VALUE.")
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    args.setdefault(name, {})[parameter] = value
  return args


def check_web_task(source: str, filter_names: Sequence[str],
                   filter_args: Mapping[str, Mapping[str, Any]] | None = None) -> None:
  """One line for a web source, filter or filter parameter that does not exist."""
  if source not in WEB_SOURCES:
    raise ValueError(f"unknown web source {source!r}; the sources are "
                     f"{', '.join(WEB_SOURCES)}.")
  for name in filter_names:
    if name not in FILTERS:
      raise ValueError(f"unknown filter {name!r}; the filters are {', '.join(FILTERS)}.")
  for name, args in (filter_args or {}).items():
    if name not in filter_names:
      raise ValueError(f"arguments for filter {name!r}, which is not among the filters "
                       f"run ({', '.join(filter_names) or 'none'}).")
    for parameter in args:
      if parameter not in filter_parameters(name):
        raise ValueError(f"filter {name!r} has no parameter {parameter!r}; its parameters "
                         f"are {', '.join(filter_parameters(name))}.")


def web_task(source: str, filter_names: Sequence[str] = DEFAULT_FILTERS,
             data_dir: str | None = None,
             counts: filters.FilterCounts | None = None,
             filter_args: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  """Registers the task over web source `source` (a `WEB_SOURCES` name) with the named
  filters, in order, ahead of tokenisation; returns its name. Images stay encoded (the
  shards re-encode them) and every `SHARD_KEYS` feature is kept. `filter_args` overrides
  filters' default parameters by filter name. Each filter counts its outcomes in
  `counts` (default: `filters.COUNTS`). Registering the same source, filters and
  arguments again replaces the task, so its counts are those of the latest `counts`."""
  filter_args = {k: dict(v) for k, v in (filter_args or {}).items()}
  check_web_task(source, filter_names, filter_args)
  counts = counts if counts is not None else filters.COUNTS
  key = (tuple(filter_names), sorted((k, sorted(v.items())) for k, v in filter_args.items()),
         data_dir)
  digest = hashlib.sha1(repr(key).encode()).hexdigest()[:8]
  name = f"{source}_filtered_{digest}"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
    _REGISTERED.pop(name, None)
  preprocessors = [functools.partial(FILTERS[f], counts=counts, **filter_args.get(f, {}))
                   for f in filter_names]
  builder = WEB_SOURCES[source]
  version = tfds.builder_cls(builder.split("/")[0]).VERSION  # seqio wants it explicit
  return register_source_task(name, f"{builder}:{version}", data_dir, decode_image=False,
                              source_preprocessors=preprocessors,
                              passthrough_keys=SHARD_KEYS)
