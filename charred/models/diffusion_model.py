"""The text-to-image diffusion model: a `base_model.BaseModel`.

`DiffusionModel` owns everything that makes a batch into a loss: the network
(`TextToImage`), its frozen codec (pixels or a VAE), and the training objective
(`ObjectiveConfig`: caption dropout, timestep and noise draws, loss weighting, the glyph
losses). The trainer only differentiates `loss_fn` and applies the update; it never looks
inside a batch. Caption dropout and text encoding are the model's too, on the device
inside the loss or on the host before the step (`host_stage`). Sampling goes through
`generator`.

Every random draw for example n of an optimizer update depends on (update key, n) only
(`example_keys`), so k micro-batches of b examples see what one batch of k*b sees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from charred import tokenizer
from charred.models import base_model
from charred.models import diffusion
from charred.models import losses
from charred.models import preprocess as preprocess_lib
from charred.models.base_model import batch_size_of
from charred.models import quantize
from charred.models import text_frame
from charred.models.generation import ImageGenerator
from charred.models.image_codec import PixelCodec
from charred.models.text_to_image import TextToImage, TextToImageConfig, init_params
from charred.models.text_to_image import anchor_shift, roll, text_layout

# One random stream per kind of draw, per example.
_DROP, _TIMESTEP, _NOISE, _ENCODE, _AUGMENT = range(5)

# What a batch may hold: `image` ([B, H, W, 3] in [-1, 1], or uint8 of one raw size with
# ObjectiveConfig.device_preprocess), or from an encoder cache the VAE posterior's
# `latent_mean` and `latent_logvar` and the text encoder's `text_context`; the caption's
# `text_tokens` and `text_mask` [B, L]; from the renderer, the glyph maps and the quoted
# text's box `text_box` [B, 4] (what a box-conditioned model is told).
BATCH_KEYS = ('image', 'latent_mean', 'latent_logvar', 'text_tokens', 'text_mask',
              'text_context', 'glyph_tokens', 'glyph_chars', 'blank_tokens', 'text_box')


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """What the model is trained to do, beyond predicting its diffusion target."""
  # Captions replaced by the empty caption this often, so that classifier-free guidance
  # has an unconditional model to contrast with.
  caption_dropout: float = 0.1
  train_text_encoder: bool = True  # False: the encoder is frozen (e.g. pretrained ByT5)
  # Min-SNR-gamma loss weighting (arXiv 2303.09556; the paper uses 5); None: unweighted.
  min_snr_gamma: float | None = None
  # Offset noise: noise + offset_noise * N(0, 1) of shape [B, 1, 1, C] (0.1 is usual).
  offset_noise: float = 0.0
  # How training timesteps are drawn: 'uniform' over [0, num_train_timesteps), or
  # 'logit_normal' (Esser et al. 2024): t / T = sigmoid(N(mean, std)), which spends the
  # steps on the middle noise levels where the layout is decided, not on near-clean ones.
  timestep_sampling: str = 'uniform'
  timestep_logit_mean: float = 0.0
  timestep_logit_std: float = 1.0
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
  # Resize, crop, flip and normalise uint8 images of one raw size inside the step, on
  # the accelerator (the host ships 4x fewer bytes); None: `image` arrives ready.
  device_preprocess: preprocess_lib.PreprocessConfig | None = None

  def __post_init__(self):
    if not 0.0 <= self.caption_dropout <= 1.0:
      raise ValueError(f'caption_dropout must be in [0, 1], got {self.caption_dropout}.')
    if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
      raise ValueError(f'min_snr_gamma must be None or > 0, got {self.min_snr_gamma}.')
    for name in ('char_loss_weight', 'attention_loss_weight', 'glyph_loss_weight',
                 'offset_noise'):
      if not getattr(self, name) >= 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}.')
    if self.timestep_sampling not in losses.TIMESTEP_SAMPLINGS:
      raise ValueError(f'Unknown timestep_sampling {self.timestep_sampling!r}; expected one '
                       f'of {losses.TIMESTEP_SAMPLINGS}.')
    if not self.timestep_logit_std > 0:
      raise ValueError(f'timestep_logit_std must be > 0, got {self.timestep_logit_std}.')

  def diffusion_only(self) -> ObjectiveConfig:
    """The plain diffusion loss of the conditional model: no caption dropout, no glyph
    terms. What validation measures, comparable across runs with and without them."""
    return dataclasses.replace(self, caption_dropout=0.0, attention_loss_weight=0.0,
                               char_loss_weight=0.0, glyph_loss_weight=0.0,
                               device_preprocess=None)


def example_keys(rng, first_example, batch_size: int, stream: int):
  """Keys [B, ...] of one random stream: example i's is drawn from
  fold_in(fold_in(rng, first_example + i), stream)."""
  index = first_example + jnp.arange(batch_size)
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, i), stream))(index)


def fit_length(context, length: int):
  """Hidden states [L, D] cut or zero-padded to [length, D]. The empty caption's states are
  cached once at the longest length, while caption-length buckets give shorter batches;
  positions past the caption are masked out of cross-attention, so cutting or padding
  them changes nothing."""
  context = context[:length]
  return jnp.pad(context, ((0, length - context.shape[0]), (0, 0)))


class DiffusionModel(base_model.BaseModel):
  """A text-to-image diffusion model with its codec and training objective.

  `empty_context`: with batches from an encoder cache (which carry `text_context`
  computed before caption dropout), the empty caption's hidden states [L, D] from the
  same cache, substituted for each dropped caption (cut or zero-padded to the batch's
  text length, `fit_length`). `quantization`: a mode of `quantize.MODES`, whose int8
  params `quantized` makes (such a model samples and evaluates; it does not train).
  """

  def __init__(self, config: TextToImageConfig, objective: ObjectiveConfig = ObjectiveConfig(),
               codec=None, empty_context=None, quantization: str | None = None):
    if codec is None and not config.pixel_space:
      raise ValueError('a latent-space model needs codec= (its frozen VAE: '
                       'charred.models.pretrained.make_codec).')
    self.config = config
    self.objective = objective
    self.codec = codec or PixelCodec()
    config.check_codec(self.codec)
    self.module = TextToImage(config)
    self.quantization = quantization
    if quantization is not None:
      self.module = quantize.quantize_module(self.module, quantization)
    self.empty_context = empty_context
    if objective.char_loss_weight > 0 and not config.unet.char_head_classes:
      raise ValueError('char_loss_weight needs a character head: set '
                       'UNetConfig.char_head_classes (e.g. 256).')

  def replace(self, **kwargs) -> DiffusionModel:
    """The same model with another `config`, `objective`, `codec`, `empty_context` or
    `quantization`."""
    args = dict(config=self.config, objective=self.objective, codec=self.codec,
                empty_context=self.empty_context, quantization=self.quantization)
    return DiffusionModel(**{**args, **kwargs})

  batch_keys = BATCH_KEYS

  def quantized(self, params, mode: str) -> tuple[DiffusionModel, Any]:
    """(this model with int8 kernels in its networks, its VAE's included, `params`
    quantised for it); `mode` is one of `quantize.MODES`."""
    if self.quantization is not None:
      raise ValueError(f'This model is already quantised ({self.quantization}).')
    model = self.replace(codec=quantize.quantize_codec(self.codec, mode), quantization=mode)
    return model, quantize.quantize_params(model.module, params, *self.abstract_inputs())

  # The parameter collections the optimizer leaves untouched.
  @property
  def frozen(self) -> tuple[str, ...]:
    return () if self.objective.train_text_encoder else ('text_encoder',)

  def hparams(self) -> dict[str, Any]:
    return {'model': dataclasses.asdict(self.config),
            'objective': dataclasses.asdict(self.objective)}

  def init_params(self, rng):
    """Random parameters (nothing read from files; see pretrained.load_checkpoints)."""
    return init_params(self.module, rng, self.codec)

  def param_axes(self):
    """Read from the boxed init's shapes (nn.with_logical_partitioning's names)."""
    boxed = jax.eval_shape(self.module.init, jax.random.PRNGKey(0), *self.abstract_inputs())
    return nn.get_partition_spec(boxed)['params']

  def abstract_inputs(self):
    """(x, t, tokens, mask) shapes of one example, for `module.init` without data."""
    c = self.config
    x = jax.ShapeDtypeStruct((1,) + c.diffusion_shape(self.codec), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, c.text_length), jnp.int32)
    return x, jax.ShapeDtypeStruct((1,), jnp.int32), tokens, tokens

  # -- Caption dropout ---------------------------------------------------------------------

  def caption_drop_mask(self, rng, first_example, batch_size: int):
    """bool [B]: the examples whose caption is replaced by the empty caption."""
    keys = example_keys(rng, first_example, batch_size, _DROP)
    p = self.objective.caption_dropout
    return jax.vmap(lambda k: jax.random.bernoulli(k, p))(keys)

  def drop_captions(self, tokens, mask, rng, first_example=0):
    """Captions replaced by the empty caption with probability `caption_dropout`."""
    drop = self.caption_drop_mask(rng, first_example, tokens.shape[0])[:, None]
    # As long as this batch's tokens: caption-length buckets may be shorter than text_length.
    empty_tokens, empty_mask = (jnp.asarray(a) for a in tokenizer.encode_batch(
        [''], tokens.shape[1]))
    return jnp.where(drop, empty_tokens, tokens), jnp.where(drop, empty_mask, mask)

  def encode_text(self, params, tokens, mask):
    return self.module.apply({'params': params}, tokens, mask,
                             method='encode_text')

  # -- The frozen text encoder on the host --------------------------------------------------

  def check_host_stage(self) -> None:
    if self.objective.train_text_encoder:
      raise ValueError('TrainConfig.text_encoder_on_host needs a frozen encoder '
                       '(ObjectiveConfig.train_text_encoder=False): only a frozen encoder '
                       'can run outside the gradient.')

  def host_stage(self, params, gather: Callable[[Any], Any] = lambda tree: tree
                 ) -> base_model.HostStage:
    """The frozen text encoder on the host CPU: the batch gains the hidden states of its
    captions after dropout, `text_context` (what `text_context` then passes through), as
    the loss would drop and encode them. Its FLOPs and a copy of its parameters live on the
    host; the train state holds them too (keep them off the accelerator through the
    state's shardings if memory matters)."""
    self.check_host_stage()
    cpu = jax.devices('cpu')[0]
    encoder_params = jax.device_put(gather(params['text_encoder']), cpu)

    @jax.jit
    def encode(encoder_params, tokens, mask, rng, first_example):
      tokens, mask = self.drop_captions(tokens, mask, rng, first_example)
      return self.encode_text({'text_encoder': encoder_params}, tokens, mask)

    def stage(batch, rng, first_example):
      args = jax.device_put((batch['text_tokens'], batch['text_mask'], rng,
                             np.int32(first_example)), cpu)
      return dict(batch, text_context=np.asarray(encode(encoder_params, *args)))

    return stage

  # -- The loss ----------------------------------------------------------------------------

  def diffusion_inputs(self, batch, rng, first_example=0):
    """The clean diffusion inputs x0 [B, ...]: `image` through the frozen codec (after
    device preprocessing of uint8 images), or a sample of a cached VAE posterior drawn
    with the keys `codec.encode` would use."""
    b = batch_size_of(batch)
    encode_keys = example_keys(rng, first_example, b, _ENCODE)
    if 'latent_mean' in batch:
      return jax.vmap(lambda m, v, k: self.codec.sample(m[None], v[None], k)[0])(
          batch['latent_mean'], batch['latent_logvar'], encode_keys)
    images = batch['image']
    if self.objective.device_preprocess is not None:
      images = preprocess_lib.preprocess(
          images, example_keys(rng, first_example, b, _AUGMENT),
          self.objective.device_preprocess, self.config.image_size)
    return jax.vmap(lambda x, k: self.codec.encode(x[None], k)[0])(images, encode_keys)

  def text_context(self, params, batch, rng, first_example=0):
    """The text encoder's hidden states for the captions after dropout, where they do not
    depend on trainable weights (cached, computed on the host, or a frozen encoder),
    behind stop_gradient; None where the loss encodes the captions itself."""
    context = batch.get('text_context')
    if context is not None and self.empty_context is not None:
      drop = self.caption_drop_mask(rng, first_example, context.shape[0])[:, None, None]
      empty = fit_length(jnp.asarray(self.empty_context, context.dtype), context.shape[1])
      context = jnp.where(drop, empty, context)
    if context is None and not self.objective.train_text_encoder:
      tokens, mask = self.drop_captions(batch['text_tokens'], batch['text_mask'], rng,
                                        first_example)
      context = self.encode_text(params, tokens, mask)
    return None if context is None else jax.lax.stop_gradient(context)

  def loss_fn(self, params, batch, rng, first_example=0):
    """(the training loss, {term: value}) of one batch; example i of the batch is example
    `first_example + i` of the update whose key is `rng`."""
    check_batch(batch)
    x0 = self.diffusion_inputs(batch, rng, first_example)
    context = self.text_context(params, batch, rng, first_example)
    terms = self.loss_terms(params, dict(batch, image=x0), rng, first_example, context)
    return sum(terms.values()), terms

  def loss_terms(self, params, batch, rng, first_example=0, context=None
                 ) -> dict[str, jax.Array]:
    """{'diffusion': mean squared error against the configured target at the drawn
    timesteps, in float32 whatever the compute dtype, optionally Min-SNR-gamma weighted
    per example} plus, with their weights set, {'attention': ..., 'char': ...}.

    `batch['image']` is x0, already through the codec. `context`: the captions' hidden
    states after dropout (see text_context); None encodes them here, differentiably.
    """
    mc, objective = self.config, self.objective
    layout = self.layout(batch)
    images = batch['image']
    if mc.text_frame is not None and mc.text_frame.joint:
      # The frame is diffused beside the image: its clean target is the clean image's.
      frame = text_frame.text_frame(layout, images.shape[1:3], mc.text_frame, mc.image_size)
      images = jnp.concatenate([images, text_frame.into_frame(images, frame)], axis=-1)
    b = images.shape[0]
    t = jax.vmap(lambda k: losses.sample_timestep(
        k, mc.noise_schedule.num_train_timesteps, objective.timestep_sampling,
        objective.timestep_logit_mean, objective.timestep_logit_std))(
            example_keys(rng, first_example, b, _TIMESTEP))
    alpha_bar = jnp.asarray(mc.noise_schedule.alphas_cumprod())[t]
    noise = jax.vmap(lambda k: losses.sample_noise(k, images.shape[1:], objective.offset_noise))(
        example_keys(rng, first_example, b, _NOISE))
    x_t = diffusion.add_noise(images, noise, alpha_bar)
    tokens, mask = self.drop_captions(batch['text_tokens'], batch['text_mask'], rng,
                                      first_example)
    if context is None:
      context = self.encode_text(params, tokens, mask)
    glyphs = objective.attention_loss_weight > 0
    chars = objective.char_loss_weight > 0
    for needed, key in ((glyphs or objective.glyph_loss_weight > 0, 'glyph_tokens'),
                        (glyphs and objective.attention_loss_blank, 'blank_tokens'),
                        (chars, 'glyph_chars')):
      if needed and key not in batch:
        raise ValueError(f'The glyph losses need `{key}` in the batch, which only the '
                         "rendered typography source gives (DataConfig.source='render').")
    if glyphs or chars:  # cross-attention weights and character logits are sown
      prediction, intermediates = self.module.apply(
          {'params': params}, x_t, t, context, mask, layout, method='denoise',
          mutable=['intermediates'])
    else:
      prediction = self.module.apply({'params': params}, x_t, t, context, mask, layout,
                                     method='denoise')
    target = diffusion.training_target(mc.prediction_type, images, noise, alpha_bar)
    pixel_weights = None
    if objective.glyph_loss_weight > 0:
      pixel_weights = 1.0 + objective.glyph_loss_weight * (batch['glyph_tokens'] >= 0)
    loss = losses.per_example_mse(prediction, target, pixel_weights)
    if objective.min_snr_gamma is not None:
      loss = loss * losses.min_snr_weight(alpha_bar, mc.prediction_type,
                                          objective.min_snr_gamma)
    terms = {'diffusion': jnp.mean(loss)}
    keep = ~self.caption_drop_mask(rng, first_example, b)
    sown = flax.traverse_util.flatten_dict(intermediates) if glyphs or chars else {}
    glyph_maps = {k: batch[k] for k in ('glyph_tokens', 'glyph_chars') if k in batch}
    blank = batch['blank_tokens'] if objective.attention_loss_blank else None
    if (glyphs or chars) and mc.anchor_patches:
      # The U-Net attended in its anchored frame: move the pixel targets there too.
      shift = anchor_shift(layout, x_t.shape[1:3], mc.patch_size)
      glyph_maps = {k: roll(v, -shift * self.codec.downsample_factor)
                    for k, v in glyph_maps.items()}
    if (glyphs or chars) and mc.text_frame is not None:
      # The U-Net ran on the image, then on its text frame: targets for both passes.
      frame = text_frame.text_frame(layout, mc.image_size, mc.text_frame, mc.image_size)
      glyph_maps = {k: jnp.concatenate([v, text_frame.labels_into_frame(v, frame)])
                    for k, v in glyph_maps.items()}
      keep = jnp.concatenate([keep, keep])
      blank = None if blank is None else jnp.concatenate([blank, blank])
    if glyphs:
      maps = [v for path, value in sown.items() if 'cross_attention' in path for v in value]
      terms['attention'] = objective.attention_loss_weight * losses.glyph_attention_loss(
          maps, glyph_maps['glyph_tokens'], keep, blank)
    if chars:
      logits = [v for path, value in sown.items() if 'char_logits' in path for v in value]
      terms['char'] = objective.char_loss_weight * losses.glyph_char_loss(
          logits[0], glyph_maps['glyph_chars'], keep)
    return terms

  def layout(self, batch):
    """The box-conditioned model's TextLayout of a batch (None for other models), from
    the captions before dropout: a dropped caption keeps its box frame, as the
    unconditional branch of guided sampling does."""
    if not self.config.box_conditioning:
      return None
    if 'text_box' not in batch:
      raise ValueError('A box-conditioned model needs `text_box` in the batch, which the '
                       "rendered typography source gives (DataConfig.source='render').")
    return text_layout(batch['text_tokens'], batch['text_mask'], batch['text_box'],
                       self.config.image_size)

  # -- Sampling ----------------------------------------------------------------------------

  def generator(self, params, **kwargs: Any) -> ImageGenerator:
    """Prompts -> images with `params` (kwargs as ImageGenerator: num_steps,
    guidance_scale, scheduler, ...)."""
    return ImageGenerator(self.module, params, codec=self.codec, **kwargs)

  def predict_batch(self, params, batch, rng, **kwargs: Any) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] sampled for the captions `text_tokens` and
    `text_mask` (and a box-conditioned model's `text_box`); kwargs as `generator`. Each
    call compiles the sampler: for many batches, call one `generator`'s `sample`."""
    return self.generator(params, **kwargs).sample(
        batch['text_tokens'], batch['text_mask'], rng, batch.get('text_box'))


def check_batch(batch) -> None:
  """Static (trace-time) checks of a training batch: captions [B, L] with their mask,
  and one batch size across keys."""
  chex.assert_rank(batch['text_tokens'], 2)
  chex.assert_equal_shape([batch['text_tokens'], batch['text_mask']])
  chex.assert_equal_shape_prefix(list(batch.values()), 1)
