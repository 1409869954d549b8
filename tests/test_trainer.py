"""The train step learns, the optimizer honours freezing, EMA warms up."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from charred import tokenizer
from charred.models import diffusion
from charred.models.diffusion_model import DiffusionModel, ObjectiveConfig
from charred.models.t5_encoder import T5EncoderConfig
from charred.models.text_to_image import TextToImageConfig
from charred.models.unet import UNetConfig
from charred.trainers import trainer
from charred.trainers.optimizer import OptimizerConfig
from charred.trainers.train_state import ema_update
from conftest import repeated_batches


def micro_model(prediction_type='sample'):
  return TextToImageConfig(
      text_encoder=T5EncoderConfig(d_model=32, num_heads=2, head_dim=16, num_layers=1, d_ff=64),
      unet=UNetConfig(in_channels=12, out_channels=12, block_out_channels=(16, 32),
                      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1,
                      attention_head_dim=(1, 2), cross_attention_dim=32, norm_num_groups=8,
                      upcast_attention=False),
      noise_schedule=diffusion.NoiseSchedule('cosine'), prediction_type=prediction_type,
      text_length=16, image_size=(8, 16), patch_size=2)


def fixed_batch(n=8):
  rng = np.random.default_rng(0)
  tokens, mask = tokenizer.encode_batch([f'word{i}' for i in range(n)], 16)
  images = np.where(rng.random((n, 8, 16, 1)) > 0.5, 0.8, -0.8) * np.ones((1, 1, 1, 3))
  return {'image': images.astype(np.float32), 'text_tokens': tokens, 'text_mask': mask}


def test_twenty_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
  model_config = micro_model()
  config = trainer.TrainConfig(train_steps=20, batch_size=8,
                               optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
                               log_every=10)
  batch = fixed_batch()
  model = DiffusionModel(model_config, ObjectiveConfig(caption_dropout=0.0))
  # The loss over many fixed (t, noise) draws, so that one lucky draw cannot pass the test.
  loss = jax.jit(lambda p: jnp.mean(jax.vmap(
      lambda k: model.loss_fn(p, batch, k)[0])(jax.random.split(jax.random.PRNGKey(7), 16))))
  initial = trainer.create_state(model, config, trainer.make_tx(config))
  before = float(loss(initial.params))
  final = trainer.train(str(tmp_path), model, config,
                        repeated_batches(lambda: batch), log=lambda s: None)
  after = float(loss(final.params))
  assert int(final.step) == 20
  assert after < 0.7 * before, (before, after)


def test_frozen_text_encoder_does_not_move(tmp_path):
  model_config = micro_model()
  config = trainer.TrainConfig(train_steps=3, batch_size=8,
                               optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1))
  model = DiffusionModel(model_config, ObjectiveConfig(train_text_encoder=False))
  tx = trainer.make_tx(config, model.frozen)
  state = trainer.create_state(model, config, tx)
  step = jax.jit(functools.partial(trainer.train_step, model=model, config=config, tx=tx))
  new, _ = step(state, fixed_batch(), jax.random.PRNGKey(0))  # warm-up: learning rate 0
  new, _ = step(new, fixed_batch(), jax.random.PRNGKey(0))
  same = jax.tree_util.tree_map(np.array_equal, state.params['text_encoder'],
                                new.params['text_encoder'])
  assert all(jax.tree_util.tree_leaves(same))
  moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), state.params['unet'],
                                 new.params['unet'])
  assert any(jax.tree_util.tree_leaves(moved))


def test_ema_update_closed_form():
  ema, params = {'w': jnp.array([0.0])}, {'w': jnp.array([1.0])}
  # step 0: decay = min(0.999, 1/10) = 0.1 -> 0.1 * 0 + 0.9 * 1
  np.testing.assert_allclose(ema_update(ema, params, 0, 0.999)['w'], [0.9], rtol=1e-6)
  # late: decay capped at 0.999
  np.testing.assert_allclose(ema_update(ema, params, 10**6, 0.999)['w'], [0.001], rtol=1e-4)


def test_batches_must_be_checkpointable_and_resume_from_their_state(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from charred.datasets import streams  # pylint: disable=g-import-not-at-top
  from charred.trainers import checkpoints  # pylint: disable=g-import-not-at-top
  model = DiffusionModel(micro_model())
  config = trainer.TrainConfig(train_steps=3, batch_size=8, log_every=100)
  with pytest.raises(TypeError, match='cannot be checkpointed'):
    trainer.train(str(tmp_path / 'plain'), model, config, lambda: iter([fixed_batch()] * 3),
                  log=lambda s: None)
  # A checkpoint at step 2: the stream restarts from the iterator state it saved.
  workdir = tmp_path / 'resumed'
  tx = trainer.make_tx(config)
  ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  ckpt.save(trainer.create_state(model, config, tx).replace(step=2),
            {'position': 2, 'iterator': {'next_index': 2}}, step=2)
  ckpt.close()
  started = []

  def start(k):
    started.append(k)
    while True:
      yield fixed_batch()
  state = trainer.train(str(workdir), model, config, lambda: streams.RestartableIterator(start),
                        log=lambda s: None)
  assert int(state.step) == 3 and started == [2]
  _, data = checkpoints.Checkpointer(str(workdir / 'checkpoints')).restore(
      trainer.abstract_state(model, config, tx))
  assert data == {'position': 3, 'iterator': {'next_index': 3}}
