r"""The full training step: charred (JAX) against a diffusers (PyTorch) training step of the
same U-Net, on the same device, in one run.

  python benchmarks/train_step.py                    # small CPU config, float32
  python benchmarks/train_step.py --config=sd21 --dtype=bfloat16 --batch=32    # a GPU
  python benchmarks/train_step.py --gin_file=experiments/typography_tiny.gin  # any experiment

charred's step is `charred.trainers.trainer.train_step`, jitted as `train()` jits it: caption
dropout, timesteps and noise per example, the U-Net forward and backward, the loss in
float32, gradient clipping, the AdamW update, the NaN/Inf guard and the EMA update.
The `small` and `sd21` configs train in latent space on cached inputs, as a large run
does: the batch holds VAE latents and the frozen ByT5's hidden states (the encoder-output
cache), so the step is the U-Net's alone. A `--gin_file` experiment trains as configured
(its codec and, unless frozen, its text encoder inside the step).

The diffusers step is what `examples/text_to_image/train_text_to_image.py` does per batch:
random timesteps and noise, `DDPMScheduler.add_noise`, the U-Net under autocast, an MSE
in float32, backward, `clip_grad_norm_`, AdamW (fp32 master weights), `EMAModel.step`.

FLOPs per step come from XLA's cost analysis of charred's compiled step; MFU is FLOP/s
over the device's dense bf16 peak (`charred.trainers.monitoring.PEAK_FLOPS`), or over
`--peak_flops`. On a CPU there is no data-sheet peak: the basis is then the best float32
matmul throughput measured here (4096^2), and the MFU says how much of that the step gets.
Both libraries' MFU use the same FLOP count. The last line printed is one JSON object with
`mfu` (charred's) and `ratio` (charred images/s over diffusers').
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from charred.models.diffusion_model import DiffusionModel, ObjectiveConfig
from charred.models.t5_encoder import T5EncoderConfig
from charred.models.text_to_image import TextToImageConfig
from charred.models.unet import UNetConfig
from charred.trainers import monitoring, optimizer, partitioning, trainer
from unet_step import median_seconds  # benchmarks/: the same timing, the same small U-Net
import unet_step


class CachedLatents:
  """The codec of a batch that already holds scaled VAE latents (the encoder-output
  cache): nothing to encode inside the step."""
  channels = 4
  downsample_factor = 8

  def encode(self, latents, rng=None):
    del rng
    return latents


CONFIGS = {
    # benchmarks/unet_step.py's 18 M-parameter SD-shaped U-Net at 256 px (32x32 latents),
    # context of 64 positions from a small ByT5-shaped encoder of width 256.
    'small': dict(unet=unet_step.CONFIGS['small']['unet'], text_encoder=T5EncoderConfig(
        d_model=256, num_heads=4, head_dim=64, num_layers=2, d_ff=512), text_length=64,
                  image_size=(256, 256), batch=4),
    # Stable Diffusion 2.1's U-Net at 512 px (64x64 latents) conditioned on ByT5-Base's
    # hidden states (width 1536) for 128 bytes, as the original CHARRED project trained it.
    'sd21': dict(unet=UNetConfig(sample_size=64, cross_attention_dim=1536),
                 text_encoder=T5EncoderConfig(d_model=1536, num_heads=12, head_dim=64,
                                              num_layers=18, d_ff=3968),
                 text_length=128, image_size=(512, 512), batch=8),
}


def measured_matmul_flops(dtype=jnp.float32, n: int = 4096) -> float:
  """The best FLOP/s of an n x n matmul on the default device (a CPU's practical peak)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  seconds = min(median_seconds(lambda: f(a).block_until_ready(), 3, 1) for _ in range(2))
  return 2 * n**3 / seconds


def experiment_from_gin(gin_file: str, bindings):
  from charred.configs import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from charred.main import load_experiment  # pylint: disable=g-import-not-at-top
  experiment = load_experiment([gin_file], bindings)
  return experiment_lib.build_model(experiment, experiment_lib.build_codec(experiment)), \
      experiment.train


def builtin_experiment(name: str, batch: int, dtype: str):
  spec = CONFIGS[name]
  unet = dataclasses.replace(spec['unet'], dtype=jnp.dtype(dtype).type)
  model_config = TextToImageConfig(text_encoder=spec['text_encoder'], unet=unet,
                                   text_length=spec['text_length'],
                                   image_size=spec['image_size'], pixel_space=False)
  train_config = trainer.TrainConfig(
      train_steps=10**6, batch_size=batch or spec['batch'],
      optimizer=optimizer.OptimizerConfig(learning_rate=1e-4, warmup_steps=0))
  objective = ObjectiveConfig(train_text_encoder=False)
  return DiffusionModel(model_config, objective, CachedLatents()), train_config


def make_batch(model_config: TextToImageConfig, codec, batch_size: int, cached_context: bool,
               rng: np.random.Generator):
  h, w, c = model_config.diffusion_shape(codec)
  if isinstance(codec, CachedLatents):
    images = rng.normal(size=(batch_size, h, w, c))
  else:
    images = rng.uniform(-1, 1, size=(batch_size,) + tuple(model_config.image_size) + (3,))
  length = model_config.text_length
  tokens = rng.integers(3, 259, size=(batch_size, length))
  mask = np.ones((batch_size, length), np.int32)
  batch = {'image': images.astype(np.float32), 'text_tokens': tokens.astype(np.int32),
           'text_mask': mask}
  if cached_context:
    batch['text_context'] = rng.normal(
        size=(batch_size, length, model_config.text_encoder.d_model)).astype(np.float32)
  return batch


def bench_charred(model: DiffusionModel, train_config, batch, iters, warmup):
  tx = trainer.make_tx(train_config, model.frozen)
  mesh = partitioning.make_mesh(train_config.partitioning)
  rules = train_config.partitioning.rules
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  state = trainer.create_sharded_state(model, train_config, tx, mesh, rules)
  step_fn = trainer.jit_train_step(model, train_config, tx, state, batch_sharding)
  batch = partitioning.global_batch(batch, batch_sharding, 1)
  rng = np.asarray(jax.random.PRNGKey(1))
  flops = monitoring.step_flops(step_fn, state, batch, rng)
  box = {'state': state}

  def step():
    box['state'], metrics = step_fn(box['state'], batch, rng)
    metrics['loss'].block_until_ready()

  seconds = median_seconds(step, iters, warmup)
  unet_params = sum(x.size for x in jax.tree_util.tree_leaves(box['state'].params['unet']))
  return seconds, flops, box['state'].params['unet'], unet_params


def bench_diffusers(folder: str, model_config, codec, batch, dtype: str, iters: int,
                    warmup: int, device: str):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDPMScheduler, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from diffusers.training_utils import EMAModel  # pylint: disable=g-import-not-at-top
  torch_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  unet = UNet2DConditionModel.from_pretrained(folder).to(device).train()
  ema = EMAModel(unet.parameters(), decay=0.9999)
  ema.to(device)
  scheduler = DDPMScheduler(beta_schedule='scaled_linear', beta_start=0.00085,
                            beta_end=0.012, num_train_timesteps=1000)
  opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01)
  if 'text_context' not in batch:
    raise ValueError('The diffusers step needs cached text states: run a config whose '
                     'batch carries text_context.')
  nchw = lambda x: torch.tensor(np.moveaxis(x, -1, 1), device=device)
  latents = nchw(batch['image'])
  context = torch.tensor(batch['text_context'], device=device)
  mask = torch.tensor(batch['text_mask'], device=device)
  sync = (lambda: torch.cuda.synchronize()) if device.startswith('cuda') else (lambda: None)
  autocast = lambda: torch.autocast(device.split(':')[0], dtype=torch_dtype,
                                    enabled=dtype != 'float32')

  def step():
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                      device=device)
    noisy = scheduler.add_noise(latents, noise, t)
    with autocast():
      prediction = unet(noisy, t, context, encoder_attention_mask=mask).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.step(unet.parameters())
    sync()

  return median_seconds(step, iters, warmup)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', choices=sorted(CONFIGS), default='small')
  parser.add_argument('--gin_file', default=None,
                      help='An experiment gin file instead of --config (charred only unless '
                      'its batches carry cached text states).')
  parser.add_argument('--gin_bindings', action='append', default=[])
  parser.add_argument('--batch', type=int, default=None, help="Default: the config's.")
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--peak_flops', type=float, default=None,
                      help='Peak FLOP/s per device for MFU (default: the data sheet; on a '
                      'CPU, a measured float32 matmul).')
  parser.add_argument('--skip_diffusers', action='store_true')
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  from charred.models.convert import diffusers as diffusers_convert  # pylint: disable=g-import-not-at-top
  torch_device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.set_num_threads(os.cpu_count())

  if args.gin_file:
    model, train_config = experiment_from_gin(args.gin_file, args.gin_bindings)
    if args.batch:
      train_config = dataclasses.replace(train_config, batch_size=args.batch)
    name = args.gin_file
  else:
    model, train_config = builtin_experiment(args.config, args.batch, args.dtype)
    name = args.config
  batch_size = train_config.batch_size
  model_config, codec = model.config, model.codec
  cached_context = not model.objective.train_text_encoder and not args.gin_file
  batch = make_batch(model_config, codec, batch_size, cached_context,
                     np.random.default_rng(0))

  seconds, flops, unet_params, num_unet = bench_charred(
      model, train_config, batch, args.iters, args.warmup)
  device = jax.devices()[0]
  peak, basis = args.peak_flops, 'given (--peak_flops)'
  if peak is None and device.platform != 'cpu':
    peak, basis = monitoring.peak_flops(device.device_kind), 'data-sheet dense bf16 peak'
  if peak is None:
    peak, basis = measured_matmul_flops(), 'measured float32 4096^2 matmul on this CPU'
  peak_total = peak * jax.device_count()

  theirs = None
  if not args.skip_diffusers and 'text_context' in batch:
    unet_config = dataclasses.replace(model_config.unet, dtype=jnp.float32)
    with tempfile.TemporaryDirectory() as tmp:
      folder = os.path.join(tmp, 'unet')
      diffusers_convert.export_diffusers('unet', unet_config,
                                         jax.tree.map(np.asarray, unet_params), folder)
      theirs = bench_diffusers(folder, model_config, codec, batch, args.dtype, args.iters,
                               args.warmup, torch_device)

  ours_ips = batch_size / seconds
  mfu = flops / seconds / peak_total if flops else None
  print(f'Train step {name}: U-Net {num_unet / 1e6:.1f} M parameters, batch {batch_size}, '
        f'diffused {model_config.diffusion_shape(codec)}, text {model_config.text_length}, '
        f'{args.dtype}, device {device.device_kind} x{jax.device_count()} / torch '
        f'{torch_device}')
  print(f'FLOPs per step (XLA cost analysis): {flops / 1e12 if flops else float("nan"):.3f} '
        f'TFLOP; MFU basis: {peak / 1e12:.3f} TFLOP/s per device ({basis})')
  print(f'{"":12s}{"images/s":>12s}{"MFU":>9s}')
  print(f'{"charred":12s}{ours_ips:>12.3f}{(mfu or float("nan")) * 100:>8.1f}%')
  figures = {'benchmark': 'train_step', 'config': name, 'batch': batch_size,
             'dtype': args.dtype, 'unet_parameters': num_unet, 'device': device.device_kind,
             'num_devices': jax.device_count(), 'torch_device': torch_device,
             'cpu': platform.processor() or platform.machine(),
             'flops_per_step': flops, 'peak_flops_per_device': peak, 'peak_basis': basis,
             'charred_images_per_s': ours_ips, 'mfu': mfu}
  if theirs is not None:
    their_ips = batch_size / theirs
    their_mfu = flops / theirs / peak_total if flops else None
    print(f'{"diffusers":12s}{their_ips:>12.3f}{(their_mfu or float("nan")) * 100:>8.1f}%')
    print(f'charred / diffusers: {theirs / seconds:.2f}x')
    figures.update(diffusers_images_per_s=their_ips, diffusers_mfu=their_mfu,
                   ratio=theirs / seconds)
  else:
    figures['ratio'] = None
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
