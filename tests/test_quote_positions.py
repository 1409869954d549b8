"""Text positions counted in characters from the opening quote, against the caption string."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred import tokenizer
from charred.models import t5_encoder
from charred.models import text_to_image as t2i
from charred.models import unet as unet_lib

CAPTIONS = ('A sign that says "Hello".', 'It says "Crème brûlée"!', 'no quote at all',
            'A board that reads "naïve 42" and "other".', '')


def reference_positions(caption: str, length: int) -> list[float]:
  """Per byte of `caption` + EOS: its character's index minus that of the character after
  the first '"' (0 when there is none), padding holding the last; from the string alone."""
  origin = caption.index('"') + 1 if '"' in caption else 0
  out = []
  for i, ch in enumerate(caption):
    out += [i - origin] * len(ch.encode('utf-8'))
  out.append(len(caption) - origin)  # EOS is one more character
  out += [out[-1]] * (length - len(out))
  return [float(p) for p in out[:length]]


def test_quote_positions_match_the_caption_string():
  length = 48
  tokens, mask = tokenizer.encode_batch(list(CAPTIONS), length)
  got = np.asarray(t2i.quote_positions(jnp.asarray(tokens), jnp.asarray(mask)))
  for row, caption in zip(got, CAPTIONS):
    n = int(sum(1 for _ in caption.encode('utf-8'))) + 1
    np.testing.assert_array_equal(row[:n], reference_positions(caption, length)[:n], caption)


def test_the_kth_quoted_letter_has_one_position_whatever_the_template():
  captions = ['A sign that says "word".', 'It says "word".', 'A board that reads "word"!']
  tokens, mask = tokenizer.encode_batch(captions, 40)
  pos = np.asarray(t2i.quote_positions(jnp.asarray(tokens), jnp.asarray(mask)))
  for row, caption in zip(pos, captions):
    first = caption.index('"') + 1
    np.testing.assert_array_equal(row[first:first + 4], [0, 1, 2, 3])
    assert row[first - 1] == -1  # the quote itself


def tiny_config(unet=None, **kwargs) -> t2i.TextToImageConfig:
  """A two-level pixel model on 3 channels; `unet`: UNetConfig fields to change, kwargs:
  TextToImageConfig's."""
  enc = t5_encoder.T5EncoderConfig(vocab_size=384, d_model=16, num_heads=2, head_dim=8,
                                   d_ff=32, num_layers=1)
  unet = unet_lib.UNetConfig(**{
      **dict(in_channels=3, out_channels=3, block_out_channels=(8, 16),
             down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
             up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1,
             attention_head_dim=(2, 2), cross_attention_dim=16, norm_num_groups=4),
      **(unet or {})})
  return t2i.TextToImageConfig(**{**dict(text_encoder=enc, unet=unet, text_length=32,
                                         image_size=(8, 16)), **kwargs})


def test_encode_text_adds_the_sinusoids_of_the_quote_positions():
  captions = ['A sign that says "Hi".', 'It says "Hi".']
  tokens, mask = (jnp.asarray(a) for a in tokenizer.encode_batch(captions, 32))
  with_pos = t2i.TextToImage(tiny_config(quote_positions=True))
  without = t2i.TextToImage(tiny_config())
  x = jnp.zeros((2, 8, 16, 3))
  params = with_pos.init(jax.random.PRNGKey(0), x, jnp.zeros(2, jnp.int32), tokens, mask)
  encode = lambda m: m.apply(params, tokens, mask, method=t2i.TextToImage.encode_text)
  added = np.asarray(encode(with_pos) - encode(without))
  d = 16
  for row, caption in zip(added, captions):
    positions = np.array(reference_positions(caption, 32))
    freqs = np.exp(-math.log(10000.0) * np.arange(d // 2) / (d // 2))
    angles = positions[:, None] * freqs[None]
    np.testing.assert_allclose(row, np.concatenate([np.sin(angles), np.cos(angles)], -1),
                               atol=1e-5)
  # The same letters of two templates get the same added vector.
  a, b = (c.index('"') + 1 for c in captions)
  np.testing.assert_allclose(added[0, a:a + 2], added[1, b:b + 2], atol=1e-6)


def test_quote_positions_refuse_a_second_text_position():
  with pytest.raises(ValueError, match='quote_positions replaces unet.text_positions'):
    tiny_config(dict(text_positions='sinusoidal'), quote_positions=True)
