r"""int8 against float32 sampling: weight bytes and speed, same model, same device, one run.

  python benchmarks/int8.py                        # the tiny test model, on CPU
  python benchmarks/int8.py --config=small --steps=20

A randomly initialised pixel-space text-to-image model (`--config`: 'tiny', the tests'
two-level model; 'small', a 64x64 three-level one) sampled through
`charred.pipeline.TextToImagePipeline` in float32 and after `to_int8` in both modes
(`charred.models.quantize`). After a warm-up call (compilation), the median of `--iters`
timed calls of `--steps`-step DDIM with guidance. Prints a table, then as its last line
one JSON object: per mode the weight bytes and `speed_ratio`, float32's time over int8's
(> 1: int8 is faster).
"""

from __future__ import annotations

import argparse
import json
import platform

import jax

from charred.models import quantize
from charred.models import t5_encoder
from charred.models import text_to_image as t2i
from charred.models import unet as unet_lib
from charred.models.diffusion_model import DiffusionModel
from charred.pipeline import TextToImagePipeline
from unet_step import median_seconds  # benchmarks/: one timing for every benchmark

_ENCODER = dict(vocab_size=384, d_model=64, num_heads=4, head_dim=16, d_ff=128, num_layers=2)
CONFIGS = {
    'tiny': dict(
        encoder=dict(vocab_size=384, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                     num_layers=1),
        unet=dict(block_out_channels=(8, 16), attention_head_dim=(2, 2),
                  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1,
                  cross_attention_dim=16, norm_num_groups=4),
        image_size=(8, 16)),
    'small': dict(
        encoder=_ENCODER,
        unet=dict(block_out_channels=(32, 64, 128), attention_head_dim=(2, 4, 8),
                  down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                                    'DownBlock2D'),
                  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
                  layers_per_block=1, cross_attention_dim=64, norm_num_groups=8),
        image_size=(64, 64)),
}


def model_config(name: str) -> t2i.TextToImageConfig:
  c = CONFIGS[name]
  return t2i.TextToImageConfig(
      text_encoder=t5_encoder.T5EncoderConfig(**c['encoder']),
      unet=unet_lib.UNetConfig(in_channels=3, out_channels=3, **c['unet']),
      text_length=32, image_size=c['image_size'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', choices=sorted(CONFIGS), default='tiny')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--iters', type=int, default=3)
  args = parser.parse_args()

  model = DiffusionModel(model_config(args.config))
  pipe = TextToImagePipeline(model, model.init_params(jax.random.PRNGKey(0)))
  prompts = ['A sign that says "int8".'] * args.batch
  sample = lambda p: p(prompts, num_steps=args.steps, batch_size=args.batch)
  fp32_seconds = median_seconds(lambda: sample(pipe), args.iters, warmup=1)
  result = {'config': args.config, 'steps': args.steps, 'batch': args.batch,
            'device': jax.devices()[0].device_kind, 'machine': platform.machine(),
            'float32': {'weight_bytes': pipe.weight_bytes(), 'seconds': fp32_seconds}}
  for mode in quantize.MODES:
    int8 = pipe.to_int8(mode)
    seconds = median_seconds(lambda: sample(int8), args.iters, warmup=1)  # pylint: disable=cell-var-from-loop
    result[mode] = {'weight_bytes': int8.weight_bytes(), 'seconds': seconds,
                    'bytes_ratio': pipe.weight_bytes() / int8.weight_bytes(),
                    'speed_ratio': fp32_seconds / seconds}
  print(f"{'':12s} {'weight bytes':>14s} {'seconds':>9s} {'speed vs fp32':>14s}")
  for name in ('float32',) + quantize.MODES:
    r = result[name]
    print(f"{name:12s} {r['weight_bytes']:14,d} {r['seconds']:9.3f} "
          f"{r.get('speed_ratio', 1.0):14.2f}")
  print(json.dumps(result))


if __name__ == '__main__':
  main()
