r"""`prepare` as an Apache Beam pipeline: the same shards and manifest, from many workers.

  pip install 'charred[beam]'
  python -m charred.prepare --builder=laion_hr/unfiltered --manual_dir=DIR \
      --out=OUT --runner=direct                      # DirectRunner, one process per core
  python -m charred.prepare ... --runner=DataflowRunner \
      --beam_pipeline_options=project=P,region=R,temp_location=gs://B/tmp

Why it gives the same output as the single-process writer (`jxl_shards.write_shards`): the
input split is cut into contiguous chunks read in parallel; each worker encodes its chunk
(`jxl_shards.encode_examples`) into a part file and reports its counts; one small step lays
the kept records out into shards of `examples_per_shard` in input order, exactly as the
single-process writer packs them; workers then write each shard through
`jxl_shards.write_records`. Same keys, pixels, shard boundaries and skip counts.

Failure: everything is written under a temporary sibling of `--out`; the manifest is
written by a step that depends on every shard, and the directory is renamed to `--out`
only after the pipeline succeeded. A worker that fails leaves no `--out` and no manifest
(the temporary directory is removed).

Another runner needs `--out` (and the TFDS data_dir) on a filesystem all its workers
share; only the DirectRunner is tested here.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import shutil
import struct
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

from charred.datasets import jxl_shards
from charred.datasets import shard_inputs

INSTALL_HINT = "pip install 'charred[beam]'"
_PARTS = "parts"
_LENGTH = struct.Struct("<Q")
# Chunks per worker at least: a slow chunk then delays the end less.
CHUNKS_PER_WORKER = 4


def import_beam():
  """apache_beam, or a one-line error saying how to install it."""
  try:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"--runner needs Apache Beam, which is not installed: {INSTALL_HINT}"
                     ) from None
  return beam


def pipeline_options(runner: str = "direct", options: str | None = None,
                     num_workers: int | None = None):
  """Beam PipelineOptions from `--runner` and TFDS-style `--beam_pipeline_options`
  ('key=value,key=value'). 'direct' is the DirectRunner in multi-process mode with one
  worker per core (what a local run wants), unless the options say otherwise."""
  beam = import_beam()
  extra = [o.strip() for o in (options or "").split(",") if o.strip()]
  runner = "DirectRunner" if runner.lower() in ("direct", "directrunner") else runner
  flags = [f"--runner={runner}", *(f"--{o}" for o in extra)]
  if runner == "DirectRunner":
    named = {o.split("=", 1)[0] for o in extra}
    if "direct_num_workers" not in named:
      flags.append(f"--direct_num_workers={num_workers or os.cpu_count() or 1}")
    if "direct_running_mode" not in named:
      flags.append("--direct_running_mode=multi_processing")
  return beam.options.pipeline_options.PipelineOptions(flags)


def num_workers_of(options) -> int:
  """Workers a pipeline runs on, as far as the options tell (for chunking the input)."""
  values = options.get_all_options()
  return int(values.get("direct_num_workers") or values.get("num_workers")
             or values.get("max_num_workers") or 1)


def chunk_splits(split: str, split_infos, num_chunks: int,
                 max_chunk: int = 10_000) -> list[str]:
  """`split` (TFDS slicing allowed, `a+b` too) as contiguous sub-splits 'name[from:to]' in
  order: read one after another they give `split`'s examples in its order. At least
  `num_chunks` of them, none over `max_chunk` examples."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  pieces = [(p.splitname, p.from_ or 0,  # None: the split's start or end
             split_infos[p.splitname].num_examples if p.to is None else p.to)
            for p in tfds.core.ReadInstruction.from_spec(split).to_absolute(split_infos)]
  total = sum(end - start for _, start, end in pieces)
  size = max(1, min(max_chunk, math.ceil(total / max(1, num_chunks))))
  return [f"{name}[{a}:{min(a + size, end)}]"
          for name, start, end in pieces for a in range(start, end, size)]


# Readers of one chunk, run on the workers: module-level so that Beam pickles them by name.


@functools.lru_cache(maxsize=None)
def _builder(builder_name: str, data_dir: str | None):
  shard_inputs.register_builder(builder_name)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(builder_name, data_dir=data_dir)


def read_builder_chunk(sub_split: str, builder_name: str, data_dir: str | None
                       ) -> tuple[Iterator[dict[str, Any]], Callable[[], dict[str, Any]]]:
  """(examples of a prepared builder's sub-split, no filter counts)."""
  return shard_inputs.iter_examples(_builder(builder_name, data_dir), sub_split), dict


def read_task_chunk(sub_split: str, source: str, filter_names: Sequence[str],
                    data_dir: str | None,
                    filter_args: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> tuple[Iterator[dict[str, Any]], Callable[[], dict[str, Any]]]:
  """(a web source's sub-split through its filters, that chunk's filter counts)."""
  from charred.datasets import filters, source_tasks  # pylint: disable=g-import-not-at-top
  counts = filters.FilterCounts()
  task = source_tasks.web_task(source, filter_names, data_dir, counts, filter_args)
  return shard_inputs.iter_task_examples(task, sub_split), counts.as_dict


# Pipeline steps.


def _part_path(tmp: str, chunk: int) -> str:
  return os.path.join(tmp, _PARTS, f"{chunk:06d}.msgpack")


def encode_chunk(item: tuple[int, str], tmp: str, read: Callable, settings, max_pixels,
                 threads: int) -> dict[str, Any]:
  """Encodes one chunk's examples into its part file (length-prefixed records, input
  order); returns the chunk's counts."""
  chunk, sub_split = item
  examples, filtered = read(sub_split)
  skipped, num_records = collections.Counter(), 0
  with open(_part_path(tmp, chunk), "wb") as f:
    for record in jxl_shards.encode_examples(examples, settings, max_pixels, threads, skipped):
      data = jxl_shards.serialize_record(record)
      f.write(_LENGTH.pack(len(data)) + data)
      num_records += 1
  return dict(chunk=chunk, num_read=num_records + sum(skipped.values()),
              num_records=num_records, skipped=dict(skipped), filtered=filtered())


def plan_shards(chunks: Sequence[dict[str, Any]], examples_per_shard: int
                ) -> Iterator[tuple[int, list[tuple[int, int, int]]]]:
  """(shard index, [(chunk, first record, end record), ...]): the kept records in input
  order, packed `examples_per_shard` to a shard as the single-process writer packs them."""
  shard, current, room = 0, [], examples_per_shard
  for c in sorted(chunks, key=lambda c: c["chunk"]):
    start = 0
    while start < c["num_records"]:
      take = min(room, c["num_records"] - start)
      current.append((c["chunk"], start, start + take))
      start, room = start + take, room - take
      if room == 0:
        yield shard, current
        shard, current, room = shard + 1, [], examples_per_shard
  if current:
    yield shard, current


def _read_part(path: str, start: int, end: int) -> Iterator[dict[str, Any]]:
  with open(path, "rb") as f:
    for i in range(end):
      (length,) = _LENGTH.unpack(f.read(_LENGTH.size))
      if i < start:
        f.seek(length, os.SEEK_CUR)
      else:
        yield jxl_shards.parse_record(f.read(length))


def write_shard(item: tuple[int, list[tuple[int, int, int]]], tmp: str, split: str,
                record_format: str) -> tuple[dict[str, Any], int]:
  index, slices = item
  records = (r for chunk, start, end in slices
             for r in _read_part(_part_path(tmp, chunk), start, end))
  return jxl_shards.write_records(records, tmp, split, index, record_format)


def merge_filtered(counts: Sequence[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
  """Per-chunk filter counts {filter: {outcome: n}} summed, in the filters' order."""
  total: dict[str, dict[str, int]] = {}
  for c in counts:
    for name, outcomes in c.items():
      into = total.setdefault(name, {})
      for outcome, n in outcomes.items():
        into[outcome] = into.get(outcome, 0) + n
  return total


def write_manifest(written: list[tuple[dict[str, Any], int]], chunks: list[dict[str, Any]],
                   tmp: str, **manifest_fields) -> None:
  """The last step: only runs once every shard is written."""
  shards = sorted(written, key=lambda w: w[0]["path"])
  manifest = jxl_shards.make_manifest(
      shards=[entry for entry, _ in shards], image_bytes=sum(n for _, n in shards),
      num_read=sum(c["num_read"] for c in chunks),
      skipped=jxl_shards.merge_skipped(*(c["skipped"] for c in chunks)),
      filtered=merge_filtered([c["filtered"] for c in chunks]), **manifest_fields)
  shutil.rmtree(os.path.join(tmp, _PARTS))
  jxl_shards.write_json_atomically(os.path.join(tmp, jxl_shards.MANIFEST), manifest)


def write_shards(read: Callable, sub_splits: Sequence[str], out: str, options, *,
                 settings: jxl_shards.JxlSettings = jxl_shards.JxlSettings(),
                 record_format: str = "array_record", examples_per_shard: int = 1000,
                 split: str = "train", source: dict[str, Any] | None = None,
                 max_pixels: int | None = None, threads: int = 1,
                 overwrite: bool = False) -> dict[str, Any]:
  """`jxl_shards.write_shards` as a Beam pipeline over the chunks `read(sub_split)` gives
  (`read` returns the examples and a callable of that chunk's filter counts)."""
  beam = import_beam()
  jxl_shards.check_write_options(record_format, examples_per_shard)
  jxl_shards.check_output_dir(out, overwrite)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.beam-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename.
  try:
    os.makedirs(os.path.join(tmp, _PARTS))
    with beam.Pipeline(options=options) as p:
      chunks = (p | "Chunks" >> beam.Create(list(enumerate(sub_splits)))
                | "Encode" >> beam.Map(encode_chunk, tmp=tmp, read=read, settings=settings,
                                       max_pixels=max_pixels, threads=threads))
      written = (chunks | "AllChunks" >> beam.combiners.ToList()
                 | "Plan" >> beam.FlatMap(plan_shards, examples_per_shard)
                 | "Spread" >> beam.Reshuffle()
                 | "Write" >> beam.Map(write_shard, tmp=tmp, split=split,
                                       record_format=record_format))
      _ = (written | "AllShards" >> beam.combiners.ToList()
           | "Manifest" >> beam.Map(write_manifest, chunks=beam.pvalue.AsList(chunks), tmp=tmp,
                                    settings=settings, record_format=record_format,
                                    split=split, source=source, max_pixels=max_pixels))
    manifest = jxl_shards.read_manifest(tmp)
    if os.path.exists(out):  # Only --overwrite gets here; the manifest goes first.
      jxl_shards.prepare_output_dir(out, overwrite=True)
      os.rmdir(out)
    os.replace(tmp, out)
    return manifest
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
