"""sha256 of the whole train state after 20 steps of `trainer.train` on micro configs, one
line per config: run it before and after a refactor that must not change training
(`PYTHONPATH=. python tests/train_digest.py`) and compare the lines. A digest, not a
golden value in a test: bits differ across XLA versions and CPUs."""

import dataclasses
import hashlib
import sys
import tempfile

import jax
import numpy as np

from charred.models.diffusion_model import DiffusionModel, ObjectiveConfig
from charred.trainers import trainer
from charred.trainers.optimizer import OptimizerConfig
from conftest import repeated_batches
from test_trainer import fixed_batch, micro_model


def digest(state) -> str:
  """sha256 over every leaf's dtype, shape and bytes, in tree order."""
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(state):
    x = np.asarray(leaf)
    h.update(f'{x.dtype}{x.shape}'.encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def varying_batches():
  """A different batch every step (seeded), so that the data position matters."""
  def start(k):
    rng = np.random.default_rng(0)
    for _ in range(k):
      rng.standard_normal()
    while True:
      batch = fixed_batch()
      batch['image'] = np.clip(batch['image'] + 0.1 * rng.standard_normal(
          batch['image'].shape), -1, 1).astype(np.float32)
      yield batch
  from charred.datasets import streams  # pylint: disable=g-import-not-at-top
  return lambda: streams.RestartableIterator(start)


def runs():
  """name -> (model, TrainConfig, batches)."""
  config = trainer.TrainConfig(train_steps=20, batch_size=8, log_every=10,
                               optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2))
  frozen = ObjectiveConfig(train_text_encoder=False, caption_dropout=0.5)
  context = np.random.default_rng(1).standard_normal((8, 16, 32)).astype(np.float32)
  empty = np.random.default_rng(2).standard_normal((16, 32)).astype(np.float32)
  return {
      'default': (DiffusionModel(micro_model()), config, varying_batches()),
      'accumulate_host_encoder': (
          DiffusionModel(micro_model(), frozen),
          dataclasses.replace(config, accumulation_steps=2, text_encoder_on_host=True),
          repeated_batches(fixed_batch)),
      'cached_context': (
          DiffusionModel(micro_model('epsilon'), frozen, empty_context=empty), config,
          repeated_batches(lambda: dict(fixed_batch(), text_context=context))),
  }


def main(names):
  for name, (model, config, batches) in runs().items():
    if names and name not in names:
      continue
    with tempfile.TemporaryDirectory() as workdir:
      state = trainer.train(workdir, model, config, batches, log=lambda s: None)
    print(name, int(state.step), digest(state), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
