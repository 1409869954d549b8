r"""U-Net speed: charred (JAX) against diffusers (PyTorch), same config, same device, one run.

  python benchmarks/unet_step.py                     # small CPU config
  python benchmarks/unet_step.py --config=sd21 --dtype=bfloat16 --batch=8   # on a GPU

Measures, after warm-up, the median time of (1) a forward pass, (2) a training step
(forward, MSE loss, backward, AdamW update) and (3) 50-step DDIM sampling with
classifier-free guidance (batch 1 conditional + 1 unconditional), for both libraries.
Both models get the same weights (charred's, exported through the diffusers converter).
Prints a table, then as its last line one JSON object; `ratio` is charred's training-step
speed over diffusers' (> 1: charred is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from charred.models import diffusion, pretrained, sampling
from charred.models.unet import UNet, UNetConfig

CONFIGS = {
    # Small enough for a 2-core CPU; SD-shaped (3 levels, cross-attention in the first two).
    'small': dict(
        unet=UNetConfig(sample_size=32, block_out_channels=(64, 128, 256),
                        down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                                          'DownBlock2D'),
                        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D',
                                        'CrossAttnUpBlock2D'),
                        attention_head_dim=(2, 4, 8), cross_attention_dim=256,
                        layers_per_block=2,
                        # Self-attention over 1,024 positions in blocks of 256 queries:
                        # same numbers, cache-sized (charred's CPU setting; not a
                        # diffusers option, so the export ignores it).
                        attention_query_chunk=256),
        text_length=64),
    # Stable Diffusion 2.1's U-Net at 512 px (64x64 latents) with ByT5-Base-width context,
    # as the original CHARRED project trained it.
    'sd21': dict(unet=UNetConfig(sample_size=64, cross_attention_dim=1536), text_length=128),
}


def median_seconds(fn, iters: int, warmup: int) -> float:
  """The median wall time of `iters` calls of `fn` after `warmup` untimed ones."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_charred(config: UNetConfig, params, batch: int, text_length: int, dtype: str,
                  iters: int, warmup: int, sampling_steps: int):
  config = dataclasses.replace(config, dtype=jnp.dtype(dtype).type)
  model = UNet(config)
  rng = np.random.default_rng(0)
  s = config.sample_size
  x = jnp.asarray(rng.normal(size=(batch, s, s, config.in_channels)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, size=(batch,)), jnp.int32)
  ctx = jnp.asarray(rng.normal(size=(batch, text_length, config.cross_attention_dim)),
                    jnp.float32)
  target = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  params = jax.tree.map(jnp.asarray, params)

  forward = jax.jit(lambda p, x, t, c: model.apply({'params': p}, x, t, c))
  tx = optax.adamw(1e-4)

  @jax.jit
  def train_step(p, opt_state, x, t, c, y):
    loss_fn = lambda p: jnp.mean(jnp.square(model.apply({'params': p}, x, t, c) - y))
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  state = {'p': params, 'o': tx.init(params)}

  def step():
    state['p'], state['o'], loss = train_step(state['p'], state['o'], x, t, ctx, target)
    loss.block_until_ready()

  fwd = median_seconds(lambda: forward(params, x, t, ctx).block_until_ready(), iters, warmup)
  train = median_seconds(step, iters, warmup)

  noise = x[:1]
  alphas = diffusion.NoiseSchedule().alphas_cumprod()
  denoise = lambda x, t, c, m: model.apply({'params': params}, x, t, c, m)
  mask = jnp.ones((1, text_length), jnp.int32)
  sample = jax.jit(lambda n, c, u: sampling.ddim_sample(
      denoise, n, c, mask, u, mask, alphas_cumprod=alphas, prediction_type='epsilon',
      num_steps=sampling_steps, guidance_scale=7.5, spacing='leading', clip_sample=None))
  latency = median_seconds(lambda: sample(noise, ctx[:1], ctx[1:2]).block_until_ready(),
                            max(1, iters // 4), 1)
  return fwd, train, latency


def bench_diffusers(folder: str, config: UNetConfig, batch: int, text_length: int, dtype: str,
                    iters: int, warmup: int, sampling_steps: int, device: str):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  torch_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  model = UNet2DConditionModel.from_pretrained(folder).to(device)
  rng = np.random.default_rng(0)
  s = config.sample_size
  x = torch.tensor(rng.normal(size=(batch, config.in_channels, s, s)), dtype=torch.float32,
                   device=device)
  t = torch.tensor(rng.integers(0, 1000, size=(batch,)), device=device)
  ctx = torch.tensor(rng.normal(size=(batch, text_length, config.cross_attention_dim)),
                     dtype=torch.float32, device=device)
  target = torch.randn_like(x)
  sync = (lambda: torch.cuda.synchronize()) if device.startswith('cuda') else (lambda: None)
  autocast = lambda: torch.autocast(device.split(':')[0], dtype=torch_dtype,
                                    enabled=dtype != 'float32')

  def forward():
    with torch.no_grad(), autocast():
      model(x, t, ctx).sample
    sync()

  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = torch.nn.functional.mse_loss(model(x, t, ctx).sample.float(), target)
    loss.backward()
    opt.step()
    sync()

  fwd = median_seconds(forward, iters, warmup)
  train = median_seconds(step, iters, warmup)

  scheduler = DDIMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                            clip_sample=False, set_alpha_to_one=False, steps_offset=1)

  def sample():
    scheduler.set_timesteps(sampling_steps)
    latents = x[:1]
    both = torch.cat([ctx[:1], ctx[1:2]])
    with torch.no_grad(), autocast():
      for step_t in scheduler.timesteps:
        out = model(torch.cat([latents, latents]), step_t, both).sample.float()
        cond, uncond = out.chunk(2)
        latents = scheduler.step(uncond + 7.5 * (cond - uncond), step_t, latents).prev_sample
    sync()

  latency = median_seconds(sample, max(1, iters // 4), 1)
  return fwd, train, latency


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', choices=sorted(CONFIGS), default='small')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--sampling_steps', type=int, default=50)
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  from charred.models.convert import diffusers as diffusers_convert  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.set_num_threads(os.cpu_count())
  spec = CONFIGS[args.config]
  config, text_length = spec['unet'], spec['text_length']
  inputs = pretrained.MODEL_KINDS['unet'].example_inputs(config)
  params = jax.jit(lambda: nn.meta.unbox(UNet(config).init(
      jax.random.PRNGKey(0), *inputs)['params']))()
  params = jax.tree.map(np.asarray, params)
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, 'unet')
    diffusers_convert.export_diffusers('unet', config, params, folder)
    common = (args.batch, text_length, args.dtype, args.iters, args.warmup, args.sampling_steps)
    ref = bench_diffusers(folder, config, *common, device)
  ours = bench_charred(config, params, *common)

  n = pretrained.count_parameters('unet', config)
  rows = [('forward', args.batch), ('train step', args.batch), (
      f'{args.sampling_steps}-step DDIM + CFG', 1)]
  print(f'U-Net {args.config}: {n / 1e6:.1f} M parameters, batch {args.batch}, '
        f'{config.sample_size}x{config.sample_size} latents, context {text_length}, '
        f'{args.dtype}, device {jax.devices()[0].device_kind} / torch {device}')
  print(f'{"":28s}{"charred":>14s}{"diffusers":>14s}{"ratio":>8s}')
  figures = {}
  for (name, b), mine, theirs in zip(rows, ours, ref):
    unit = 's' if 'DDIM' in name else 'img/s'
    a, r = (mine, theirs) if unit == 's' else (b / mine, b / theirs)
    print(f'{name:28s}{a:>12.3f} {unit:<2s}{r:>11.3f} {unit:<2s}{theirs / mine:>7.2f}x')
    key = name.split()[0] if 'DDIM' not in name else 'sampling'
    figures[key] = {'charred': a, 'diffusers': r, 'ratio': theirs / mine,
                    'unit': 'seconds' if unit == 's' else 'images/s'}
  print(json.dumps({
      'benchmark': 'unet_step', 'config': args.config, 'batch': args.batch,
      'dtype': args.dtype, 'parameters': n, 'device': jax.devices()[0].device_kind,
      'torch_device': device, 'cpu': platform.processor() or platform.machine(),
      'forward_images_per_s': figures['forward'],
      'train_images_per_s': figures['train'], 'sampling_latency_s': figures['sampling'],
      'ratio': figures['train']['ratio']}))


if __name__ == '__main__':
  main()
