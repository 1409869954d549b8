"""The training loop: one readable function, in the manner of big_vision's train.py.

Data arrives as numpy batches from a callable (the data layer, which uses TensorFlow,
stays outside this TF-free module). Resumes from the newest checkpoint, data position
included; evaluators run on their own cadence and never touch the training RNG.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charred import tokenizer
from charred.models import diffusion
from charred.models.image_codec import make_codec
from charred.models.text_to_image import TextToImage, TextToImageConfig, init_params
from charred.trainers import checkpoints, optimizer as optimizer_lib
from charred.trainers.train_state import TrainState, ema_update

Batch = dict[str, np.ndarray]
# start_batch -> iterator of batches with `image` [B,H,W,3] in [-1, 1], `text_tokens` [B,L]
# and `text_mask` [B,L]; the stream from k equals the stream from 0 minus k batches.
BatchesFn = Callable[[int], Iterator[Batch]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  train_steps: int
  batch_size: int
  optimizer: optimizer_lib.OptimizerConfig = optimizer_lib.OptimizerConfig()
  ema_decay: float = 0.999
  # Captions replaced by the empty caption this often, so that classifier-free guidance
  # has an unconditional model to contrast with (the original project skipped this).
  caption_dropout: float = 0.1
  train_text_encoder: bool = True  # False: the encoder is frozen (e.g. pretrained ByT5)
  seed: int = 0
  log_every: int = 50
  eval_every: int = 1000
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3


def compute_loss(params, model: TextToImage, config: TrainConfig, batch, rng):
  """Mean squared error against the configured target at uniform random timesteps."""
  mc = model.config
  images, tokens, mask = batch['image'], batch['text_tokens'], batch['text_mask']
  b = images.shape[0]
  drop_rng, t_rng, noise_rng = jax.random.split(rng, 3)
  empty_tokens, empty_mask = (jnp.asarray(a) for a in tokenizer.encode_batch([''], mc.text_length))
  drop = jax.random.bernoulli(drop_rng, config.caption_dropout, (b, 1))
  tokens = jnp.where(drop, empty_tokens, tokens)
  mask = jnp.where(drop, empty_mask, mask)

  t = jax.random.randint(t_rng, (b,), 0, mc.noise_schedule.num_train_timesteps)
  alpha_bar = jnp.asarray(mc.noise_schedule.alphas_cumprod())[t]
  noise = jax.random.normal(noise_rng, images.shape, jnp.float32)
  x_t = diffusion.add_noise(images, noise, alpha_bar)
  context = model.apply({'params': params}, tokens, mask, method=TextToImage.encode_text)
  if not config.train_text_encoder:
    context = jax.lax.stop_gradient(context)
  prediction = model.apply({'params': params}, x_t, t, context, mask, method=TextToImage.denoise)
  target = diffusion.training_target(mc.prediction_type, images, noise, alpha_bar)
  return jnp.mean(jnp.square(prediction - target))


def train_step(state: TrainState, batch, rng, *, model, config: TrainConfig, tx, codec):
  rng, encode_rng = jax.random.split(jax.random.fold_in(rng, state.step))
  # The frozen codec (identity, or a VAE) runs outside the differentiated function.
  batch = dict(batch, image=codec.encode(batch['image'], encode_rng))
  loss, grads = jax.value_and_grad(compute_loss)(state.params, model, config, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
  ema = ema_update(state.ema_params, params, state.step, config.ema_decay)
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return new_state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}


def create_state(model: TextToImage, config: TrainConfig, tx, codec) -> TrainState:
  params = init_params(model, jax.random.PRNGKey(config.seed), codec)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=tx.init(params))


def make_tx(config: TrainConfig):
  frozen = () if config.train_text_encoder else ('text_encoder',)
  return optimizer_lib.make_optimizer(config.optimizer, config.train_steps, frozen)


class Progress:
  """One line per report: step, loss, steps/s, images/s, ETA."""

  def __init__(self, total_steps: int, batch_size: int, first_step: int):
    self.total, self.batch_size = total_steps, batch_size
    self.last_step, self.last_time = first_step, time.time()

  def line(self, step: int, loss: float) -> tuple[str, float]:
    """The progress line and the steps/s since the previous report."""
    now = time.time()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(steps_per_sec, 1e-9)
    return (f'step {step}/{self.total} | loss {loss:.4f} | {steps_per_sec:.2f} steps/s | '
            f'{steps_per_sec * self.batch_size:.1f} images/s | ETA {_hms(eta)}'), steps_per_sec


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def train(workdir: str, model_config: TextToImageConfig, config: TrainConfig,
          batches: BatchesFn, evaluators: dict[str, Any] | None = None,
          log: Callable[[str], None] = print) -> TrainState:
  """Trains to `config.train_steps`, resuming from `workdir/checkpoints` if present.

  `evaluators` maps a name to `(every_n_steps, fn(step, ema_params, writer) -> metrics)`.
  """
  model = TextToImage(model_config)
  codec = make_codec(model_config.pixel_space, model_config.autoencoder_path)
  model_config.check_codec(codec)
  tx = make_tx(config)
  state = create_state(model, config, tx, codec)
  ckpt = checkpoints.Checkpointer(f'{workdir}/checkpoints', config.keep_checkpoints)
  data_state = {'position': 0}
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(state)
    log(f'Resumed from step {int(state.step)} (data position {data_state["position"]}).')
  # clu's writers import TensorFlow (for TensorBoard); keep that out of import time.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  log(f'{num_params:,} parameters; training to step {config.train_steps} with batch '
      f'{config.batch_size}.')

  step_fn = jax.jit(functools.partial(train_step, model=model, config=config, tx=tx,
                                      codec=codec),
                    donate_argnums=0)
  rng = jax.random.PRNGKey(config.seed + 1)
  evaluators = evaluators or {}
  first_step = int(state.step)
  progress = Progress(config.train_steps, config.batch_size, first_step)
  data = batches(data_state['position'])
  pending = []
  for step in range(first_step + 1, config.train_steps + 1):
    batch = next(data)
    batch = {k: batch[k] for k in ('image', 'text_tokens', 'text_mask')}
    state, metrics = step_fn(state, batch, rng)
    data_state = {'position': data_state['position'] + 1}
    pending.append(metrics)
    last = step == config.train_steps
    if step % config.log_every == 0 or last:
      means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
      pending = []
      line, steps_per_sec = progress.line(step, means['loss'])
      log(line)
      writer.write_scalars(step, {**{f'train/{k}': v for k, v in means.items()},
                                  'train/steps_per_sec': steps_per_sec,
                                  'train/learning_rate': float(
                                      optimizer_lib.learning_rate_schedule(
                                          config.optimizer, config.train_steps)(step))})
    if step % config.checkpoint_every == 0 or last:
      ckpt.save(state, data_state)
    for name, (every, evaluate) in evaluators.items():
      if step % every == 0 or last:
        metrics = evaluate(step, state.ema_params, writer)
        log(f'eval {name} @ {step}: ' + ', '.join(
            f'{k.split("/", 1)[-1]} {v:.3f}' for k, v in metrics.items()))
  ckpt.wait()
  ckpt.close()
  writer.flush()
  return state
