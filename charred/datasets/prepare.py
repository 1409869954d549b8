"""Writes a TFDS split (`prepare`), or a web source through its quality filters
(`prepare_task`), as JPEG XL shards + manifest (see `jxl_shards`). The command that runs
them is `python -m charred.prepare` (its docstring has the flags).

A `runner` runs the same preparation as Apache Beam pipelines (`pip install
'charred[beam]'`; see `prepare_beam`): the builder is generated through Beam and the
shards are written by Beam workers, with the same keys, pixels, shard boundaries, skip
counts and manifest (bar its `created` time). Without one everything runs in this process.

`prepare_task` reads the source through its SeqIO task (`source_tasks.web_task`): the
named quality filters (default `source_tasks.DEFAULT_FILTERS`) run before anything is
written, and the manifest's `filtered` counts what each dropped, by reason. What they
drop never reaches the shards, so never a training batch. `rebalance=N` writes N examples
drawn from the filtered ones with languages at mT5's distribution
(`languages.register_rebalanced_mixture`).

The builder is generated first if `data_dir` does not hold it yet (builders that read
local files take them from `manual_dir`); `charred.datasets.<NAME>` is imported to
register it. Examples need `image` and `caption`; `key` defaults to the TFDS id and
`language` to ''. Images are taken as stored (no TFDS decoding) and re-encoded as JPEG XL
from their decoded pixels: by default lossy at Butteraugli distance 1.0 (see
`jxl_shards.JxlSettings` for why effort 3 / decoding speed 2); lossless settings keep
them pixel-exact. `split` takes TFDS slicing (`train[:1000]`). `out` must not exist or be
empty unless `overwrite` (which deletes it); manifest.json is written last, so a folder
without one is unfinished.
"""
from __future__ import annotations

import collections
import functools
import itertools
import re
import runpy
from typing import Any, Mapping, Sequence

from charred.datasets import jxl_shards
from charred.datasets import shard_inputs


def prepare_task(source: str, split: str, out: str, *,
                 filter_names: Sequence[str] | None = None,
                 filter_args: Mapping[str, Mapping[str, Any]] | None = None,
                 data_dir: str | None = None,
                 manual_dir: str | None = None, rebalance: int | None = None,
                 max_repeat: float | None = None, runner: str | None = None,
                 beam_options: str | None = None, **shard_options) -> dict[str, Any]:
  """Writes web source `source`'s `split`, through its filters, as JPEG XL shards into
  `out`; returns the manifest. `filter_args`: parameters of the named filters other than
  their defaults, by filter name (`source_tasks.parse_filter_args`). `shard_options`,
  `runner` and `beam_options` as `prepare`.

  `rebalance`: instead of each example once, write this many drawn with languages at
  mT5's distribution (`languages.register_rebalanced_mixture` over the filtered task; no
  language read more than `max_repeat` times). The manifest's `source.languages` holds
  the filtered examples per language and the sampling rates.
  """
  from charred.datasets import filters, source_tasks  # pylint: disable=g-import-not-at-top
  filter_names = (source_tasks.DEFAULT_FILTERS if filter_names is None
                  else tuple(filter_names))
  filter_args = {k: dict(v) for k, v in (filter_args or {}).items()}
  # Bad names fail before slow work.
  source_tasks.check_web_task(source, filter_names, filter_args)
  jxl_shards.check_output_dir(out, shard_options.get("overwrite", False))
  if runner and rebalance:
    raise ValueError("--rebalance draws in one process; drop --runner to use it.")
  options = _beam_options(runner, beam_options)
  builder = shard_inputs.load_builder(source_tasks.WEB_SOURCES[source], data_dir, manual_dir,
                                      options)
  described = dict(_describe(source_tasks.WEB_SOURCES[source], builder), task=source,
                   filters=list(filter_names),
                   filter_args={k: {p: repr(v) if not isinstance(v, (int, float, str, bool))
                                    else v for p, v in a.items()}
                                for k, a in filter_args.items()})
  if options is not None:
    from charred.datasets import prepare_beam  # pylint: disable=g-import-not-at-top
    read = functools.partial(prepare_beam.read_task_chunk, source=source,
                             filter_names=tuple(filter_names), data_dir=data_dir,
                             filter_args=filter_args)
    return _write_beam(read, builder, options, out, split, described, **shard_options)
  counts = filters.FilterCounts()
  task = source_tasks.web_task(source, filter_names, data_dir, counts, filter_args)
  if not rebalance:
    return _write(shard_inputs.iter_task_examples(task, split), out, split, described,
                  filtered=counts.as_dict, **shard_options)
  from charred.datasets import languages  # pylint: disable=g-import-not-at-top
  # A census of the filtered examples' languages; its filter counts are the manifest's
  # (the mixture re-reads the source once per language).
  census = collections.Counter()
  for ex in shard_inputs.iter_task_examples(task, split):
    census[languages.resolve_language(ex.get("language", b""), ex["caption"])] += 1
  filtered = counts.as_dict()
  rates = languages.register_rebalanced_mixture(f"{task}_balanced", task, census,
                                                num_examples=rebalance,
                                                max_repeat=max_repeat, split=split)
  described["languages"] = dict(counts=dict(sorted(census.items())), rates=rates)
  draws = itertools.islice(
      shard_inputs.iter_task_examples(f"{task}_balanced", split, num_epochs=None),
                           rebalance)
  return _write(draws, out, split, described, filtered=lambda: filtered, **shard_options)


def _describe(builder_name: str, builder) -> dict[str, Any]:
  return dict(builder=builder_name, name=builder.name,
              config=builder.builder_config.name if builder.builder_config else None,
              version=str(builder.version), data_dir=str(builder.data_dir))


def _beam_options(runner: str | None, options: str | None):
  """Beam PipelineOptions for `--runner` (None without one; a one-line error without Beam)."""
  if not runner:
    if options:
      raise ValueError("--beam_pipeline_options needs --runner.")
    return None
  from charred.datasets import prepare_beam  # pylint: disable=g-import-not-at-top
  return prepare_beam.pipeline_options(runner, options)


def _shard_split_name(split: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_")


def _write(examples, out: str, split: str, source: dict[str, Any], *,
           record_format: str = "array_record", settings: jxl_shards.JxlSettings | None = None,
           examples_per_shard: int = 1000, max_pixels: int | None = None,
           num_workers: int | None = None, overwrite: bool = False,
           filtered=None) -> dict[str, Any]:
  return jxl_shards.write_shards(
      examples, out, settings=settings or jxl_shards.JxlSettings(),
      record_format=record_format, examples_per_shard=examples_per_shard,
      split=_shard_split_name(split), source=source,
      max_pixels=max_pixels, num_workers=num_workers, overwrite=overwrite,
      log=lambda line: print(line, flush=True), filtered=filtered)


def _write_beam(read, builder, options, out: str, split: str, source: dict[str, Any], *,
                record_format: str = "array_record",
                settings: jxl_shards.JxlSettings | None = None, examples_per_shard: int = 1000,
                max_pixels: int | None = None, num_workers: int | None = None,
                overwrite: bool = False) -> dict[str, Any]:
  """`_write` as a Beam pipeline: `read(sub_split)` runs on the workers, over contiguous
  chunks of `split`; `num_workers` is then the encoder threads per Beam worker (1)."""
  from charred.datasets import prepare_beam  # pylint: disable=g-import-not-at-top
  sub_splits = prepare_beam.chunk_splits(
      split, builder.info.splits,
      prepare_beam.CHUNKS_PER_WORKER * prepare_beam.num_workers_of(options))
  return prepare_beam.write_shards(
      read, sub_splits, out, options, settings=settings or jxl_shards.JxlSettings(),
      record_format=record_format, examples_per_shard=examples_per_shard,
      split=_shard_split_name(split), source=source, max_pixels=max_pixels,
      threads=num_workers or 1, overwrite=overwrite)


def prepare(builder_name: str, split: str, out: str, *, data_dir: str | None = None,
            manual_dir: str | None = None, record_format: str = "array_record",
            settings: jxl_shards.JxlSettings | None = None,
            examples_per_shard: int = 1000, max_pixels: int | None = None,
            num_workers: int | None = None, overwrite: bool = False,
            runner: str | None = None, beam_options: str | None = None) -> dict[str, Any]:
  """Writes `builder_name`'s `split` as JPEG XL shards into `out`; returns the manifest.

  With `runner` ('direct', 'DataflowRunner', ...; `beam_options` 'key=value,...'), the
  builder's generation and the writing run as Beam pipelines (`prepare_beam`): the same
  shards and manifest.
  """
  jxl_shards.check_output_dir(out, overwrite)
  options = _beam_options(runner, beam_options)
  builder = shard_inputs.load_builder(builder_name, data_dir, manual_dir, options)
  shard_options = dict(record_format=record_format, settings=settings,
                       examples_per_shard=examples_per_shard, max_pixels=max_pixels,
                       num_workers=num_workers, overwrite=overwrite)
  described = _describe(builder_name, builder)
  if options is not None:
    from charred.datasets import prepare_beam  # pylint: disable=g-import-not-at-top
    read = functools.partial(prepare_beam.read_builder_chunk, builder_name=builder_name,
                             data_dir=data_dir)
    return _write_beam(read, builder, options, out, split, described, **shard_options)
  return _write(shard_inputs.iter_examples(builder, split), out, split, described,
                **shard_options)


if __name__ == "__main__":
  # `python -m charred.datasets.prepare` is `python -m charred.prepare` by another name.
  runpy.run_module("charred.prepare", run_name="__main__", alter_sys=True)
