r"""Trains a charred model from gin files.

  python -m charred.main --gin_file=gin/experiments/typography_tiny.gin --workdir=DIR \
      [--gin_file=...] [--gin_bindings='NAME=VALUE'] [--gin.NAME=VALUE]

Writes DIR/config.gin (the operative config), DIR/checkpoints/, TensorBoard events,
and DIR/samples/step_<N>.png (and DIR/wandb/, DIR/profile/ when configured); resumes from
the newest checkpoint in DIR.

Multi-process (one process per host, each seeing its local devices): start the same
command on every host with --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I, or leave them out where jax.distributed finds them itself (mpirun, SLURM,
Kubernetes, Cloud TPU, or JAX_COORDINATOR_ADDRESS). `TrainConfig.batch_size` is global;
each host reads its rows of every batch. The mesh is `TrainConfig.partitioning`
(--gin.partitioning.PartitioningConfig.fsdp=8, ...).
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import gin

from charred.configs import gin_utils
from charred.configs.experiment import Experiment

DEFAULT_GIN_FILE = 'experiments/typography_tiny.gin'
_GIN_FILES = flags.DEFINE_multi_string('gin_file', [DEFAULT_GIN_FILE],
                                       'Gin files (repeatable), found in . or charred\'s gin/.')
_GIN_BINDINGS = flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings (repeatable).')
_WORKDIR = gin_utils.workdir_flag('Where checkpoints, logs and samples go.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process jobs: HOST:PORT of process 0 (default: '
    'JAX_COORDINATOR_ADDRESS, or what jax.distributed detects).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Multi-process jobs: how many processes in all.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Multi-process jobs: this process, 0 .. num_processes-1.')


def load_experiment(gin_files, gin_bindings=()) -> Experiment:
  """Parses gin and builds the bound `Experiment`."""
  gin_utils.parse(gin_files, gin_bindings)
  return gin.get_configurable(Experiment)()


def check_writable(workdir: str) -> None:
  """Fails early, before anything is written, if `workdir` cannot hold our files."""
  os.makedirs(workdir, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_test'):
    pass


def write_config(workdir: str) -> None:
  """Writes the operative gin config to workdir/config.gin, keeping a differing old one."""
  path = os.path.join(workdir, 'config.gin')
  text = gin.operative_config_str()
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return
    n = 1
    while os.path.exists(f'{path}.{n}'):
      n += 1
    os.replace(path, f'{path}.{n}')
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def make_batches(data, model, objective, train, shard_index: int, shard_count: int,
                 make_iterator, codec, init=None):
  """(() -> this process's training batches, the empty caption's cached hidden
  states or None), from the typography task (`make_iterator`), JPEG XL shards in buckets,
  or an encoder cache (of fixed-size examples, or of shards in `data.buckets`), as `data`
  says."""
  rows = train.batch_size // shard_count
  if data.encoder_cache:  # cached encoder outputs instead of raw training data
    from charred.datasets import encoder_cache  # pylint: disable=g-import-not-at-top
    cache = encoder_cache.open_cache(data.encoder_cache)
    encoder = encoder_cache.initial_text_encoder_params(model, train.seed, codec, init)
    if isinstance(cache, encoder_cache.BucketedEncoderCache):  # web shards, in buckets
      cache.check_model(model, objective, train, encoder, codec, data.buckets)
      return (lambda: cache.batches(rows, seed=data.seed, process_index=shard_index,
                                    process_count=shard_count)), cache.empty_context
    cache.check_model(model, objective, train, encoder, codec)
    return (lambda: cache.batches(rows, seed=data.seed, shard_index=shard_index,
                                  shard_count=shard_count)), cache.empty_context
  if data.shards:
    from charred.datasets import bucketing  # pylint: disable=g-import-not-at-top
    data.buckets.check_text_length(model.text_length)
    return (lambda: bucketing.BucketedBatches(
        data.shards, rows, data.buckets, seed=data.seed, process_index=shard_index,
        process_count=shard_count)), None
  return (lambda: make_iterator(rows, model.text_length, seed=data.seed,
                                shard_index=shard_index, shard_count=shard_count)), None


def setup(workdir: str, experiment: Experiment):
  """Everything before the first step: the data prepared, the codec read, the training
  batches, the model and its evaluators. Writes nothing into `workdir`, so a refused run
  (bad data, a VAE that does not load, a cache for other weights) leaves no trace there.
  Returns (model, batches, evaluators)."""
  from charred.configs import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from charred.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  from charred.trainers import distributed  # pylint: disable=g-import-not-at-top
  from charred.trainers import partitioning  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  data, model, train = experiment.data, experiment.model, experiment.train
  collectives = train.partitioning.collectives
  distributed.check_collectives(collectives)
  # Process 0 generates the data first; the others then find it prepared (a shared
  # data_dir) or generate their own copy. (The rendered source needs nothing prepared.)
  if jax.process_index() == 0:
    experiment_lib.prepare(data)
  distributed.barrier('charred.main:prepare', collectives)
  experiment_lib.prepare(data)
  # This process's rows of every global batch (see partitioning.process_batch_shard).
  shard_index, shard_count = partitioning.process_batch_shard(partitioning.batch_sharding(
      partitioning.make_mesh(train.partitioning), train.partitioning.rules))
  text_tokenizer = model.text_tokenizer()

  def make_iterator(batch_size, text_length, **kwargs):
    return experiment_lib.typography_batches(data, 'train', batch_size, text_length,
                                             tokenizer=text_tokenizer, **kwargs)

  codec = experiment_lib.build_codec(experiment)  # the one VAE load
  batches, empty_context = make_batches(data, model, experiment.objective, train, shard_index,
                                        shard_count, make_iterator=make_iterator, codec=codec,
                                        init=experiment.init)
  diffusion_model = experiment_lib.build_model(experiment, codec, empty_context)
  # Each on its own cadence, built on first use: one that never runs reads no data.
  periodic = evaluators.periodic(experiment.evaluators, diffusion_model,
                                 experiment_lib.eval_data(experiment), workdir)
  return diffusion_model, batches, periodic


def run_training(workdir: str, experiment: Experiment, model, batches, periodic) -> bool:
  """Writes the run's records (config.gin, charred_run.json) and trains what `setup`
  built; True when the run reached train_steps, False when a SIGTERM stopped it."""
  from charred.models import pretrained  # pylint: disable=g-import-not-at-top
  from charred.trainers import trainer  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    write_config(workdir)
    # load_pretrained(workdir) reads the weights with neither gin nor the trainer.
    pretrained.write_run_model(workdir, experiment.model, experiment.init)
  state = trainer.train(workdir, model, experiment.train, batches, evaluators=periodic,
                        init=experiment.init)
  return int(state.step) >= experiment.train.train_steps


# The shell's code for "terminated by SIGTERM": schedulers (SLURM, Kubernetes, XManager)
# then know the job was preempted, not finished, and start it again to resume.
EXIT_PREEMPTED = 128 + 15


def main(argv):
  # Orbax narrates every save at INFO; keep the console to progress lines (-v 0 for all).
  if logging.get_verbosity() == logging.INFO and not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    gin_utils.exit_with_error('charred.main', ValueError('--workdir is required.'))
  try:
    experiment = load_experiment(_GIN_FILES.value, _GIN_BINDINGS.value)
  except (ValueError, OSError, TypeError, SyntaxError) as e:
    gin_utils.exit_with_error('charred.main', e)
  try:
    check_writable(_WORKDIR.value)
  except OSError as e:
    gin_utils.exit_with_error('charred.main', OSError(
        f'workdir {_WORKDIR.value!r} is not writable: {e.strerror or e}'))
  from charred.trainers import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except (ValueError, RuntimeError) as e:
    gin_utils.exit_with_error('charred.main', e)
  try:
    model, batches, periodic = setup(_WORKDIR.value, experiment)
  except (ValueError, OSError) as e:  # bad data or weights: one line, nothing written
    gin_utils.exit_with_error('charred.main', e)
  if not run_training(_WORKDIR.value, experiment, model, batches, periodic):
    sys.exit(EXIT_PREEMPTED)


if __name__ == '__main__':
  sys.argv = gin_utils.rewrite_gin_shorthand(sys.argv)
  app.run(main)
