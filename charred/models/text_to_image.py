"""A byte-level text encoder conditioning a U-Net: the charred model.

Parameters live under `text_encoder/...` (t5x names) and `unet/...` (diffusers names).
The tiny default works in pixel space, as DeepFloyd IF's first stage does; a latent
model puts a frozen VAE in front (`image_codec.LatentCodec`).
"""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from charred import tokenizer
from charred.models import diffusion
from charred.models import text_frame as frames
from charred.models.t5_encoder import T5Encoder, T5EncoderConfig
from charred.models.unet import TextLayout, UNet, UNetConfig, sinusoidal_positions

# ByT5 ids are bytes shifted past the special tokens: the opening quote, and the range of
# UTF-8 continuation bytes 0x80-0xBF, which belong to the character their lead byte starts.
QUOTE_ID = ord('"') + tokenizer.NUM_SPECIAL_TOKENS
_CONTINUATION_IDS = (0x80 + tokenizer.NUM_SPECIAL_TOKENS, 0xBF + tokenizer.NUM_SPECIAL_TOKENS)


@dataclasses.dataclass(frozen=True)
class TextToImageConfig:
  text_encoder: T5EncoderConfig = T5EncoderConfig()
  unet: UNetConfig = UNetConfig()
  noise_schedule: diffusion.NoiseSchedule = diffusion.NoiseSchedule()
  prediction_type: str = 'epsilon'
  text_length: int = 64  # bytes, including EOS.
  image_size: tuple[int, int] = (64, 64)  # (height, width) of what the U-Net sees.
  # Pixel space (as DeepFloyd IF's first stage): the U-Net denoises RGB images in [-1, 1].
  # Otherwise it denoises the latents of a frozen VAE (its codec, built from the
  # experiment's `pretrained.InitConfig.autoencoder`).
  pixel_space: bool = True
  # The U-Net sees non-overlapping p x p patches stacked into channels (space-to-depth, as
  # in Simple Diffusion, arXiv 2301.11093): p^2 less work per layer at the same output size.
  patch_size: int = 1
  # What turns prompts into encoder ids: 'bytes' (ByT5's byte vocabulary) or a subword
  # vocabulary of charred.subword (e.g. 'subword_en_1k': the character-blind arm, whose
  # ids say nothing of the letters inside a piece). text_encoder.vocab_size must hold it.
  tokenizer: str = 'bytes'
  # Sinusoidal positions on the text states counted in characters from the caption's
  # first double quote (the first quoted character is 0, the template before it negative),
  # instead of the U-Net's byte index from the caption's start (UNetConfig.text_positions,
  # which must then be None): the k-th quoted letter then has one coordinate whatever the
  # template, and a multi-byte character one position. Bytes only.
  quote_positions: bool = False
  # The box-conditioned model (as TextDiffuser's and Glyph-ByT5's layouts): every caption
  # comes with a box (x0, y0, x1, y1) in pixels for its quoted text; cross-attention then
  # counts image columns in the box's frame, and the quoted characters are visible only
  # to the cells inside it (unet.TextLayout). Needs quote_positions.
  box_conditioning: bool = False
  # With box_conditioning and patches (patch_size > 1): the patch grid is anchored at the
  # box's top-left corner (the image is rolled by less than a patch before space-to-depth
  # and back after), so a text drawn from its box's corner always meets the patches at one
  # phase, as the grid-aligned signs do, wherever the box is.
  anchor_patches: bool = False
  # With box_conditioning: the U-Net also draws the text in its text frame, where the box
  # has one height and one corner whatever its size and place (charred.models.text_frame),
  # and the pixels around the box come from that pass. Costs a second U-Net pass.
  text_frame: frames.TextFrameConfig | None = None

  def text_tokenizer(self):
    """None for bytes (charred.tokenizer), else the subword tokenizer object."""
    if self.tokenizer == 'bytes':
      return None
    from charred import subword  # pylint: disable=g-import-not-at-top
    return subword.get_tokenizer(self.tokenizer)

  def __post_init__(self):
    if self.prediction_type not in diffusion.PREDICTION_TYPES:
      raise ValueError(f'Unknown prediction_type {self.prediction_type!r}; expected one of '
                       f'{diffusion.PREDICTION_TYPES}.')
    text_width = self.unet.encoder_hid_dim or self.unet.cross_attention_dim
    if text_width != self.text_encoder.d_model:
      name = 'encoder_hid_dim' if self.unet.encoder_hid_dim else 'cross_attention_dim'
      raise ValueError(f'unet.{name} ({text_width}) must equal text_encoder.d_model '
                       f'({self.text_encoder.d_model}).')
    if self.quote_positions and (self.unet.text_positions or self.unet.cross_attention_rope
                                 or self.tokenizer != 'bytes'):
      raise ValueError('quote_positions replaces unet.text_positions and byte-index RoPE, '
                       'and counts bytes: set unet.text_positions=None, '
                       "unet.cross_attention_rope=False and tokenizer='bytes'.")
    if self.box_conditioning and not self.quote_positions:
      raise ValueError('box_conditioning counts the box in quoted characters: set '
                       'quote_positions=True.')
    if self.anchor_patches and not self.box_conditioning:
      raise ValueError('anchor_patches anchors the patch grid at the text box: set '
                       'box_conditioning=True.')
    if self.text_frame is not None and (not self.box_conditioning or self.anchor_patches):
      raise ValueError('text_frame resamples the text box into place: set '
                       'box_conditioning=True and anchor_patches=False (the frame puts the '
                       "box's corner at text_frame.origin, on the patch grid).")
    if self.unet.layout_features and not self.box_conditioning:
      raise ValueError('unet.layout_features reads the text box: set box_conditioning=True.')

  def check_codec(self, codec) -> None:
    """The U-Net must take and give `codec.channels * patch_size**2` channels, and
    patches must tile what is diffused (image_size / the codec's downsampling)."""
    want = codec.channels * self.patch_size**2
    if self.unet.in_channels != want or self.unet.out_channels != want:
      raise ValueError(f'unet in/out channels must be {codec.channels} * patch_size**2 = '
                       f'{want}, got {self.unet.in_channels}/{self.unet.out_channels}.')
    h, w = self.image_size
    step = codec.downsample_factor * self.patch_size
    if self.text_frame is not None and any(o % step for o in self.text_frame.origin):
      raise ValueError(f'text_frame.origin {self.text_frame.origin} must be on the patch '
                       f'grid: multiples of {step} image pixels.')
    if (h // codec.downsample_factor) % self.patch_size or (
        w // codec.downsample_factor) % self.patch_size:
      raise ValueError(f'image_size {self.image_size} / {codec.downsample_factor} is not '
                       f'divisible by patch_size {self.patch_size}.')

  def diffusion_shape(self, codec) -> tuple[int, int, int]:
    """(height, width, channels) of what is noised and denoised."""
    h, w = self.image_size
    f = codec.downsample_factor
    return h // f, w // f, codec.channels

  def sampled_shape(self, codec) -> tuple[int, int, int]:
    """(height, width, channels) of what the sampler draws: the image's diffusion shape,
    then, with a joint text frame, the frame's own channels."""
    h, w, c = self.diffusion_shape(codec)
    return h, w, c * (2 if self.text_frame is not None and self.text_frame.joint else 1)


class TextToImage(nn.Module):
  config: TextToImageConfig

  def setup(self):
    self.text_encoder = T5Encoder(self.config.text_encoder)
    self.unet = UNet(self.config.unet)

  def encode_text(self, tokens, mask, deterministic: bool = True):
    """Byte ids [B, L] and mask [B, L] -> hidden states [B, L, D] (with quote_positions,
    their sinusoids added)."""
    states = self.text_encoder(tokens, mask, deterministic=deterministic)
    if not self.config.quote_positions:
      return states
    b, length, d = states.shape
    positions = quote_positions(tokens, mask).reshape(-1)
    return states + sinusoidal_positions(positions, d).reshape(b, length, d).astype(
        states.dtype)

  def denoise(self, x_t, timesteps, context, mask, layout: TextLayout | None = None,
              deterministic: bool = True):
    """One network evaluation on noisy images or latents [B, h, w, C]; `layout` (see
    `text_layout`) for the box-conditioned model."""
    c = self.config
    if c.text_frame is not None and layout is not None:
      # One pass on the image and one on its text frame, batched. A joint frame comes in
      # the channels after the image's (sampled_shape), and goes out there too.
      size = x_t.shape[1:3]
      frame = frames.text_frame(layout, size, c.text_frame, c.image_size)
      if c.text_frame.joint:
        x_t, x_frame = jnp.split(x_t, 2, axis=-1)
      else:
        x_frame = frames.into_frame(x_t, frame)
      both = lambda a, b: jnp.concatenate([a, b])
      out = self._unet(both(x_t, x_frame), both(timesteps, timesteps),
                       both(context, context), None if mask is None else both(mask, mask),
                       jax.tree_util.tree_map(both, layout,
                                              frames.frame_layout(layout, frame, size)),
                       deterministic)
      whole, framed = jnp.split(out, 2)
      image = jnp.where(frames.frame_region(frame, size), frames.from_frame(framed, frame),
                        whole)
      return jnp.concatenate([image, framed], axis=-1) if c.text_frame.joint else image
    shift = None
    if c.anchor_patches and layout is not None:
      shift = anchor_shift(layout, x_t.shape[1:3], c.patch_size)
      x_t, layout = roll(x_t, -shift), shifted_layout(layout, -shift, x_t.shape[1:3])
    out = self._unet(x_t, timesteps, context, mask, layout, deterministic)
    return out if shift is None else roll(out, shift)

  def _unet(self, x_t, timesteps, context, mask, layout, deterministic):
    p = self.config.patch_size
    return depth_to_space(self.unet(space_to_depth(x_t, p), timesteps, context, mask,
                                    deterministic=deterministic, layout=layout), p)

  def __call__(self, x_t, timesteps, tokens, mask, deterministic: bool = True):
    context = self.encode_text(tokens, mask, deterministic)
    return self.denoise(x_t, timesteps, context, mask, deterministic=deterministic)


def quote_positions(tokens, mask):
  """float32 [B, L]: each byte's character index counted from the character after the
  first double quote of its caption (from the first character when there is none).
  Continuation bytes of a UTF-8 character share its position; padding keeps the last."""
  lo, hi = _CONTINUATION_IDS
  starts = (mask > 0) & ~((tokens >= lo) & (tokens <= hi))
  index = jnp.cumsum(starts, axis=1) - 1  # character index of each byte
  is_quote = (tokens == QUOTE_ID) & (mask > 0)
  first = jnp.argmax(is_quote, axis=1)
  origin = jnp.where(jnp.any(is_quote, axis=1),
                     jnp.take_along_axis(index, first[:, None], axis=1)[:, 0] + 1, 0)
  return (index - origin[:, None]).astype(jnp.float32)


def text_layout(tokens, mask, boxes, image_size: tuple[int, int]) -> TextLayout:
  """The U-Net's layout for captions `tokens` / `mask` [B, L] whose quoted text goes in
  `boxes` [B, 4] (x0, y0, x1, y1 in pixels of an image of `image_size` (height, width)).
  The quoted characters run from the first double quote to the next (or to the end)."""
  chex.assert_equal_shape([tokens, mask])
  chex.assert_shape(boxes, (tokens.shape[0], 4))
  positions = quote_positions(tokens, mask)
  is_quote = (tokens == QUOTE_ID) & (mask > 0)
  opened = jnp.any(is_quote, axis=1)
  closing = is_quote & (positions >= 0)
  end = jnp.where(jnp.any(closing, axis=1),
                  jnp.min(jnp.where(closing, positions, jnp.inf), axis=1),
                  jnp.max(jnp.where(mask > 0, positions, -1), axis=1))
  chars = jnp.where(opened, end, 0.0)
  in_span = (mask > 0) & (positions >= 0) & (positions < chars[:, None])
  h, w = image_size
  scale = jnp.array([w, h, w, h], jnp.float32)
  return TextLayout(jnp.asarray(boxes, jnp.float32) / scale, in_span, chars)


def anchor_shift(layout: TextLayout, size: tuple[int, int], p: int):
  """int32 [B, 2]: (dy, dx), each box's top-left corner modulo the patch size `p`, in the
  pixels of a [B, *size] image: rolling the image by minus that puts the corner on the
  patch grid."""
  h, w = size
  corner = layout.boxes[:, :2] * jnp.array([w, h], jnp.float32)  # (x0, y0)
  corner = jnp.floor(corner + 1e-3).astype(jnp.int32)  # boxes are whole pixels
  return jnp.mod(corner[:, ::-1], p)


def roll(x, shift):
  """x [B, H, W, ...] with example b rolled by shift[b] = (dy, dx) pixels (wrapping)."""
  return jax.vmap(lambda xb, s: jnp.roll(xb, (s[0], s[1]), axis=(0, 1)))(x, shift)


def shifted_layout(layout: TextLayout, shift, size: tuple[int, int]) -> TextLayout:
  """`layout` with every box moved by shift [B, 2] = (dy, dx) pixels of a `size` image."""
  h, w = size
  d = shift[:, ::-1].astype(jnp.float32) / jnp.array([w, h], jnp.float32)
  return layout._replace(boxes=layout.boxes + jnp.concatenate([d, d], axis=1))


def space_to_depth(x, p: int):
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C]."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x, p: int):
  """Inverse of space_to_depth."""
  if p == 1:
    return x
  b, h, w, _ = x.shape
  x = x.reshape(b, h, w, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, -1)


def init_params(model: TextToImage, rng: jax.Array, codec, batch_size: int = 1):
  """Randomly initialised parameters for `model` (`charred.models.pretrained.
  load_checkpoints` then replaces the parts an InitConfig names checkpoints for)."""
  c = model.config
  x = jnp.zeros((batch_size,) + c.diffusion_shape(codec), jnp.float32)
  tokens = jnp.ones((batch_size, c.text_length), jnp.int32)
  t = jnp.zeros((batch_size,), jnp.int32)
  # Parameters carry logical axis names (for sharding); training wants plain arrays.
  return nn.meta.unbox(model.init(rng, x, t, tokens, jnp.ones_like(tokens))['params'])
