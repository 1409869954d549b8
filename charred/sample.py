r"""Samples an image for a prompt from a trained run.

  python -m charred.sample --workdir=DIR --prompt='A sign that says "hello".' \
      --output=out.png [--seed=0] [--steps=50] [--guidance_scale=G] [--num_images=1] \
      [--scheduler=ddim|ddpm|euler|euler_ancestral|dpmpp_2m] [--guidance_rescale=0.0] \
      [--box=x0,y0,x1,y1] [--noprogress]

`--box` says where the quoted text goes (pixels), for a box-conditioned run
(`TextToImageConfig.box_conditioning`); without it such a run draws the quoted text where
its training data would have drawn it (a layout from the data's own renderer, seeded by
--seed), and says which box that was. Sampling goes through
`charred.pipeline.TextToImagePipeline`, with a progress bar over the steps unless
--noprogress.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np

from charred import sampling_flags as sf
from charred.configs import gin_utils

_PROMPT = flags.DEFINE_string('prompt', None, 'Text prompt.')
_OUTPUT = flags.DEFINE_string('output', 'sample.png', 'PNG file to write.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1, 'Images side by side in the output.')
_BOX = flags.DEFINE_string('box', None, 'x0,y0,x1,y1: the pixel box of the quoted text, for '
                           "a box-conditioned run (default: one of its data's layouts).")
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar over the sampling steps.')


def parse_box(text: str) -> tuple[int, int, int, int]:
  """'x0,y0,x1,y1' -> four ints; ValueError in one line otherwise."""
  try:
    box = tuple(int(v) for v in text.split(','))
  except ValueError:
    box = ()
  if len(box) != 4:
    raise ValueError(f'--box must be four integers x0,y0,x1,y1, got {text!r}.')
  return box


def quoted_text(prompt: str) -> str:
  """The text between the prompt's first double quote and the next (or the end)."""
  parts = prompt.split('"')
  if len(parts) < 2 or not parts[1]:
    raise ValueError('A box-conditioned run lays out the quoted text: quote it in the '
                     'prompt (A sign that says "...") or give --box=x0,y0,x1,y1.')
  return parts[1]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported after flag parsing so that --help is fast.
  from charred.configs import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from charred.configs import runs  # pylint: disable=g-import-not-at-top
  from charred.evaluation import grid  # pylint: disable=g-import-not-at-top
  from charred.models import schedulers  # pylint: disable=g-import-not-at-top
  from charred.models.generation import PromptTooLongError  # pylint: disable=g-import-not-at-top
  from charred.pipeline import TextToImagePipeline  # pylint: disable=g-import-not-at-top
  from charred.trainers.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  if not sf.WORKDIR.value or _PROMPT.value is None:
    gin_utils.exit_with_error('charred.sample', ValueError('--workdir and --prompt are required.'))
  try:
    schedulers.lookup(sf.SCHEDULER.value)  # a bad name fails before the run loads
    run = runs.load_run(sf.WORKDIR.value, sf.CHECKPOINT_STEP.value)
    pipe = TextToImagePipeline.from_run(run)
    boxes = None
    if _BOX.value is not None:
      boxes = [parse_box(_BOX.value)] * _NUM_IMAGES.value
    elif run.model.config.box_conditioning:
      data = experiment_lib.eval_data(run.experiment)
      box = data.layouts([quoted_text(_PROMPT.value)], *run.model.config.image_size,
                         sf.SEED.value)[0]
      print(f'Box {",".join(map(str, box))}: where the training data would draw the quoted '
            'text (--box to choose).')
      boxes = [box] * _NUM_IMAGES.value
    images = pipe([_PROMPT.value] * _NUM_IMAGES.value, seed=sf.SEED.value, boxes=boxes,
                  progress=_PROGRESS.value, **sf.generator_kwargs(pipe.guidance_scale))
  except (PromptTooLongError, FileNotFoundError, ValueError, CheckpointError) as e:
    gin_utils.exit_with_error('charred.sample', e)
  picture = np.concatenate([np.asarray(image) for image in images], axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  grid.save_png(_OUTPUT.value, picture)
  print(f'Wrote {_OUTPUT.value} ({picture.shape[1]}x{picture.shape[0]}) from step {run.step}.')


if __name__ == '__main__':
  app.run(main)
