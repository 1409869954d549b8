"""Prompts in, images out: tokenise, encode once, sample with guidance."""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from charred import tokenizer
from charred.models import sampling
from charred.models import schedulers
from charred.models import tracing
from charred.models.image_codec import PixelCodec
from charred.models.text_to_image import TextToImage, text_layout


class PromptTooLongError(ValueError):
  pass


def check_boxes(boxes, image_size: tuple[int, int]) -> np.ndarray:
  """int32 [N, 4] (x0, y0, x1, y1) pixel boxes, each inside an image of `image_size`
  (height, width) and not empty; ValueError naming the first that is not."""
  boxes = np.asarray(boxes)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f'Boxes must be (x0, y0, x1, y1) each, got shape {boxes.shape}.')
  h, w = image_size
  for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
      raise ValueError(f'Box {i} ({x0},{y0},{x1},{y1}) is not inside the {w}x{h} image '
                       'with x0 < x1 and y0 < y1.')
  return boxes.astype(np.int32)


def tokenize_prompts(prompts: Sequence[str], length: int, text_tokenizer=tokenizer,
                     owner: str = "the model's") -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) [N, length] of `prompts`; PromptTooLongError, naming `owner`'s maximum,
  for one that does not fit with its EOS."""
  for prompt in prompts:
    if text_tokenizer.num_tokens(prompt) > length:
      raise PromptTooLongError(
          f'Prompt is {text_tokenizer.num_tokens(prompt)} tokens with EOS, longer than '
          f'{owner} maximum of {length}: {prompt[:60]!r}')
  return text_tokenizer.encode_batch(list(prompts), length)

class ImageGenerator:
  """Samples images for prompts from a TextToImage model and its parameters.

  `scheduler` is a name in `schedulers.SCHEDULERS` (built with `spacing`, and for
  DDPM/DDIM clipping x0 to [-1, 1] in pixel space) or a `schedulers.Scheduler`. Either
  way the model's noise schedule and prediction type replace the scheduler's own.
  `guidance_rescale` is diffusers' phi (0.7 with a zero-terminal-SNR schedule). `codec`
  defaults to pixels; a latent-space model needs its VAE's. `progress`: a tqdm bar over
  the sampling steps of each batch, drawn from inside the compiled loop.
  """

  def __init__(self, model: TextToImage, params, *, num_steps: int = 50,
               guidance_scale: float = 3.0, spacing: str = 'trailing', codec=None,
               scheduler: str | schedulers.Scheduler = 'ddim', guidance_rescale: float = 0.0,
               progress: bool = False):
    self.model = model
    if codec is None and not model.config.pixel_space:
      raise ValueError('a latent-space model needs codec= (its frozen VAE: '
                       'charred.models.pretrained.make_codec).')
    self.codec = codec or PixelCodec()
    model.config.check_codec(self.codec)
    if not 0.0 <= guidance_rescale <= 1.0:
      raise ValueError(f'guidance_rescale must be in [0, 1], got {guidance_rescale}.')
    self.params = params
    self.num_steps = num_steps
    self.guidance_scale = guidance_scale
    self.guidance_rescale = guidance_rescale
    self.progress = progress
    self.scheduler = self._bind(scheduler, spacing)
    # A second trace of one signature (a retrace on every call) raises.
    self._sample = jax.jit(tracing.once_per_signature(self._sample_impl, 'sample'))

  def _bind(self, scheduler, spacing: str) -> schedulers.Scheduler:
    c = self.model.config
    model_kwargs = dict(schedule=c.noise_schedule, prediction_type=c.prediction_type)
    if not isinstance(scheduler, str):
      return dataclasses.replace(scheduler, **model_kwargs)
    cls = schedulers.lookup(scheduler)
    if 'clip_sample' in {f.name for f in dataclasses.fields(cls)}:
      model_kwargs['clip_sample'] = 1.0 if c.pixel_space else None
    return cls(spacing=spacing, **model_kwargs)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    # The model's own tokenizer: ByT5 bytes (this module's default) or a subword one.
    return tokenize_prompts(prompts, self.model.config.text_length,
                            self.model.config.text_tokenizer() or tokenizer)

  def sample(self, tokens, mask, rng, boxes=None) -> jax.Array:
    """Samples [B, H, W, 3] in [-1, 1] for tokenised captions [B, L] (and, for a
    box-conditioned model, `boxes` [B, 4]); one program per batch shape."""
    return self._sample(self.params, tokens, mask, rng, boxes)

  def _sample_impl(self, params, tokens, mask, rng, boxes=None):
    context, uncond = self.encode_prompts(params, tokens, mask)
    x = self.sample_loop(params, tokens, mask, context, uncond, rng, boxes)
    return self.decode(self.codec_params(), x)

  # The three stages of `_sample_impl`, each a function of its parameters and arrays (what
  # `charred.aot` exports one by one).

  def encode_prompts(self, params, tokens, mask):
    """(the captions' hidden states [B, L, D], the empty caption's broadcast to them)."""
    c = self.model.config
    apply = functools.partial(self.model.apply, {'params': params})
    # Methods by name: a quantised model (charred.models.quantize) is a subclass that
    # overrides them.
    context = apply(tokens, mask, method='encode_text')
    # The unconditional branch is the empty caption, as caption dropout trains it.
    empty_tokens, empty_mask = (jnp.asarray(a) for a in tokenizer.encode_batch([''], c.text_length))
    uncond = apply(empty_tokens, empty_mask, method='encode_text')
    return context, jnp.broadcast_to(uncond, (tokens.shape[0],) + uncond.shape[1:])

  def sample_loop(self, params, tokens, mask, context, uncond, rng, boxes=None):
    """The guided sampling loop from noise drawn with `rng`: [B, h, w, C] in the codec's
    space. `tokens` place a box-conditioned model's `boxes`; other models ignore them."""
    c = self.model.config
    apply = functools.partial(self.model.apply, {'params': params})
    b = tokens.shape[0]
    _, empty_mask = tokenizer.encode_batch([''], c.text_length)
    uncond_mask = jnp.broadcast_to(jnp.asarray(empty_mask), mask.shape)
    noise = jax.random.normal(rng, (b,) + c.sampled_shape(self.codec), jnp.float32)
    layout = None if boxes is None else text_layout(tokens, mask, boxes, c.image_size)

    def denoise(x, t, ctx, m):
      # Guidance stacks the unconditional branch under the conditional one: both are
      # drawn in the same boxes.
      tiled = None if layout is None else jax.tree_util.tree_map(
          lambda a: jnp.concatenate([a] * (x.shape[0] // b)), layout)
      return apply(x, t, ctx, m, tiled, method='denoise')

    return sampling.sample(
        denoise, noise, context, mask, uncond, uncond_mask, scheduler=self.scheduler,
        num_steps=self.num_steps, guidance_scale=self.guidance_scale,
        guidance_rescale=self.guidance_rescale, rng=jax.random.fold_in(rng, 1),
        progress=self.progress)

  def codec_params(self):
    """The codec's parameters (a VAE's; {} for pixels), as `decode` takes them."""
    return getattr(self.codec, 'params', {})

  def decode(self, codec_params, x):
    """Images [B, H, W, 3] in [-1, 1] from `sample_loop`'s output, with `codec_params` in
    place of the codec's own."""
    codec = self.codec
    if hasattr(codec, 'params'):
      codec = copy.copy(codec)
      codec.params = codec_params
    return codec.decode(x[..., :codec.channels])  # a joint text frame's channels follow

  def __call__(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 64,
               boxes=None) -> np.ndarray:
    """Images uint8 [N, H, W, 3] for N prompts; deterministic per (seed, prompt order).
    `boxes` [N, 4]: where each prompt's quoted text goes (x0, y0, x1, y1 in pixels), for a
    box-conditioned model (which needs them) only."""
    box_model = self.model.config.box_conditioning
    if box_model != (boxes is not None):
      raise ValueError('A box-conditioned model needs boxes= (one per prompt).' if box_model
                       else 'boxes= is for box-conditioned models; this one places text itself.')
    if boxes is not None:
      boxes = check_boxes(boxes, self.model.config.image_size)
      if len(boxes) != len(prompts):
        raise ValueError(f'{len(boxes)} boxes for {len(prompts)} prompts.')
    tokens, mask = self.tokenize(prompts)
    rng = jax.random.PRNGKey(seed)
    images = []
    for start in range(0, len(prompts), batch_size):
      chunk = slice(start, start + batch_size)
      n = len(tokens[chunk])
      # Pad the last chunk to a full batch so every call reuses one compiled program.
      pad = (0, batch_size - n) if len(prompts) > batch_size else (0, 0)
      t = np.pad(tokens[chunk], (pad, (0, 0)))
      m = np.pad(mask[chunk], (pad, (0, 0)))
      bx = None
      if boxes is not None:  # padding rows get a whole-image box
        h, w = self.model.config.image_size
        bx = np.pad(boxes[chunk], (pad, (0, 0)))
        bx[n:] = (0, 0, w, h)
      x = self.sample(t, m, jax.random.fold_in(rng, start), bx)
      images.append(np.asarray(x)[:n])
    return to_uint8(np.concatenate(images))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 pixels."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)
