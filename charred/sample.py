r"""Samples an image for a prompt from a trained run.

  python -m charred.sample --workdir=DIR --prompt='A sign that says "hello".' \
      --output=out.png [--seed=0] [--steps=50] [--guidance_scale=G] [--num_images=1] \
      [--scheduler=ddim|ddpm|euler|euler_ancestral|dpmpp_2m] [--guidance_rescale=0.0]
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np

from charred.configs import gin_utils
from charred.configs import sampling_flags as sf

_PROMPT = flags.DEFINE_string('prompt', None, 'Text prompt.')
_OUTPUT = flags.DEFINE_string('output', 'sample.png', 'PNG file to write.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1, 'Images side by side in the output.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported after flag parsing so that --help is fast.
  from charred.configs import runs  # pylint: disable=g-import-not-at-top
  from charred.evaluation import evaluators, grid  # pylint: disable=g-import-not-at-top
  from charred.models import schedulers  # pylint: disable=g-import-not-at-top
  from charred.models.generation import PromptTooLongError  # pylint: disable=g-import-not-at-top
  if not sf.WORKDIR.value or _PROMPT.value is None:
    gin_utils.exit_with_error('charred.sample', ValueError('--workdir and --prompt are required.'))
  try:
    schedulers.lookup(sf.SCHEDULER.value)  # a bad name fails before the run loads
    run = runs.load_run(sf.WORKDIR.value, sf.CHECKPOINT_STEP.value)
    sampling = evaluators.sampling_config(run.experiment.evaluators)
    generator = run.model.generator(run.params, **sf.generator_kwargs(sampling.guidance_scale))
    images = generator([_PROMPT.value] * _NUM_IMAGES.value, seed=sf.SEED.value)
  except (PromptTooLongError, FileNotFoundError, ValueError) as e:
    gin_utils.exit_with_error('charred.sample', e)
  picture = np.concatenate(list(images), axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  grid.save_png(_OUTPUT.value, picture)
  print(f'Wrote {_OUTPUT.value} ({picture.shape[1]}x{picture.shape[0]}) from step {run.step}.')


if __name__ == '__main__':
  app.run(main)
