r"""Converts checkpoints into charred's format, or a charred U-Net / VAE out to diffusers
(formats and name mappings: `charred.models.pretrained`, `charred.models.convert`).

  python -m charred.convert SRC OUT [--component=unet|vae] [--t5_gin=FILE]
  python -m charred.convert --to_diffusers SRC OUT

SRC is any format `charred.models.load_pretrained` reads: a diffusers PyTorch or Flax
folder (a Stable Diffusion repository converts its unet/ and vae/ into OUT/unet and
OUT/vae unless --component picks one), a transformers T5/ByT5 folder, or a t5x checkpoint
(legacy msgpack file or tensorstore directory; its config is inferred from the shapes
unless --t5_gin gives one, e.g. models/byt5_xxl.gin). OUT is written under a temporary
name and renamed when complete. Tensors stream one at a time: converting ByT5-XXL needs
memory for its largest tensor, not for the checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

_COMPONENT = flags.DEFINE_enum('component', None, ['unet', 'vae'],
                               'Which model of a diffusers pipeline folder to convert.')
_T5_GIN = flags.DEFINE_string('t5_gin', None, 'Gin file binding T5EncoderConfig, for t5x '
                              'checkpoints (checked against the shapes).')
_TO_DIFFUSERS = flags.DEFINE_bool('to_diffusers', False, 'Export a charred U-Net or VAE as '
                                  'a diffusers folder (config.json + safetensors).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace OUT if it exists.')


def _t5_config(gin_file: str | None):
  if gin_file is None:
    return None
  import gin  # pylint: disable=g-import-not-at-top
  from charred.configs import gin_utils  # pylint: disable=g-import-not-at-top
  from charred.models.t5_encoder import T5EncoderConfig  # pylint: disable=g-import-not-at-top
  gin_utils.parse([gin_file])
  return gin.get_configurable(T5EncoderConfig)()


def convert(src: str, out: str, component: str | None = None, t5_config=None,
            overwrite: bool = False) -> None:
  """Writes the checkpoint at `src` as charred model folder(s) under `out`."""
  from charred.models import pretrained  # pylint: disable=g-import-not-at-top
  from charred.models.convert import core  # pylint: disable=g-import-not-at-top
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'{out} exists; pass --overwrite to replace it.')
  if pretrained.detect_format(src) == 'diffusers_pipeline' and component is None:
    for part in ('unet', 'vae'):
      if os.path.isdir(os.path.join(src, part)):
        convert(os.path.join(src, part), os.path.join(out, part), None, None, overwrite)
    return
  start = time.time()
  plan = pretrained.plan_conversion(src, component, t5_config)
  expected = pretrained.parameter_shapes(plan.kind, plan.config)
  unused = core.check_plan(plan, expected)
  if unused:
    print(f'note: {len(unused)} tensors of {src} are not part of a {plan.kind} and are '
          f'skipped, e.g. {", ".join(unused[:3])}')
  total = len(expected)

  def with_progress():
    for i, item in enumerate(core.iter_converted(plan, expected), 1):
      if i % 50 == 0 or i == total:
        print(f'  {i}/{total} tensors', flush=True)
      yield item

  count = pretrained.save_pretrained(out, plan.kind, plan.config, with_progress(),
                                     source=os.path.abspath(src), overwrite=overwrite)
  print(f'{plan.kind}: {count:,} parameters from {src} -> {out} ({time.time() - start:.1f} s)')


def to_diffusers(src: str, out: str, overwrite: bool = False) -> None:
  from charred.models import pretrained  # pylint: disable=g-import-not-at-top
  from charred.models.convert import diffusers  # pylint: disable=g-import-not-at-top
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'{out} exists; pass --overwrite to replace it.')
  if pretrained.detect_format(src) != 'charred':
    raise ValueError(f'{src}: --to_diffusers takes a charred model folder (from this '
                     'converter or a training run export).')
  kind, config, params = pretrained.read_charred_model(src)
  if kind not in ('unet', 'autoencoder_kl'):
    raise ValueError(f'{src} holds a {kind}; only U-Nets and VAEs export to diffusers.')
  diffusers.export_diffusers(kind, config, params, out)
  print(f'{kind} -> {out} (diffusers PyTorch format)')


def main(argv):
  prog = 'python -m charred.convert'
  if len(argv) != 3:
    print(f'{prog}: error: expected SRC and OUT, got {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  src, out = argv[1], argv[2]
  logging.set_verbosity(logging.ERROR)  # Orbax logs every save, and notes on its registry.
  try:
    if _TO_DIFFUSERS.value:
      to_diffusers(src, out, _OVERWRITE.value)
    else:
      convert(src, out, _COMPONENT.value, _t5_config(_T5_GIN.value), _OVERWRITE.value)
  except (ValueError, OSError, KeyError) as e:
    from charred.configs import gin_utils  # pylint: disable=g-import-not-at-top
    gin_utils.exit_with_error(prog, e)


if __name__ == '__main__':
  app.run(main)
