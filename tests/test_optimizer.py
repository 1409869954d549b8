"""Optimizer options against closed forms; accumulation and the NaN guard in the step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred import tokenizer
from charred.models import diffusion
from charred.models.diffusion_model import DiffusionModel, ObjectiveConfig
from charred.models.image_codec import PixelCodec
from charred.models.t5_encoder import T5EncoderConfig
from charred.models.text_to_image import TextToImage, TextToImageConfig, init_params
from charred.models.unet import UNetConfig
from charred.trainers import optimizer, trainer
from charred.trainers.checkpoints import CheckpointConfig
from charred.trainers.optimizer import OptimizerConfig
from charred.trainers.train_state import TrainState
from conftest import repeated_batches


def nano_model(**unet):
  """One U-Net level with cross-attention: the smallest model that exercises every path."""
  return TextToImageConfig(
      text_encoder=T5EncoderConfig(d_model=16, num_heads=2, head_dim=8, num_layers=1, d_ff=32),
      unet=UNetConfig(in_channels=3, out_channels=3, block_out_channels=(8,),
                      down_block_types=('CrossAttnDownBlock2D',),
                      up_block_types=('CrossAttnUpBlock2D',), layers_per_block=1,
                      attention_head_dim=(1,), cross_attention_dim=16, norm_num_groups=4,
                      upcast_attention=False, **unet),
      noise_schedule=diffusion.NoiseSchedule('cosine'), prediction_type='epsilon',
      text_length=8, image_size=(8, 8))


def nano_batch(n=4, seed=0):
  rng = np.random.default_rng(seed)
  tokens, mask = tokenizer.encode_batch([f'w{i}' * (i % 3 + 1) for i in range(n)], 8)
  return {'image': rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32),
          'text_tokens': tokens, 'text_mask': mask}


@functools.lru_cache()
def nano_params():
  """Initialised once per test process: an init costs as much as compiling a step."""
  return init_params(TextToImage(nano_model()), jax.random.PRNGKey(0), PixelCodec())


def nano_state(config, params=None, frozen=()):
  """(state, tx) as trainer.create_state makes them, from nano_params()."""
  tx = trainer.make_tx(config, frozen)
  params = nano_params() if params is None else params
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=tx.init(params)), tx


def jitted_step(model: DiffusionModel, config):
  state, tx = nano_state(config, frozen=model.frozen)
  return state, jax.jit(functools.partial(trainer.train_step, model=model, config=config,
                                          tx=tx))


def toy_params():
  rng = np.random.default_rng(1)
  shapes = {'text_encoder': {'w': (3, 4)},
            'unet': {'attn2': {'kernel': (4, 4), 'bias': (4,)}, 'conv': {'kernel': (2, 3)}},
            'other': {'w': (2, 2)}}
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                                is_leaf=lambda x: isinstance(x, tuple))


def flat(tree):
  return {optimizer.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('kind', ['adamw', 'sgd'])
def test_lr_mults_and_frozen_match_the_closed_form_first_step(kind):
  lr, wd, eps = 0.01, 0.1, 1e-8
  config = OptimizerConfig(kind=kind, learning_rate=lr, warmup_steps=0, weight_decay=wd,
                           grad_clip_norm=1e6, b1=0.9,
                           lr_mults=(('unet/attn2/kernel', 0.5), ('unet/.*', 0.1)),
                           frozen=('text_encoder/.*',))
  tx = optimizer.make_optimizer(config, total_steps=10)
  params = toy_params()
  grads = jax.tree_util.tree_map(lambda p: jnp.asarray(
      np.random.default_rng(p.size).normal(size=p.shape), jnp.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  u, p0, g = flat(updates), flat(params), flat(grads)
  # First match wins: attn2/kernel 0.5 (not 0.1), the rest of unet 0.1, `other` 1.
  mults = {'unet/attn2/kernel': 0.5, 'unet/attn2/bias': 0.1, 'unet/conv/kernel': 0.1,
           'other/w': 1.0}
  for name, m in mults.items():
    p, gg = p0[name].astype(np.float64), g[name].astype(np.float64)
    # AdamW's first step: m_hat = g, v_hat = g^2; SGD with momentum: the trace is g.
    direction = gg / (np.abs(gg) + eps) if kind == 'adamw' else gg
    decay = wd * p if p.ndim > 1 else 0.0  # no decay on biases
    np.testing.assert_allclose(u[name], -m * lr * (direction + decay), rtol=1e-5,
                               err_msg=name)
  # Frozen: no update at all, although it is a matrix that weight decay would shrink.
  np.testing.assert_array_equal(u['text_encoder/w'], 0.0)


def test_frozen_parameters_have_no_state_and_never_move():
  config = OptimizerConfig(learning_rate=0.1, warmup_steps=0, frozen=('unet/.*',))
  tx = optimizer.make_optimizer(config, 10, frozen_prefixes=('text_encoder',))
  params = toy_params()
  state = tx.init(params)
  names = [optimizer.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert not any('unet' in n or 'text_encoder' in n for n in names), names
  assert any('other' in n for n in names)
  for _ in range(3):
    updates, state = tx.update(params, state, params)  # gradient = params
    new = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
  for part in ('unet', 'text_encoder'):
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        np.array_equal, new[part], params[part])))
  assert not np.array_equal(new['other']['w'], params['other']['w'])


def test_bad_patterns_are_clear_errors():
  with pytest.raises(ValueError, match=r"frozen pattern 'unet/attn3/.\*' matches no parameter"):
    optimizer.make_optimizer(OptimizerConfig(frozen=('unet/attn3/.*',)), 10).init(toy_params())
  with pytest.raises(ValueError, match='multiplier > 0'):
    OptimizerConfig(lr_mults=(('unet/.*', 0.0),))
  with pytest.raises(ValueError, match='Invalid parameter regex'):
    OptimizerConfig(frozen=('unet/(',))
  with pytest.raises(ValueError, match="Unknown optimizer kind 'lion'"):
    OptimizerConfig(kind='lion')


def test_adafactor_factors_and_lowers_a_least_squares_loss():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=(6, 8)), jnp.float32) + 0.5
  loss = lambda p: jnp.mean(jnp.square(x @ p['dense']['kernel'] + p['dense']['bias'] - y))
  params = {'dense': {'kernel': jnp.zeros((6, 8)), 'bias': jnp.zeros((8,))}}
  config = OptimizerConfig(kind='adafactor', learning_rate=0.05, warmup_steps=5,
                           weight_decay=0.0, adafactor_min_dim_size_to_factor=4,
                           mu_dtype='bfloat16')
  tx = optimizer.make_optimizer(config, 100)
  state = tx.init(params)
  # Factored: a row and a column statistic instead of a 6x8 second moment.
  shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(state)}
  assert {(6,), (8,)} <= shapes and (6, 8) in shapes  # (6, 8): the bf16 momentum

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return jax.tree_util.tree_map(lambda p, u: p + u, params, updates), state

  before = float(loss(params))
  for _ in range(100):
    params, state = step(params, state)
  assert float(loss(params)) < 0.05 * before, (before, float(loss(params)))


@pytest.mark.parametrize('kind', ['adamw', 'sgd', 'adafactor'])
def test_bfloat16_first_moment(kind):
  config = OptimizerConfig(kind=kind, mu_dtype='bfloat16', adafactor_min_dim_size_to_factor=2)
  tx = optimizer.make_optimizer(config, 10)
  params = toy_params()
  state = tx.init(params)
  state = tx.update(params, state, params)[1]  # dtypes survive an update
  float_leaves = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      float_leaves.setdefault(str(leaf.dtype), []).append(jax.tree_util.keystr(path))
  # The first moment (one per parameter: 5 leaves) is bfloat16 ...
  assert len(float_leaves.get('bfloat16', [])) == 5, float_leaves
  # ... and Adam's/Adafactor's second moment stays float32 (see OptimizerConfig.mu_dtype).
  assert kind == 'sgd' or float_leaves.get('float32'), float_leaves


@pytest.mark.slow
def test_accumulation_equals_one_big_step_and_nonfinite_batches_are_skipped():
  """Two updates: 2 x 2 micro-batches of 2 (accumulation_steps 2) against 2 batches of 4;
  every random stream (caption dropout, timesteps, noise, offset noise) is on."""
  model = DiffusionModel(nano_model(), ObjectiveConfig(caption_dropout=0.5, offset_noise=0.1,
                                                      min_snr_gamma=5.0))
  common = dict(batch_size=4, ema_decay=0.9, optimizer=OptimizerConfig(
                    kind='sgd', learning_rate=1.0, warmup_steps=0, b1=0.9, weight_decay=0.01))
  big_config = trainer.TrainConfig(train_steps=2, **common)
  acc_config = trainer.TrainConfig(train_steps=4, accumulation_steps=2, **common)
  batches = [nano_batch(4, seed=0), nano_batch(4, seed=1)]
  rng = jax.random.PRNGKey(5)

  big0, big_step = jitted_step(model, big_config)
  big = big0
  for batch in batches:
    big, _ = big_step(big, batch, rng)

  acc0, acc_step = jitted_step(model, acc_config)
  acc = acc0
  for n, batch in enumerate(batches):
    for half in (slice(0, 2), slice(2, 4)):
      before = acc
      acc, _ = acc_step(acc, {k: v[half] for k, v in batch.items()}, rng)
      if half.start == 0:  # mid-accumulation: nothing moves
        for a, b in ((acc.params, before.params), (acc.ema_params, before.ema_params)):
          assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b)))
  assert int(acc.step) == 4 and int(big.step) == 2

  def relative_error(tree, ref, start):
    """|tree - ref| / |ref - start| over all parameters: relative to how far they moved."""
    d = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b, s: (np.sum((np.float64(a) - b)**2), np.sum((np.float64(b) - s)**2)),
        tree, ref, start), is_leaf=lambda x: isinstance(x, tuple))
    return np.sqrt(sum(x for x, _ in d) / sum(y for _, y in d))

  assert relative_error(acc.params, big.params, big0.params) <= 1e-5
  assert relative_error(acc.ema_params, big.ema_params, big0.ema_params) <= 1e-5
  # The learning rate the host reports follows updates, not micro-batches.
  assert trainer.learning_rate(acc_config, 2) == trainer.learning_rate(big_config, 1)

  # nan_policy 'skip' (the default): a non-finite (micro-)batch changes nothing but the
  # step, mid-accumulation too (the accumulated gradient survives), and the state still
  # takes finite batches.
  bad = nano_batch(4, seed=2)
  bad['image'][1, 2, 3, 0] = np.nan
  micro = lambda b: {k: v[:2] for k, v in b.items()}
  mid, _ = acc_step(acc, micro(batches[0]), rng)  # half-way through an accumulation
  for state, step, batch in ((big, big_step, bad), (acc, acc_step, micro(bad)),
                             (mid, acc_step, micro(bad))):
    new, metrics = step(state, batch, rng)
    assert float(metrics['nonfinite']) == 1.0 and not np.isfinite(float(metrics['loss']))
    assert int(new.step) == int(state.step) + 1
    for a, b in ((new.params, state.params), (new.ema_params, state.ema_params),
                 (new.opt_state, state.opt_state)):
      assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b)))
  new, metrics = acc_step(new, micro(batches[1]), rng)  # completes the accumulation
  assert float(metrics['nonfinite']) == 0.0
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(new.params))
  assert not np.array_equal(new.params['unet']['conv_in']['kernel'],
                            mid.params['unet']['conv_in']['kernel'])


def test_nan_policy_stop_raises_at_the_host(tmp_path, monkeypatch):
  """train()'s wiring, with a stand-in step that reports a skipped non-finite update
  (the skip itself is tested with accumulation above)."""
  def nonfinite_step(state, batch, rng, **kw):
    del batch, rng, kw
    return state.replace(step=state.step + 1), {
        'loss': jnp.float32(np.nan), 'grad_norm': jnp.float32(np.nan),
        'nonfinite': jnp.float32(1.0)}

  monkeypatch.setattr(trainer, 'train_step', nonfinite_step)
  config = trainer.TrainConfig(train_steps=3, batch_size=2, nan_policy='stop',
                               checkpointing=CheckpointConfig(every=1))
  with pytest.raises(FloatingPointError, match=r"Step 1: the loss or the gradients are not "
                     r"finite .*nan_policy='stop'"):
    trainer.train(str(tmp_path), DiffusionModel(nano_model()), config,
                  repeated_batches(lambda: nano_batch(2)), log=lambda s: None)
  assert not (tmp_path / 'checkpoints' / '1').exists()  # the bad step was not saved


def test_train_config_errors():
  with pytest.raises(ValueError, match='multiple of accumulation_steps'):
    trainer.TrainConfig(train_steps=5, batch_size=2, accumulation_steps=2)
  with pytest.raises(ValueError, match="Unknown nan_policy 'ignore'"):
    trainer.TrainConfig(train_steps=5, batch_size=2, nan_policy='ignore')
  with pytest.raises(ValueError, match='text_encoder_on_host needs a frozen encoder'):
    trainer.check_model(DiffusionModel(nano_model()),
                        trainer.TrainConfig(train_steps=5, batch_size=2, text_encoder_on_host=True))
  with pytest.raises(ValueError, match='keep_every .* multiple of every'):
    CheckpointConfig(every=4, keep_every=6)
  with pytest.raises(ValueError, match='caption_dropout must be in'):
    ObjectiveConfig(caption_dropout=1.5)
