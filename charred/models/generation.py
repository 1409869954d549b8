"""Prompts in, images out: tokenise, encode once, sample with guidance."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from charred import tokenizer
from charred.models import sampling
from charred.models import schedulers
from charred.models.image_codec import PixelCodec
from charred.models.text_to_image import TextToImage


class PromptTooLongError(ValueError):
  pass


class ImageGenerator:
  """Samples images for prompts from a TextToImage model and its parameters.

  `scheduler` is a name in `schedulers.SCHEDULERS` (built with `spacing`, and for
  DDPM/DDIM clipping x0 to [-1, 1] in pixel space) or a `schedulers.Scheduler`. Either
  way the model's noise schedule and prediction type replace the scheduler's own.
  `guidance_rescale` is diffusers' phi (0.7 with a zero-terminal-SNR schedule). `codec`
  defaults to pixels; a latent-space model needs its VAE's.
  """

  def __init__(self, model: TextToImage, params, *, num_steps: int = 50,
               guidance_scale: float = 3.0, spacing: str = 'trailing', codec=None,
               scheduler: str | schedulers.Scheduler = 'ddim', guidance_rescale: float = 0.0):
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
    self.scheduler = self._bind(scheduler, spacing)
    self._sample = jax.jit(self._sample_impl)

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
    length = self.model.config.text_length
    # The model's own tokenizer: ByT5 bytes (this module's default) or a subword one.
    text_tokenizer = self.model.config.text_tokenizer() or tokenizer
    for prompt in prompts:
      if text_tokenizer.num_tokens(prompt) > length:
        raise PromptTooLongError(
            f'Prompt is {text_tokenizer.num_tokens(prompt)} tokens with EOS, longer than '
            f"the model's maximum of {length}: {prompt[:60]!r}")
    return text_tokenizer.encode_batch(list(prompts), length)

  def _sample_impl(self, params, tokens, mask, rng):
    c = self.model.config
    apply = functools.partial(self.model.apply, {'params': params})
    context = apply(tokens, mask, method=TextToImage.encode_text)
    # The unconditional branch is the empty caption, as caption dropout trains it.
    empty_tokens, empty_mask = (jnp.asarray(a) for a in tokenizer.encode_batch([''], c.text_length))
    uncond = apply(empty_tokens, empty_mask, method=TextToImage.encode_text)
    b = tokens.shape[0]
    uncond = jnp.broadcast_to(uncond, (b,) + uncond.shape[1:])
    uncond_mask = jnp.broadcast_to(empty_mask, mask.shape)
    noise = jax.random.normal(rng, (b,) + c.diffusion_shape(self.codec), jnp.float32)
    denoise = lambda x, t, ctx, m: apply(x, t, ctx, m, method=TextToImage.denoise)
    x = sampling.sample(
        denoise, noise, context, mask, uncond, uncond_mask, scheduler=self.scheduler,
        num_steps=self.num_steps, guidance_scale=self.guidance_scale,
        guidance_rescale=self.guidance_rescale, rng=jax.random.fold_in(rng, 1))
    return self.codec.decode(x)

  def __call__(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """Images uint8 [N, H, W, 3] for N prompts; deterministic per (seed, prompt order)."""
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
      x = self._sample(self.params, t, m, jax.random.fold_in(rng, start))
      images.append(np.asarray(x)[:n])
    return to_uint8(np.concatenate(images))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 pixels."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)
