r"""Writes a TFDS split, or a web source through its quality filters, as JPEG XL shards +
manifest: the command over `charred.datasets.prepare`, whose docstring says what is
written and how.

  python -m charred.prepare --builder=NAME[/CONFIG] --split=train --out=DIR \
      [--data_dir=...] [--manual_dir=...] [--format=array_record|tfrecord] \
      [--quality=<distance>|q<quality>|lossless] [--effort=3] [--decoding_speed=2] \
      [--examples_per_shard=N] [--max_pixels=N] [--num_workers=N] [--overwrite]
  python -m charred.prepare --task=laion_hr|wit [--filters=a,b,...] --out=DIR ...
  ... [--runner=direct|DataflowRunner|... [--beam_pipeline_options=key=value,...]]

`--runner` runs the preparation as Apache Beam pipelines (`pip install 'charred[beam]'`).
`--task` reads a web source through its quality filters (`--filters=` for none);
`--rebalance=N [--max_repeat=R]` then writes N examples drawn with languages at mT5's
distribution. `--split` takes TFDS slicing (`train[:1000]`). DIR must not exist or be
empty unless --overwrite (which deletes it).
"""
from __future__ import annotations

import sys
import time

from absl import app
from absl import flags
from absl import logging

from charred.datasets import jxl_shards
from charred.datasets import prepare

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when the command runs, so that this module imports beside the other
  commands, which define some of the same names."""
  flags.DEFINE_string("builder", None, "TFDS builder NAME[/CONFIG][:VERSION].")
  flags.DEFINE_string("task", None, "A web source read through its quality-filtered "
                      "SeqIO task: laion_hr or wit (instead of --builder).")
  flags.DEFINE_list("filters", None, "With --task: the quality filters, in order "
                    "(default: source_tasks.DEFAULT_FILTERS; empty for none).")
  flags.DEFINE_multi_string(
      "filter_args", [], "With --task: FILTER.PARAMETER=VALUE, a filter's parameter other "
      "than its default, e.g. aesthetic.min_score=6.5 (repeatable).")
  flags.DEFINE_integer("rebalance", None, "With --task: write this many examples "
                       "drawn with languages at mT5's distribution.")
  flags.DEFINE_float("max_repeat", None, "With --rebalance: read no language "
                     "more than this many times.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
  flags.DEFINE_string("manual_dir", None, "Local source files of the builder.")
  flags.DEFINE_string("split", "train", "Split, with TFDS slicing if wanted.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_enum("format", "array_record", list(jxl_shards.FORMATS),
                    "Record file format.")
  flags.DEFINE_string("quality", "1.0",
                      "'lossless', a Butteraugli distance (1.0, d1.0) or a "
                      "libjxl quality (q90).")
  flags.DEFINE_integer("effort", jxl_shards.JxlSettings.effort, "libjxl effort 1-9.")
  flags.DEFINE_integer("decoding_speed", jxl_shards.JxlSettings.decoding_speed,
                       "libjxl decoding speed tier 0-4.")
  flags.DEFINE_integer("examples_per_shard", 1000, "Records per shard.")
  flags.DEFINE_integer("max_pixels", None,
                       "Downscale larger images to this many pixels.")
  flags.DEFINE_integer("num_workers", None, "Encoder threads (all cores).")
  flags.DEFINE_bool("overwrite", False, "Delete and replace an existing --out.")
  flags.DEFINE_string("runner", None, "Run as an Apache Beam pipeline on this runner: "
                      "'direct' (DirectRunner, one process per core), "
                      "DataflowRunner, FlinkRunner, ... (needs charred[beam]). "
                      "The builder is then generated through Beam too.")
  flags.DEFINE_string("beam_pipeline_options", None, "With --runner: Beam "
                      "pipeline options, 'key=value,key=value' (as tfds build "
                      "takes them).")


def main(argv):
  prog = "python -m charred.prepare"
  logging.set_verbosity(logging.ERROR)  # TFDS logs every dataset it constructs.
  if len(argv) > 1:
    sys.exit(f"{prog}: error: unexpected arguments {argv[1:]}")
  start = time.time()
  try:
    if bool(FLAGS.builder) == bool(FLAGS.task) or not FLAGS.out:
      raise ValueError("--out and exactly one of --builder or --task are required.")
    if ((FLAGS.filters is not None or FLAGS.filter_args or FLAGS.rebalance)
        and not FLAGS.task):
      raise ValueError("--filters, --filter_args and --rebalance apply to --task only (a "
                       "builder is read as stored).")
    settings = jxl_shards.JxlSettings.parse(FLAGS.quality, effort=FLAGS.effort,
                                            decoding_speed=FLAGS.decoding_speed)
    options = dict(data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                   record_format=FLAGS.format, settings=settings,
                   examples_per_shard=FLAGS.examples_per_shard, max_pixels=FLAGS.max_pixels,
                   num_workers=FLAGS.num_workers, overwrite=FLAGS.overwrite,
                   runner=FLAGS.runner, beam_options=FLAGS.beam_pipeline_options)
    if FLAGS.task:
      from charred.datasets import source_tasks  # pylint: disable=g-import-not-at-top
      manifest = prepare.prepare_task(FLAGS.task, FLAGS.split, FLAGS.out,
                                      filter_names=FLAGS.filters,
                                      filter_args=source_tasks.parse_filter_args(
                                          FLAGS.filter_args),
                                      rebalance=FLAGS.rebalance,
                                      max_repeat=FLAGS.max_repeat, **options)
    else:
      manifest = prepare.prepare(FLAGS.builder, FLAGS.split, FLAGS.out, **options)
  except (ValueError, OSError) as e:
    from charred.configs import gin_utils  # pylint: disable=g-import-not-at-top
    gin_utils.exit_with_error(prog, e)
  skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
  dropped = {f"{name}/{reason}": n for name, outcomes in manifest["filtered"].items()
             for reason, n in outcomes.items() if reason != "kept" and n}
  if manifest["filtered"]:
    skipped += "; filtered: " + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none")
  print(f"{manifest['num_records']} records in {len(manifest['shards'])} shards, "
        f"{manifest['total_bytes']:,} bytes -> {FLAGS.out} (skipped: {skipped}; "
        f"{time.time() - start:.1f} s)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
