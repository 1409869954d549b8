"""The training loop: one readable function, in the manner of big_vision's train.py.

Data arrives as numpy batches from a callable (the data layer, which uses TensorFlow,
stays outside this TF-free module). Resumes from the newest checkpoint, data position
included; evaluators run on their own cadence and never touch the training RNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from charred import tokenizer
from charred.models import diffusion
from charred.models import preprocess as preprocess_lib
from charred.models.pretrained import load_checkpoints, make_codec
from charred.models.text_to_image import TextToImage, TextToImageConfig, init_params
from charred.trainers import checkpoints, losses, optimizer as optimizer_lib
from charred.trainers import distributed, monitoring
from charred.trainers import partitioning
from charred.trainers.train_state import TrainState, ema_update

Batch = dict[str, np.ndarray]
# start_batch -> iterator of batches with `image` [B,H,W,3] in [-1, 1], `text_tokens` [B,L]
# and `text_mask` [B,L]; the stream from k equals the stream from 0 minus k batches. An
# iterator that also has get_state() -> JSON-able dict and set_state(dict) (bucketing) is
# restored from its saved state instead.
BatchesFn = Callable[[int], Iterator[Batch]]
# What a batch may hold: `image` may be uint8 (TrainConfig.device_preprocess), or an
# encoder cache gives `latent_mean`, `latent_logvar` and `text_context` (see train_step).
BATCH_KEYS = ('image', 'latent_mean', 'latent_logvar', 'text_tokens', 'text_mask',
              'text_context', 'glyph_tokens', 'glyph_chars', 'blank_tokens')


NAN_POLICIES = ('skip', 'stop', 'none')


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
  # Writers (TensorBoard, W&B, OpenTelemetry), the profiler and MFU.
  monitoring: monitoring.MonitoringConfig = monitoring.MonitoringConfig()
  eval_every: int = 1000
  checkpoint_every: int = 1000
  # Checkpoints kept: the newest `keep_checkpoints` (None: all), plus every multiple of
  # `keep_every` steps (a multiple of checkpoint_every). Saves are asynchronous unless
  # `async_checkpoints` is False; a SIGTERM also saves (and stops) at the current step.
  keep_checkpoints: int | None = 3
  keep_every: int | None = None
  async_checkpoints: bool = True
  # Min-SNR-gamma loss weighting (arXiv 2303.09556; the paper uses 5); None: unweighted.
  min_snr_gamma: float | None = None
  # Offset noise: noise + offset_noise * N(0, 1) of shape [B, 1, 1, C] (0.1 is usual).
  offset_noise: float = 0.0
  # Gradient accumulation: each train step consumes one micro-batch of `batch_size`, and
  # every `accumulation_steps`-th step applies one optimizer update on their mean gradient.
  # `train_steps`, `state.step`, checkpoints and the data position count micro-batches;
  # the learning-rate schedule (warm-up included) and the EMA count optimizer updates.
  accumulation_steps: int = 1
  # Non-finite loss or gradients: 'skip' the update (params, EMA and optimizer state stay
  # as they were; the `nonfinite` metric counts it), 'stop' (skip, then raise at the host;
  # costs a host sync per step), or 'none' (no check).
  nan_policy: str = 'skip'
  # With train_text_encoder=False: run the frozen encoder on the host CPU, outside the
  # train step, and feed its hidden states to the step (see HostTextEncoder).
  text_encoder_on_host: bool = False
  # Resize, crop, flip and normalise uint8 images of one raw size inside the step, on
  # the accelerator (the host ships 4x fewer bytes); None: `image` arrives ready.
  device_preprocess: preprocess_lib.PreprocessConfig | None = None
  # Training-only signal from what the renderer knows (batches with `glyph_tokens`): a
  # cross-entropy pulling every cross-attention's head-averaged weights, at each image
  # cell inside a glyph, onto the caption token of that glyph (losses.glyph_attention_loss),
  # added with this weight. 0: off. Sampling never sees glyphs.
  attention_loss_weight: float = 0.0
  # With the attention loss: cells outside every glyph are pulled onto the token after
  # the drawn text (`blank_tokens`: the closing quote), so that "nothing here" has a key
  # to attend to; without it those cells spread over the letters and may draw one again.
  attention_loss_blank: bool = False
  # With a U-Net character head (UNetConfig.char_head_classes) and `glyph_chars` in the
  # batch: the weight of its per-cell cross-entropy against each glyph's character.
  char_loss_weight: float = 0.0
  # Pixels inside glyph boxes (batches with `glyph_tokens`) weigh 1 + this in the diffusion
  # loss, the background 1: the glyphs are ~20 % of a sign's pixels but all of its text.
  glyph_loss_weight: float = 0.0
  # How training timesteps are drawn: 'uniform' over [0, num_train_timesteps), or
  # 'logit_normal' (Esser et al. 2024): t / T = sigmoid(N(mean, std)), which spends the
  # steps on the middle noise levels where the layout is decided, not on near-clean ones.
  timestep_sampling: str = 'uniform'
  timestep_logit_mean: float = 0.0
  timestep_logit_std: float = 1.0
  # Device mesh ('data', 'fsdp', 'tensor') and logical axis rules; `batch_size` is global
  # (summed over processes and devices) and must divide over 'data' x 'fsdp'.
  partitioning: partitioning.PartitioningConfig = partitioning.PartitioningConfig()

  def __post_init__(self):
    if not isinstance(self.accumulation_steps, int) or self.accumulation_steps < 1:
      raise ValueError(f'accumulation_steps must be an integer >= 1, got '
                       f'{self.accumulation_steps!r}.')
    if self.train_steps % self.accumulation_steps:
      raise ValueError(f'train_steps ({self.train_steps}) counts micro-batches and must be a '
                       f'multiple of accumulation_steps ({self.accumulation_steps}).')
    if self.nan_policy not in NAN_POLICIES:
      raise ValueError(f'Unknown nan_policy {self.nan_policy!r}; expected one of '
                       f'{NAN_POLICIES}.')
    if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
      raise ValueError(f'min_snr_gamma must be None or > 0, got {self.min_snr_gamma}.')
    if not self.char_loss_weight >= 0:
      raise ValueError(f'char_loss_weight must be >= 0, got {self.char_loss_weight}.')
    if not self.attention_loss_weight >= 0:
      raise ValueError(f'attention_loss_weight must be >= 0, got {self.attention_loss_weight}.')
    if not self.glyph_loss_weight >= 0:
      raise ValueError(f'glyph_loss_weight must be >= 0, got {self.glyph_loss_weight}.')
    if self.timestep_sampling not in losses.TIMESTEP_SAMPLINGS:
      raise ValueError(f'Unknown timestep_sampling {self.timestep_sampling!r}; expected one '
                       f'of {losses.TIMESTEP_SAMPLINGS}.')
    if not self.timestep_logit_std > 0:
      raise ValueError(f'timestep_logit_std must be > 0, got {self.timestep_logit_std}.')
    if not self.offset_noise >= 0:
      raise ValueError(f'offset_noise must be >= 0, got {self.offset_noise}.')
    if self.text_encoder_on_host and self.train_text_encoder:
      raise ValueError('text_encoder_on_host needs train_text_encoder=False: only a frozen '
                       'encoder can run outside the gradient.')
    if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 1):
      raise ValueError(f'checkpoint_every must be an integer >= 1, got '
                       f'{self.checkpoint_every!r}.')
    if self.keep_every is not None and (
        not isinstance(self.keep_every, int) or self.keep_every < 1 or
        self.keep_every % self.checkpoint_every):
      raise ValueError(f'keep_every ({self.keep_every!r}) must be None or a positive multiple '
                       f'of checkpoint_every ({self.checkpoint_every}).')


# Every random draw for example n of optimizer update u depends on (rng, u, n) only, so
# k micro-batches of b examples see exactly what one batch of k*b examples sees.
_DROP, _TIMESTEP, _NOISE, _ENCODE, _AUGMENT = range(5)


def update_rng(rng, step, accumulation_steps: int, batch_size: int):
  """(rng of the update that train step `step` contributes to, index of the step's first
  example within that update)."""
  k = accumulation_steps
  return jax.random.fold_in(rng, step // k), (step % k) * batch_size


def example_keys(rng, first_example, batch_size: int, stream: int):
  """Keys [B, ...] of one random stream: example i's is drawn from
  fold_in(fold_in(rng, first_example + i), stream)."""
  index = first_example + jnp.arange(batch_size)
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, i), stream))(index)


def caption_drop_mask(config: TrainConfig, rng, first_example, batch_size: int):
  """bool [B]: the examples whose caption is replaced by the empty caption."""
  keys = example_keys(rng, first_example, batch_size, _DROP)
  return jax.vmap(lambda k: jax.random.bernoulli(k, config.caption_dropout))(keys)


def drop_captions(model_config: TextToImageConfig, config: TrainConfig, tokens, mask, rng,
                  first_example=0):
  """Captions replaced by the empty caption with probability `caption_dropout`."""
  drop = caption_drop_mask(config, rng, first_example, tokens.shape[0])[:, None]
  # As long as this batch's tokens: caption-length buckets may be shorter than text_length.
  empty_tokens, empty_mask = (jnp.asarray(a) for a in tokenizer.encode_batch(
      [''], tokens.shape[1]))
  return jnp.where(drop, empty_tokens, tokens), jnp.where(drop, empty_mask, mask)


def compute_loss(params, model: TextToImage, config: TrainConfig, batch, rng, first_example=0,
                 context=None):
  """The training loss: the sum of `loss_terms`."""
  return sum(loss_terms(params, model, config, batch, rng, first_example, context).values())


def loss_terms(params, model: TextToImage, config: TrainConfig, batch, rng, first_example=0,
               context=None) -> dict[str, jax.Array]:
  """{'diffusion': mean squared error against the configured target at uniform random
  timesteps, in float32 whatever the compute dtype, optionally Min-SNR-gamma weighted per
  example} plus, with `attention_loss_weight` and `glyph_tokens` in the batch,
  {'attention': the weighted glyph attention loss}.

  Example i of the batch is example `first_example + i` of its update (see example_keys).
  `context`: the text encoder's hidden states for the captions after dropout, when a
  frozen encoder ran outside the differentiated function; None encodes them here.
  """
  mc = model.config
  images = batch['image']
  b = images.shape[0]
  tokens, mask = drop_captions(mc, config, batch['text_tokens'], batch['text_mask'], rng,
                               first_example)
  t = jax.vmap(lambda k: losses.sample_timestep(
      k, mc.noise_schedule.num_train_timesteps, config.timestep_sampling,
      config.timestep_logit_mean, config.timestep_logit_std))(
          example_keys(rng, first_example, b, _TIMESTEP))
  alpha_bar = jnp.asarray(mc.noise_schedule.alphas_cumprod())[t]
  noise = jax.vmap(lambda k: losses.sample_noise(k, images.shape[1:], config.offset_noise))(
      example_keys(rng, first_example, b, _NOISE))
  x_t = diffusion.add_noise(images, noise, alpha_bar)
  if context is None:
    context = model.apply({'params': params}, tokens, mask, method=TextToImage.encode_text)
    if not config.train_text_encoder:
      context = jax.lax.stop_gradient(context)
  glyphs = config.attention_loss_weight > 0
  chars = config.char_loss_weight > 0
  for weight, key in ((glyphs or config.glyph_loss_weight > 0, 'glyph_tokens'),
                      (glyphs and config.attention_loss_blank, 'blank_tokens'),
                      (chars, 'glyph_chars')):
    if weight and key not in batch:
      raise ValueError(f'The glyph losses need `{key}` in the batch, which only the '
                       "rendered typography source gives (DataConfig.source='render').")
  if chars and not mc.unet.char_head_classes:
    raise ValueError('char_loss_weight needs a character head: set '
                     'UNetConfig.char_head_classes (e.g. 256).')
  if glyphs or chars:  # cross-attention weights and character logits are sown
    prediction, intermediates = model.apply({'params': params}, x_t, t, context, mask,
                                            method=TextToImage.denoise, mutable=['intermediates'])
  else:
    prediction = model.apply({'params': params}, x_t, t, context, mask,
                             method=TextToImage.denoise)
  target = diffusion.training_target(mc.prediction_type, images, noise, alpha_bar)
  pixel_weights = None
  if config.glyph_loss_weight > 0:
    pixel_weights = 1.0 + config.glyph_loss_weight * (batch['glyph_tokens'] >= 0)
  loss = losses.per_example_mse(prediction, target, pixel_weights)
  if config.min_snr_gamma is not None:
    loss = loss * losses.min_snr_weight(alpha_bar, mc.prediction_type, config.min_snr_gamma)
  terms = {'diffusion': jnp.mean(loss)}
  keep = ~caption_drop_mask(config, rng, first_example, b)
  sown = flax.traverse_util.flatten_dict(intermediates) if glyphs or chars else {}
  if glyphs:
    maps = [v for path, value in sown.items() if 'cross_attention' in path for v in value]
    terms['attention'] = config.attention_loss_weight * losses.glyph_attention_loss(
        maps, batch['glyph_tokens'], keep,
        batch['blank_tokens'] if config.attention_loss_blank else None)
  if chars:
    logits = [v for path, value in sown.items() if 'char_logits' in path for v in value]
    terms['char'] = config.char_loss_weight * losses.glyph_char_loss(
        logits[0], batch['glyph_chars'], keep)
  return terms


def train_step(state: TrainState, batch, rng, *, model, config: TrainConfig, tx, codec,
               empty_context=None):
  """One train step on one (micro-)batch; an optimizer update every
  `config.accumulation_steps` steps.

  `batch` holds `image` (float in [-1, 1]; uint8 of one raw size with
  `config.device_preprocess`) or, from an encoder cache, the VAE's posterior
  `latent_mean` and `latent_logvar`, sampled here with the keys `codec.encode` would use.
  It may carry `text_context`, the frozen text encoder's hidden states computed outside:
  after caption dropout (HostTextEncoder), or before it when `empty_context` (the empty
  caption's hidden states [L, D], from the same cache) is given to select per example.
  """
  batch = dict(batch)
  b = batch['text_tokens'].shape[0]
  rng, first = update_rng(rng, state.step, config.accumulation_steps, b)
  # The frozen codec (identity, or a VAE) runs outside the differentiated function, and
  # draws each example's posterior sample from that example's key.
  encode_keys = example_keys(rng, first, b, _ENCODE)
  if 'latent_mean' in batch:
    batch['image'] = jax.vmap(lambda m, v, k: codec.sample(m[None], v[None], k)[0])(
        batch.pop('latent_mean'), batch.pop('latent_logvar'), encode_keys)
  else:
    if config.device_preprocess is not None:
      batch['image'] = preprocess_lib.preprocess(
          batch['image'], example_keys(rng, first, b, _AUGMENT), config.device_preprocess,
          model.config.image_size)
    batch['image'] = jax.vmap(lambda x, k: codec.encode(x[None], k)[0])(
        batch['image'], encode_keys)
  context = batch.pop('text_context', None)
  if context is not None and empty_context is not None:
    drop = caption_drop_mask(config, rng, first, b)[:, None, None]
    context = jnp.where(drop, jnp.asarray(empty_context, context.dtype), context)
  if context is None and not config.train_text_encoder:
    # A frozen encoder runs outside too: neither differentiated nor recomputed there.
    tokens, mask = drop_captions(model.config, config, batch['text_tokens'],
                                 batch['text_mask'], rng, first)
    context = model.apply({'params': state.params}, tokens, mask,
                          method=TextToImage.encode_text)
  if context is not None:
    context = jax.lax.stop_gradient(context)
  def total(params):
    terms = loss_terms(params, model, config, batch, rng, first, context)
    return sum(terms.values()), terms

  (loss, terms), grads = jax.value_and_grad(total, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  old_ms = optimizer_lib.find_multi_steps_state(state.opt_state)
  if old_ms is None:
    applied, num_updates = jnp.array(True), state.step
  else:  # accumulating: an update happened iff MultiSteps counted one
    num_updates = old_ms.gradient_step
    applied = optimizer_lib.find_multi_steps_state(opt_state).gradient_step != num_updates
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads)}
  if len(terms) > 1:
    metrics.update({f'loss_{k}': v for k, v in terms.items()})
  if config.nan_policy != 'none':
    # One scalar for all gradients (a NaN or Inf anywhere makes the norm so): per-leaf
    # checks cost noticeably more compile time.
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    applied = applied & finite
    metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
  ema = jax.tree_util.tree_map(
      lambda n, o: jnp.where(applied, n, o),
      ema_update(state.ema_params, params, num_updates, config.ema_decay), state.ema_params)
  if not config.train_text_encoder:  # the very same arrays: no p + 0 for frozen weights
    params = dict(params, text_encoder=state.params['text_encoder'])
    ema = dict(ema, text_encoder=state.ema_params['text_encoder'])
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return new_state, metrics


class HostTextEncoder:
  """The frozen text encoder on the host CPU, run before each train step: its FLOPs (and
  a copy of its parameters) live on the host, and the step receives its hidden states as
  `batch['text_context']`. It drops captions exactly as the step does (same keys).

  The train state still holds the encoder's parameters (they are checkpointed with the
  rest); keep them off the accelerator through the state's shardings if memory matters.
  `feed_index`: this process's block of rows in the global batch (process_batch_shard).
  """

  def __init__(self, model: TextToImage, params, config: TrainConfig, feed_index: int = 0):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    self.cpu = jax.devices('cpu')[0]
    # Gathered to host numpy first: sharded params may span devices or processes.
    self.params = jax.device_put(
        multihost_utils.process_allgather(params['text_encoder'], tiled=True), self.cpu)
    self.feed_index = feed_index

    def encode(encoder_params, tokens, mask, rng, step):
      # Example indices are global: this process's rows start at feed_index * rows.
      rng, first = update_rng(rng, step, config.accumulation_steps, config.batch_size)
      first = first + feed_index * tokens.shape[0]
      tokens, mask = drop_captions(model.config, config, tokens, mask, rng, first)
      return model.apply({'params': {'text_encoder': encoder_params}}, tokens, mask,
                         method=TextToImage.encode_text)

    self._encode = jax.jit(encode)

  def __call__(self, batch, step: int, rng):
    """`batch` (this process's rows) plus `text_context` for the train step taken from
    state.step == `step`."""
    args = jax.device_put((batch['text_tokens'], batch['text_mask'], rng,
                           np.int32(step)), self.cpu)
    return dict(batch, text_context=np.asarray(self._encode(self.params, *args)))


def raise_if_nonfinite(metrics, step: int) -> None:
  """nan_policy='stop': the step skipped its update; stop the run with a clear error."""
  if 'nonfinite' in metrics and float(metrics['nonfinite']) > 0:
    raise FloatingPointError(
        f'Step {step}: the loss or the gradients are not finite (loss '
        f'{float(metrics["loss"])}); the update was skipped and training stopped '
        "(nan_policy='stop'). The last checkpoint is intact.")


def create_state(model: TextToImage, config: TrainConfig, tx, codec) -> TrainState:
  """The initial state: random parameters from `config.seed`, with the parts the model
  config names checkpoints for loaded from them."""
  params = init_params(model, jax.random.PRNGKey(config.seed), codec)
  return state_from_params(load_checkpoints(model.config, params), tx)


def state_from_params(params, tx) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=tx.init(params))


def _without_checkpoints(model: TextToImage) -> TextToImage:
  """The same model without checkpoint paths: create_state loads no pretrained part."""
  c = model.config
  if not (c.text_encoder_checkpoint or c.unet_checkpoint):
    return model
  return TextToImage(dataclasses.replace(c, text_encoder_checkpoint=None,
                                         unet_checkpoint=None))


def param_axes(model: TextToImage, codec):
  """The logical axis names of every parameter (a PartitionSpec per leaf), read from the
  boxed init without allocating anything."""
  c = model.config
  x = jax.ShapeDtypeStruct((1,) + c.diffusion_shape(codec), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, c.text_length), jnp.int32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, tokens, tokens)
  return nn.get_partition_spec(boxed)['params']


def state_shardings(model: TextToImage, config: TrainConfig, tx, codec, mesh,
                    rules: partitioning.Rules | None = None) -> TrainState:
  """The NamedSharding of every leaf of the TrainState that `create_state` builds (the
  target of a sharded restore), without allocating anything."""
  rules = config.partitioning.rules if rules is None else rules
  random = _without_checkpoints(model)
  abstract = jax.eval_shape(lambda: create_state(random, config, tx, codec))
  return partitioning.state_shardings(mesh, rules, abstract, param_axes(model, codec))


def create_sharded_state(model: TextToImage, config: TrainConfig, tx, codec, mesh,
                         rules: partitioning.Rules | None = None) -> TrainState:
  """`create_state`, born sharded: each device initialises only its own shards. Pretrained
  parts are read on the host and placed onto the same shardings."""
  shardings = state_shardings(model, config, tx, codec, mesh, rules)
  random = _without_checkpoints(model)
  state = jax.jit(lambda: create_state(random, config, tx, codec), out_shardings=shardings)()
  if random is model:
    return state
  params = partitioning.place(load_checkpoints(model.config, state.params), shardings.params)
  return jax.jit(functools.partial(state_from_params, tx=tx), out_shardings=shardings,
                 donate_argnums=0)(params)


def make_tx(config: TrainConfig):
  frozen = () if config.train_text_encoder else ('text_encoder',)
  return optimizer_lib.make_optimizer(
      config.optimizer, optimizer_lib.num_updates(config.train_steps, config.accumulation_steps),
      frozen, accumulation_steps=config.accumulation_steps)


def learning_rate(config: TrainConfig, step: int) -> float:
  """The scheduled learning rate after `step` train steps (step // k updates)."""
  k = config.accumulation_steps
  return float(optimizer_lib.learning_rate_schedule(
      config.optimizer, optimizer_lib.num_updates(config.train_steps, k))(step // k))


def jit_train_step(model: TextToImage, config: TrainConfig, tx, codec, state: TrainState,
                   batch_sharding, empty_context=None):
  """`train_step` jitted for `state`'s shardings and batches sharded as `batch_sharding`
  (the random key replicated); the old state's buffers are donated to the new one.
  Called as step_fn(state, batch, rng) -> (state, metrics)."""
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  replicated = partitioning.replicated(batch_sharding.mesh)
  return jax.jit(functools.partial(train_step, model=model, config=config, tx=tx, codec=codec,
                                   empty_context=empty_context),
                 in_shardings=(shardings, batch_sharding, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def train(workdir: str, model_config: TextToImageConfig, config: TrainConfig,
          batches: BatchesFn, evaluators: Sequence[Any] = (),
          log: Callable[[str], None] = print, empty_context=None, codec=None) -> TrainState:
  """Trains to `config.train_steps`, resuming from `workdir/checkpoints` if present.

  `evaluators`: `evaluators.PeriodicEvaluator`s (or anything with a `name` and that call
  signature), called after every step with the EMA params.
  `empty_context`: with batches from an encoder cache, its empty caption's hidden states
  (see train_step). `codec`: the model's (default: built from its config).
  """
  model = TextToImage(model_config)
  if codec is None:
    codec = make_codec(model_config.pixel_space, model_config.autoencoder_path)
  model_config.check_codec(codec)
  tx = make_tx(config)
  pconfig = config.partitioning
  distributed.check_collectives(pconfig.collectives)
  mesh = partitioning.make_mesh(pconfig)
  batch_sharding = partitioning.batch_sharding(mesh, pconfig.rules)
  num_shards = partitioning.num_batch_shards(batch_sharding)
  if config.batch_size % num_shards:
    raise ValueError(f'batch_size {config.batch_size} does not divide over the {num_shards} '
                     f"batch shards of mesh {dict(mesh.shape)} ('data' x 'fsdp').")
  _, num_feeds = partitioning.process_batch_shard(batch_sharding)
  ckpt = checkpoints.Checkpointer(f'{workdir}/checkpoints', config.keep_checkpoints,
                                  config.keep_every, config.async_checkpoints)
  # However the run ends (done, preempted, an exception), pending saves are written and
  # the writers (W&B, OpenTelemetry, the profiler) are flushed and closed.
  preemption = checkpoints.Preemption(ckpt)
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(ckpt.close)
    cleanup.enter_context(preemption.handling())  # from here on, SIGTERM stops cleanly
    data_state = {'position': 0}
    if ckpt.latest_step() is None:
      state = create_sharded_state(model, config, tx, codec, mesh, pconfig.rules)
    else:  # straight onto the mesh: nothing initialised, no pretrained weights read
      abstract = jax.eval_shape(
          lambda: create_state(_without_checkpoints(model), config, tx, codec))
      state, data_state = ckpt.restore(
          abstract, shardings=state_shardings(model, config, tx, codec, mesh, pconfig.rules),
          set_aside=True)
      log(f'Resumed from step {int(state.step)} (data position {data_state["position"]}).')
    distributed.check_same_on_all_processes(
        {'step': int(state.step), 'data position': data_state['position']}, pconfig.collectives)
    monitor = monitoring.Monitor(
        workdir, config.monitoring, total_steps=config.train_steps, batch_size=config.batch_size,
        first_step=int(state.step), log=log,
        hparams={'train': dataclasses.asdict(config), 'model': dataclasses.asdict(model_config)})
    cleanup.callback(monitor.close)
    writer = monitor.writer
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    log(f'{num_params:,} parameters; training to step {config.train_steps} with batch '
        f'{config.batch_size}.')

    step_fn = jit_train_step(model, config, tx, codec, state, batch_sharding, empty_context)
    # Host numpy: every process passes the same key, replicated by the jit.
    rng = np.asarray(jax.random.PRNGKey(config.seed + 1))
    host_encoder = (HostTextEncoder(model, state.params, config,
                                   partitioning.process_batch_shard(batch_sharding)[0])
                    if config.text_encoder_on_host else None)
    first_step = int(state.step)
    data = batches(data_state['position'])
    # An iterator with state beyond its position (e.g. bucketing's partial buckets) is
    # checkpointed and restored through get_state / set_state.
    stateful = hasattr(data, 'get_state') and hasattr(data, 'set_state')
    if stateful and 'iterator' in data_state:
      data.set_state(data_state['iterator'])
    pending = []
    for step in preemption.steps(range(first_step + 1, config.train_steps + 1)):
      batch = next(data)
      batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
      if host_encoder:
        batch = host_encoder(batch, step - 1, rng)
      if len(batch['text_tokens']) * num_feeds != config.batch_size:
        raise ValueError(f'The data gave {len(batch["text_tokens"])} rows; batch_size '
                         f'{config.batch_size} from {num_feeds} process(es) needs '
                         f'{config.batch_size // num_feeds} per process.')
      # This process's rows -> one global array per key, sharded over 'data' x 'fsdp'.
      batch = partitioning.global_batch(batch, batch_sharding, num_feeds)
      monitor.before_step(step, step_fn, state, batch, rng)  # FLOPs once; profiler
      state, metrics = step_fn(state, batch, rng)
      if config.nan_policy == 'stop':
        raise_if_nonfinite(metrics, step)
      data_state = {'position': data_state['position'] + 1}
      pending.append(metrics)
      last = step == config.train_steps
      monitor.after_step(step, state, last)
      if step % config.log_every == 0 or last:
        means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
        pending = []
        log(monitor.report(step, means, {'train/learning_rate': learning_rate(config, step)}))
      stop = preemption.reached(step)  # SIGTERM: checkpoint this step, then stop
      if step % config.checkpoint_every == 0 or last or stop:
        if stateful:
          data_state = dict(data_state, iterator=data.get_state())
        ckpt.save(state, data_state, step=step)  # asynchronous
      if stop:
        ckpt.wait()
        log(f'Stopped at step {step} on SIGTERM (preemption); its checkpoint is written: run '
            'again to resume.')
        break
      for evaluator in evaluators:
        metrics = evaluator(step, params=state.ema_params, writer=writer, last=last)
        if metrics is not None:
          # The console gets the headline metrics; breakdowns (by length, bucket) are
          # in the writers.
          log(f'eval {evaluator.name} @ {step}: ' + ', '.join(
              f'{k.split("/", 1)[-1]} {v:.3f}' for k, v in metrics.items()
              if k.count('/') <= 1))
    ckpt.wait()
  return state
