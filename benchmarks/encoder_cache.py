r"""Encoder cache and device preprocessing: bytes and host CPU time per training example.

  python benchmarks/encoder_cache.py                  # ~1 minute on 2 cores
  python benchmarks/encoder_cache.py --num_examples=1024 --text_length=256

1. Cache: writes `--num_examples` photo-like 128x128 images with ~100-byte captions
   through a ByT5-Base-wide text encoder (d_model 1536, one layer: the width sets the
   record size, the depth only the writer's time) and the 4-channel test VAE (64x64x4
   latents, SD's shape at 512 px; the writer's speed is the encoders', not measured
   here), then reads batches of `--batch_size` through
   `EncoderCache.batches`: bytes per record, records/s read (wall clock and per CPU
   second).
2. Preprocessing: uint8 576x768 images -> 512x512 bicubic cover + centre crop + [-1, 1],
   per image: PIL + numpy on the host against `preprocess.preprocess` jitted (here on
   the CPU too; on an accelerator it costs the host nothing), and the bytes each ships.

The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import photo_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position
from charred import tokenizer  # pylint: disable=wrong-import-position
from charred.datasets import encoder_cache  # pylint: disable=wrong-import-position
from charred.models import preprocess  # pylint: disable=wrong-import-position
from charred.models.pretrained import make_codec  # pylint: disable=wrong-import-position
from charred.models.t5_encoder import T5EncoderConfig  # pylint: disable=wrong-import-position
from charred.models.text_to_image import TextToImageConfig  # pylint: disable=wrong-import-position
from charred.models.unet import UNetConfig  # pylint: disable=wrong-import-position

VAE_DIR = os.path.join(os.path.dirname(__file__), '..', 'tests', 'fixtures', 'diffusers_flax',
                       'vae')


def cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def cache_figures(num_examples: int, text_length: int, batch_size: int) -> dict:
  config = TextToImageConfig(
      text_encoder=T5EncoderConfig(d_model=1536, num_heads=2, head_dim=64, num_layers=1,
                                   d_ff=256),
      unet=UNetConfig(in_channels=4, out_channels=4, block_out_channels=(8,),
                      down_block_types=('DownBlock2D',), up_block_types=('UpBlock2D',),
                      layers_per_block=1, attention_head_dim=(1,), norm_num_groups=4,
                      cross_attention_dim=1536),  # not run: only its config is checked
      text_length=text_length, image_size=(128, 128), pixel_space=False)
  codec = make_codec(False, VAE_DIR)
  params = encoder_cache.initial_text_encoder_params(config, 0, codec)
  rng = np.random.default_rng(0)
  words = ['sign', 'café', 'street', 'поезд', 'open', 'late', 'market', 'the', 'a', 'red']
  captions = [' '.join(rng.choice(words, 16))[:100] for _ in range(num_examples)]
  tokens, _ = tokenizer.encode_batch(captions, text_length)
  examples = [dict(image=photo_fixtures.photo(128, 128, seed=i), text_tokens=tokens[i],
                   caption=c, key=str(i)) for i, c in enumerate(captions)]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'cache')
    manifest = encoder_cache.write_cache(examples, out, config, params, codec,
                                         batch_size=32)
    cache = encoder_cache.EncoderCache(out)
    batches = cache.batches(batch_size, seed=0)
    next(batches)
    num_batches = max(1, 2 * num_examples // batch_size)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(num_batches):
      batch = next(batches)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return dict(
        records=manifest['num_records'],
        bytes_per_record=manifest['total_bytes'] / manifest['num_records'],
        mean_caption_tokens=float(np.mean((tokens != 0).sum(1))),
        read_records_per_s=num_batches * batch_size / wall,
        read_records_per_cpu_s=num_batches * batch_size / cpu,
        batch_megabytes={k: v.nbytes / 1e6 for k, v in batch.items()
                         if isinstance(v, np.ndarray) and v.dtype != object
                         and v.dtype.kind != 'U'})


def preprocess_figures(batch_size: int, repeats: int) -> dict:
  raw = np.stack([photo_fixtures.photo(576, 768, seed=i) for i in range(batch_size)])
  size = (512, 512)

  def host(x):
    covered = preprocess.cover_size(x.shape[:2], size)
    y = np.asarray(Image.fromarray(x).resize(covered[::-1], Image.BICUBIC), np.float32)
    top, left = (covered[0] - size[0]) // 2, (covered[1] - size[1]) // 2
    return y[top:top + size[0], left:left + size[1]] / 127.5 - 1.0

  config = preprocess.PreprocessConfig('bicubic', random_crop=False)
  keys = jax.random.split(jax.random.PRNGKey(0), batch_size)
  device = jax.jit(lambda x, k: preprocess.preprocess(x, k, config, size))
  device(raw, keys).block_until_ready()
  figures = {}
  for name, fn in (('host_pil', lambda: np.stack([host(x) for x in raw])),
                   ('jax_cpu', lambda: device(raw, keys).block_until_ready())):
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(repeats):
      fn()
    figures[f'{name}_images_per_s'] = repeats * batch_size / (time.perf_counter() - start)
    figures[f'{name}_images_per_cpu_s'] = repeats * batch_size / (cpu_seconds() - cpu)
  figures['host_ships_bytes_per_image'] = {'uint8_raw': raw[0].nbytes,
                                           'float32_preprocessed': 512 * 512 * 3 * 4}
  return figures


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_examples', type=int, default=256)
  parser.add_argument('--text_length', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--preprocess_batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  figures = dict(cache=cache_figures(args.num_examples, args.text_length, args.batch_size),
                 preprocess=preprocess_figures(args.preprocess_batch, args.repeats),
                 cpus=os.cpu_count(), jax=jax.__version__)
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
