"""The trainer checkpoints and restores a bucketed iterator's state (partial buckets
included): a run resumed from a checkpoint equals the uninterrupted run."""

import os
import shutil

import jax
import numpy as np
import pytest

from charred.datasets import bucketing, jxl_shards
from charred.models.diffusion_model import DiffusionModel, ObjectiveConfig
from charred.trainers import monitoring, trainer
from charred.trainers.checkpoints import CheckpointConfig
from charred.trainers.optimizer import OptimizerConfig
from test_trainer import micro_model

pytestmark = pytest.mark.slow

# Images 16 wide and 8 high go to the (24, 8) bucket; captions of up to 7 bytes to text
# length 8, longer ones to 16: two buckets that fill at different rates, so checkpoints
# fall while a bucket holds a partial batch.
BUCKETS = bucketing.BucketConfig(base_resolution=16, step=8, min_side=8, max_side=32,
                                 text_lengths=(8, 16))


def _write_shards(out_dir):
  rng = np.random.default_rng(0)
  examples = [dict(key=f'{i:03d}', caption=('ab' if i % 3 else 'a longer one') + str(i),
                   image=(rng.random((8, 16, 3)) * 255).astype(np.uint8)) for i in range(40)]
  jxl_shards.write_shards(examples, out_dir, settings=jxl_shards.JxlSettings(lossless=True),
                          examples_per_shard=16)


def test_resume_restores_the_bucketed_iterator_exactly(tmp_path):
  shards = str(tmp_path / 'shards')
  _write_shards(shards)
  config = trainer.TrainConfig(train_steps=8, batch_size=4, checkpointing=CheckpointConfig(
                                   every=3, keep=None, asynchronous=False), log_every=100,
                               optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1),
                               monitoring=monitoring.MonitoringConfig(tensorboard=False,
                                                                      count_flops=False))

  def batches():
    return bucketing.BucketedBatches(shards, 4, BUCKETS, seed=3, num_threads=1,
                                     process_index=0, process_count=1)

  straight = trainer.train(str(tmp_path / 'straight'), DiffusionModel(micro_model()), config,
                           batches, log=lambda s: None)
  # The same run, resumed from its step-3 checkpoint.
  resumed_dir = tmp_path / 'resumed'
  os.makedirs(resumed_dir / 'checkpoints')
  shutil.copytree(tmp_path / 'straight' / 'checkpoints' / '3',
                  resumed_dir / 'checkpoints' / '3')
  probe = bucketing.BucketedBatches(shards, 4, BUCKETS, seed=3, num_threads=1,
                                    process_index=0, process_count=1)
  for _ in range(3):
    next(probe)
  assert probe.get_state() != batches().get_state()  # else the test proves nothing
  logs = []
  resumed = trainer.train(str(resumed_dir), DiffusionModel(micro_model()), config, batches,
                          log=logs.append)
  assert any(line.startswith('Resumed from step 3') for line in logs), logs
  assert int(resumed.step) == int(straight.step) == 8
  for a, b in zip(jax.tree_util.tree_leaves((straight.params, straight.opt_state)),
                  jax.tree_util.tree_leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_main_reads_shards_in_buckets_when_configured(tmp_path):
  from charred import main  # pylint: disable=g-import-not-at-top
  from charred.configs.experiment import DataConfig  # pylint: disable=g-import-not-at-top
  shards = str(tmp_path / 'shards')
  _write_shards(shards)
  train = trainer.TrainConfig(train_steps=8, batch_size=8)
  data = DataConfig(shards=shards, buckets=BUCKETS)
  # Process 1 of 2 reads rows 4..7 of every global batch of 8.
  objective = ObjectiveConfig()
  batches, empty_context = main.make_batches(data, micro_model(), objective, train, 1, 2,
                                             make_iterator=None, codec=None)
  assert empty_context is None
  it = batches()
  whole = bucketing.BucketedBatches(shards, 8, BUCKETS, seed=0, process_index=0,
                                    process_count=1)
  for _ in range(3):
    mine, everything = next(it), next(whole)
    np.testing.assert_array_equal(mine['image'], everything['image'][4:])
    assert list(mine['caption']) == list(everything['caption'][4:])
  too_long = DataConfig(shards=shards, buckets=bucketing.BucketConfig(text_lengths=(64,)))
  with pytest.raises(ValueError, match='text_length'):
    main.make_batches(too_long, micro_model(), objective, train, 0, 1, make_iterator=None,
                      codec=None)
