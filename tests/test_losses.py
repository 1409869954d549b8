"""Min-SNR weights and offset noise against their definitions; the loss in bf16 compute and
with a frozen text encoder outside the gradient (on device or on the host)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred.models import diffusion
from charred.models import diffusion_model
from charred.models import losses
from charred.models.diffusion_model import DiffusionModel, ObjectiveConfig
from charred.trainers import trainer
from charred.trainers.optimizer import OptimizerConfig
from test_optimizer import nano_batch, nano_model, nano_params, nano_state
from conftest import repeated_batches


def closed_form_weights(alpha_bar, prediction_type, gamma):
  """arXiv 2303.09556 in float64: SNR = a / (1 - a); x0 target min(SNR, g), epsilon
  min(SNR, g) / SNR, v min(SNR, g) / (SNR + 1); at SNR 0 epsilon takes its limit 1."""
  a = np.asarray(alpha_bar, np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    snr = np.where(a < 1, a / (1 - a), np.inf)
    clipped = np.minimum(snr, gamma)
    if prediction_type == 'sample':
      return clipped
    if prediction_type == 'epsilon':
      return np.where(snr == 0, 1.0, clipped / snr)
    return np.where(np.isinf(snr), 0.0, clipped / (snr + 1))


@pytest.mark.parametrize('prediction_type', ['sample', 'epsilon', 'v_prediction'])
def test_min_snr_weights_equal_the_closed_forms(prediction_type):
  t = np.array([0, 1, 10, 100, 300, 500, 700, 900, 990, 999])
  schedules = [diffusion.NoiseSchedule('cosine'), diffusion.NoiseSchedule(
      'scaled_linear', rescale_zero_terminal_snr=True)]  # its t=999 has SNR exactly 0
  alpha_bars = [s.alphas_cumprod()[t] for s in schedules] + [np.array([1.0, 0.0, 0.5, 1e-6],
                                                                      np.float32)]
  assert schedules[1].alphas_cumprod()[-1] == 0.0
  for gamma in (1.0, 5.0):
    for a in alpha_bars:
      got = np.asarray(losses.min_snr_weight(a, prediction_type, gamma))
      assert np.isfinite(got).all(), got
      np.testing.assert_allclose(got, closed_form_weights(a, prediction_type, gamma),
                                 rtol=1e-5, atol=1e-12)


def loss_of(model: DiffusionModel, params, batch, rng, first_example=0) -> float:
  return float(model.loss_fn(params, batch, rng, first_example)[0])  # eager: no compile


def objective_model(model_config, **objective) -> DiffusionModel:
  return DiffusionModel(model_config, ObjectiveConfig(**objective))


def test_loss_weights_each_example():
  """The weighted batch loss is the mean of the closed-form weight times each example's
  unweighted loss, each example computed on its own (its draws depend on its index only)."""
  model_config = dataclasses.replace(nano_model(), prediction_type='v_prediction')
  plain = objective_model(model_config, caption_dropout=0.5)
  weighted = objective_model(model_config, caption_dropout=0.5, min_snr_gamma=2.0)
  batch, rng = nano_batch(), jax.random.PRNGKey(3)
  params = nano_params()
  loss = lambda model, *args: loss_of(model, params, *args)
  each = [loss(plain, {k: v[i:i + 1] for k, v in batch.items()}, rng, i) for i in range(4)]
  t = [int(jax.random.randint(diffusion_model.example_keys(
      rng, i, 1, diffusion_model._TIMESTEP)[0], (), 0, 1000)) for i in range(4)]
  a = model_config.noise_schedule.alphas_cumprod()[t]
  expected = np.mean(closed_form_weights(a, 'v_prediction', 2.0) * np.array(each))
  np.testing.assert_allclose(loss(weighted, batch, rng), expected, rtol=1e-5)
  np.testing.assert_allclose(loss(plain, batch, rng), np.mean(each), rtol=1e-5)


def test_offset_noise_is_one_normal_draw_per_channel():
  s, n, shape = 0.3, 4000, (4, 5, 3)
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  with_offset = jax.vmap(lambda k: losses.sample_noise(k, shape, s))(keys)
  without = jax.vmap(lambda k: losses.sample_noise(k, shape))(keys)
  assert with_offset.shape == (n,) + shape
  offset = np.asarray(with_offset - without, np.float64)
  # Constant over the image, one value per example and channel ...
  np.testing.assert_allclose(offset, np.broadcast_to(offset[:, :1, :1], offset.shape),
                             atol=1e-6)
  per_channel = offset[:, 0, 0]  # [n, C]
  # ... distributed as s * N(0, 1), independently per channel (tolerances ~5 sigma).
  np.testing.assert_allclose(per_channel.std(0), s, rtol=0.06)
  np.testing.assert_allclose(per_channel.mean(0), 0.0, atol=5 * s / np.sqrt(n))
  corr = np.corrcoef(per_channel.T)
  assert np.abs(corr[np.triu_indices(3, 1)]).max() < 5 / np.sqrt(n)
  # The base noise is a standard normal whatever the offset.
  np.testing.assert_allclose(np.asarray(without).std(), 1.0, rtol=0.02)


def test_uniform_timesteps_are_the_plain_randint_and_logit_normal_follows_its_cdf():
  keys = jax.random.split(jax.random.PRNGKey(1), 20000)
  uniform = jax.vmap(lambda k: losses.sample_timestep(k, 1000))(keys)
  np.testing.assert_array_equal(
      uniform, jax.vmap(lambda k: jax.random.randint(k, (), 0, 1000))(keys))
  t = np.asarray(jax.vmap(lambda k: losses.sample_timestep(
      k, 1000, 'logit_normal', 0.5, 1.0))(keys))
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
  # P(t < T * sigmoid(m + z * s)) = Phi(z): the quantiles at z = -1, 0, 1 (5 sigma).
  for z, phi in ((-1.0, 0.158655), (0.0, 0.5), (1.0, 0.841345)):
    edge = 1000 / (1 + np.exp(-(0.5 + z)))
    assert abs(np.mean(t < np.floor(edge)) - phi) < 5 * np.sqrt(phi * (1 - phi) / len(t)) + 1e-3
  with pytest.raises(ValueError, match='timestep sampling'):
    losses.sample_timestep(keys[0], 1000, 'beta')
  with pytest.raises(ValueError, match='timestep_sampling'):
    ObjectiveConfig(timestep_sampling='beta')


def test_pixel_weighted_mse_against_hand_computed_values():
  prediction = np.zeros((2, 1, 2, 3), np.float32)
  target = np.array([[[[1, 1, 1], [2, 2, 2]]], [[[0, 0, 0], [3, 3, 3]]]], np.float32)
  weights = np.array([[[1.0, 3.0]], [[1.0, 1.0]]], np.float32)
  # Example 0: (1 * 1 + 3 * 4) * 3 values / 6 = 6.5; example 1: (0 + 9) * 3 / 6 = 4.5.
  np.testing.assert_allclose(losses.per_example_mse(prediction, target, weights), [6.5, 4.5])
  np.testing.assert_allclose(losses.per_example_mse(prediction, target), [2.5, 4.5])


def test_glyph_loss_weight_needs_glyph_maps_and_weighs_glyph_pixels():
  batch, rng, params = nano_batch(), jax.random.PRNGKey(3), nano_params()
  plain = objective_model(nano_model(), caption_dropout=0.0)
  weighted = objective_model(nano_model(), caption_dropout=0.0, glyph_loss_weight=2.0)
  with pytest.raises(ValueError, match='glyph_tokens'):
    loss_of(weighted, params, batch, rng)
  # No glyph anywhere: the weighted loss is the plain one; glyphs everywhere: 3x.
  h, w = batch['image'].shape[1:3]
  for fill, factor in ((-1, 1.0), (0, 3.0)):
    glyphs = dict(batch, glyph_tokens=np.full((4, h, w), fill, np.int32))
    np.testing.assert_allclose(loss_of(weighted, params, glyphs, rng),
                               factor * loss_of(plain, params, batch, rng), rtol=1e-5)
  # Validation measures the diffusion loss alone: no glyph maps needed, the plain value.
  only = weighted.replace(objective=weighted.objective.diffusion_only())
  assert loss_of(only, params, batch, rng) == loss_of(plain, params, batch, rng)


def test_blank_attention_targets_need_blank_tokens():
  batch, params = nano_batch(), nano_params()
  h, w = batch['image'].shape[1:3]
  model = objective_model(nano_model(), attention_loss_weight=0.1, attention_loss_blank=True)
  with pytest.raises(ValueError, match='blank_tokens'):
    loss_of(model, params, dict(batch, glyph_tokens=np.full((4, h, w), -1, np.int32)),
            jax.random.PRNGKey(0))


def test_bfloat16_compute_step_runs_and_its_loss_is_close_to_float32():
  fp32 = nano_model()
  bf16 = dataclasses.replace(fp32, unet=dataclasses.replace(fp32.unet, dtype=jnp.bfloat16,
                                                            remat=True),
                             text_encoder=dataclasses.replace(fp32.text_encoder,
                                                              dtype=jnp.bfloat16))
  config = trainer.TrainConfig(train_steps=1, batch_size=4, optimizer=OptimizerConfig(
      learning_rate=1e-3, warmup_steps=0))
  state, tx = nano_state(config)
  batch, rng = nano_batch(), jax.random.PRNGKey(0)
  new, metrics = jax.jit(functools.partial(trainer.train_step, model=DiffusionModel(bf16),
                                           config=config, tx=tx))(state, batch, rng)
  # The step's loss is loss_fn on fold_in(rng, update 0), as in fp32 here.
  reference = loss_of(DiffusionModel(fp32), state.params, batch, jax.random.fold_in(rng, 0))
  assert metrics['loss'].dtype == jnp.float32
  np.testing.assert_allclose(float(metrics['loss']), reference, rtol=2e-2)
  assert float(metrics['nonfinite']) == 0
  # fp32 master weights, moved by fp32 gradients.
  for p in jax.tree_util.tree_leaves((new.params, new.ema_params)):
    assert p.dtype == jnp.float32
  assert not np.array_equal(new.params['unet']['conv_out']['kernel'],
                            state.params['unet']['conv_out']['kernel'])


@pytest.mark.slow
def test_frozen_text_encoder_runs_outside_the_gradient_or_on_the_host(tmp_path):
  """The loss with the frozen encoder outside the differentiated function (on device, or
  on the host before the step) equals the loss with it inside behind stop_gradient; its
  parameters never move; train() with the host encoder takes the on-device step."""
  model = objective_model(nano_model(), train_text_encoder=False, caption_dropout=0.5)
  config = trainer.TrainConfig(train_steps=1, batch_size=4,
                               optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0))
  state, tx = nano_state(config, frozen=model.frozen)  # what train() creates: the same seed
  batch, rng = nano_batch(), jax.random.PRNGKey(config.seed + 1)  # train()'s rng
  outside, metrics = jax.jit(functools.partial(
      trainer.train_step, model=model, config=config, tx=tx))(state, batch, rng)
  # context=None: the captions encoded inside the loss terms, differentiably.
  loss = lambda context: float(sum(model.loss_terms(
      state.params, batch, jax.random.fold_in(rng, 0), 0, context).values()))
  inside = loss(None)
  np.testing.assert_allclose(float(metrics['loss']), inside, rtol=1e-6)
  for tree in ('params', 'ema_params'):
    same = jax.tree_util.tree_map(np.array_equal, getattr(outside, tree)['text_encoder'],
                                  getattr(state, tree)['text_encoder'])
    assert all(jax.tree_util.tree_leaves(same))

  # On the host: its context (captions dropped as the step drops them) gives the same loss.
  on_host = dataclasses.replace(config, text_encoder_on_host=True)
  hosted = model.host_stage(state.params)(batch, jax.random.fold_in(rng, 0), 0)
  assert hosted['text_context'].shape == (4, 8, 16)
  np.testing.assert_allclose(loss(hosted['text_context']), inside, rtol=1e-6)
  final = trainer.train(str(tmp_path), model, on_host,
                        repeated_batches(lambda: batch), log=lambda s: None)
  for x, y in zip(jax.tree_util.tree_leaves(final.params),
                  jax.tree_util.tree_leaves(outside.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
