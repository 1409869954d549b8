r"""IREE llvm-cpu modules (charred.aot) against the jitted JAX pipeline: one full generation
(tokenize, encode, guided sampling loop, decode), same model, same inputs, one run.

  python benchmarks/export_iree.py                  # the tests' tiny model, 10 steps
  python benchmarks/export_iree.py --config=small --steps=10

A randomly initialised pixel-space model (`--config` as benchmarks/int8.py's) is exported
with `TextToImagePipeline.export` (llvm-cpu only; compile time reported) and run by
`charred.aot.IreeModel`; JAX is `TextToImagePipeline.__call__`. After a warm-up call each
(JAX's compiles), the median of `--iters` timed calls. Prints a table, then as its last line
one JSON object with `iree_over_jax` (IREE's time over JAX's: < 1, IREE is faster) and the
PSNR of IREE's image against JAX's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np

from charred import aot
from charred.models.diffusion_model import DiffusionModel
from charred.pipeline import TextToImagePipeline, to_array
from int8 import CONFIGS, model_config  # benchmarks/: the same model configs
from unet_step import median_seconds  # benchmarks/: one timing for every benchmark


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float('inf') if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', choices=sorted(CONFIGS), default='tiny')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--iters', type=int, default=5)
  args = parser.parse_args()

  model = DiffusionModel(model_config(args.config))
  pipe = TextToImagePipeline(model, model.init_params(jax.random.PRNGKey(0)))
  prompts = ['A sign that says "IREE".'] * args.batch
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'export')
    start = time.perf_counter()
    manifest = pipe.export(out, batch=args.batch, num_steps=args.steps,
                           targets=[aot.CPU_TARGET])
    export_seconds = time.perf_counter() - start
    iree = aot.IreeModel(out)
    jax_images = to_array(pipe(prompts, num_steps=args.steps, seed=0))
    iree_images = iree(prompts, seed=0)
    jax_seconds = median_seconds(lambda: pipe(prompts, num_steps=args.steps, seed=0),
                                 args.iters, warmup=1)
    iree_seconds = median_seconds(lambda: iree(prompts, seed=0), args.iters, warmup=1)
  result = {
      'config': args.config, 'steps': args.steps, 'batch': args.batch,
      'machine': platform.machine(), 'cpus': os.cpu_count(),
      'parameter_bytes': manifest['parameters']['bytes'],
      'export_and_compile_seconds': export_seconds,
      'jax_seconds': jax_seconds, 'iree_seconds': iree_seconds,
      'iree_over_jax': iree_seconds / jax_seconds,
      'psnr_db': psnr(iree_images, jax_images),
      'max_grey_level_difference': int(np.abs(iree_images.astype(int) - jax_images).max()),
  }
  print(f"{'':18s} {'seconds':>9s}")
  print(f"{'JAX (jit)':18s} {jax_seconds:9.4f}")
  print(f"{'IREE llvm-cpu':18s} {iree_seconds:9.4f}  ({result['iree_over_jax']:.2f}x JAX's "
        f"time; image PSNR {result['psnr_db']:.1f} dB vs JAX's)")
  print(json.dumps(result))


if __name__ == '__main__':
  main()
