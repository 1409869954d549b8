r"""Writes an encoder-output cache (charred.datasets.encoder_cache): the frozen text encoder
and VAE run over a dataset once.

  python -m charred.cache_encoder --gin_file=EXPERIMENT.gin [--gin.NAME=VALUE] \
      --out=DIR [--task=NAME] [--split=train] [--examples_per_shard=1000] \
      [--batch_size=32] [--overwrite]
  python -m charred.cache_encoder --workdir=RUN --out=DIR ...
  python -m charred.cache_encoder --gin_file=EXPERIMENT.gin --shards=SHARDS --out=DIR

The model comes from the experiment's gin files (its text encoder as a run starts from
it: `pretrained.InitConfig.text_encoder`, or the seeded random init; the VAE from
`InitConfig.autoencoder`), or from a training run's workdir (its config.gin and the text
encoder of its newest checkpoint). `--task` defaults to the experiment's typography task;
its images must already have the model's image size. Train on the output with
`experiment.DataConfig.encoder_cache = 'DIR'` (the text encoder must be frozen).

`--shards` reads prepared JPEG XL shards (`python -m charred.prepare`) instead
of a task: every record at the size of its aspect bucket (the experiment's
`DataConfig.buckets`, which training must then use too), as the bucketed reader decodes
it (encoder_cache_shards_tiny.gin). The output appears only when complete.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from charred.configs import gin_utils

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when the command runs, so that this module imports beside charred.main
  and charred.evaluate (which define some of the same names)."""
  flags.DEFINE_multi_string('gin_file', [], 'Experiment gin files (repeatable).')
  flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings (repeatable).')
  flags.DEFINE_string('workdir', None, 'A training run: its config.gin and the text encoder '
                      'of its newest checkpoint (instead of --gin_file).')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_string('task', None, "SeqIO task (default: the experiment's typography task).")
  flags.DEFINE_string('shards', None, 'Prepared JPEG XL shards to cache in the experiment\'s '
                      'DataConfig.buckets (instead of a task).')
  flags.DEFINE_string('split', 'train', 'Split.')
  flags.DEFINE_integer('examples_per_shard', 1000, 'Records per shard.')
  flags.DEFINE_integer('batch_size', 32, 'Examples per encoder call.')
  flags.DEFINE_bool('overwrite', False, 'Delete and replace an existing --out.')


def main(argv) -> None:
  # Imported after flag parsing so that --help is fast.
  import gin  # pylint: disable=g-import-not-at-top
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  from charred.datasets.encoder_cache import (  # pylint: disable=g-import-not-at-top
      initial_text_encoder_params, task_examples, write_bucketed_cache, write_cache)
  prog = 'charred.cache_encoder'
  flags = FLAGS
  try:
    if len(argv) > 1:
      raise ValueError(f'unexpected arguments: {argv[1:]}')
    if not flags.out or bool(flags.workdir) == bool(flags.gin_file):
      raise ValueError('needs --out and exactly one of --workdir or --gin_file.')
    if flags.shards and flags.task:
      raise ValueError('give --shards or --task, not both.')
    if flags.workdir:
      from charred.configs import runs  # pylint: disable=g-import-not-at-top
      run = runs.load_run(flags.workdir)
      experiment, encoder_params = run.experiment, run.state.params['text_encoder']
      codec = run.model.codec
    else:
      from charred.configs import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
      gin_utils.parse(flags.gin_file, flags.gin_bindings)
      experiment = gin.get_configurable(experiment_lib.Experiment)()
      codec = experiment_lib.build_codec(experiment)
      encoder_params = initial_text_encoder_params(experiment.model, experiment.train.seed,
                                                   codec, experiment.init)
    if experiment.objective.train_text_encoder:
      raise ValueError('the experiment trains its text encoder (ObjectiveConfig.'
                       'train_text_encoder=True): cached hidden states would go stale.')
    if flags.shards:
      print(f'Encoding {flags.shards} in buckets into {flags.out} ...', flush=True)
      manifest = write_bucketed_cache(
          flags.shards, flags.out, experiment.model, encoder_params, codec,
          buckets=experiment.data.buckets, examples_per_shard=flags.examples_per_shard,
          batch_size=flags.batch_size, overwrite=flags.overwrite, log=print)
      print(f'{manifest["num_records"]} records in {sum(map(bool, manifest["bucket_counts"]))}'
            f' buckets, {manifest["total_bytes"]:,} bytes; skipped '
            f'{manifest["skipped"] or "none"}.')
      return
    task = flags.task
    if not task:
      pipeline.prepare(experiment.data.builder_config, experiment.data.data_dir)
      task = pipeline.register_task(experiment.data.builder_config, experiment.data.data_dir)
    print(f'Encoding {task}:{flags.split} into {flags.out} ...', flush=True)
    manifest = write_cache(
        task_examples(task, flags.split, experiment.model.text_length), flags.out,
        experiment.model, encoder_params, codec, split=flags.split,
        source=dict(task=task, workdir=flags.workdir, gin_file=flags.gin_file),
        examples_per_shard=flags.examples_per_shard, batch_size=flags.batch_size,
        overwrite=flags.overwrite, log=print)
  except (ValueError, OSError, KeyError) as e:
    gin_utils.exit_with_error(prog, e)
  print(f'{manifest["num_records"]} records, {manifest["total_bytes"]:,} bytes; skipped '
        f'{manifest["skipped"] or "none"}.')


if __name__ == '__main__':
  define_flags()
  sys.argv = gin_utils.rewrite_gin_shorthand(sys.argv)
  app.run(main)
