"""Prompts in, PIL images out: a trained text-to-image model as one object, in the shape of
diffusers' pipelines.

  pipe = TextToImagePipeline.from_pretrained('runs/r1')
  images = pipe(['A sign that says "hello".'], num_steps=50, seed=0)
  images[0].save('hello.png')
  small = pipe.to_int8()  # int8 kernels (charred.models.quantize)
  pipe.export('export/r1', batch=1, num_steps=20)  # IREE modules + weights.irpa (charred.aot)

Sampling is `charred.models.generation.ImageGenerator`'s: one compiled program per set of
sampling settings, kept for the pipeline's lifetime, so calls with the same settings do
not trace again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from charred.models import pretrained
from charred.models import quantize
from charred.models.diffusion_model import DiffusionModel
from charred.models.generation import ImageGenerator

# ImageGenerator's default, for a model whose run does not declare one.
DEFAULT_GUIDANCE_SCALE = 3.0


@dataclasses.dataclass(frozen=True)
class TextToImagePipeline:
  """A text-to-image model, its (EMA) parameters and how it samples by default.

  Attributes:
    model: The network with its codec (pixels, or the frozen VAE of a latent model).
    params: Its parameters: float, or int8 kernels after `to_int8`.
    guidance_scale: The classifier-free guidance scale `__call__` uses unless told.
    step: The training step the parameters are from, where known.
  """
  model: DiffusionModel
  params: Any
  guidance_scale: float = DEFAULT_GUIDANCE_SCALE
  step: int | None = None
  _generators: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @classmethod
  def from_run(cls, run) -> TextToImagePipeline:
    """The EMA model of a `charred.configs.runs.Run`, guided as its experiment samples."""
    from charred.evaluation import evaluators  # pylint: disable=g-import-not-at-top
    guidance = evaluators.sampling_config(run.experiment.evaluators).guidance_scale
    return cls(run.model, run.params, guidance, run.step)

  @classmethod
  def from_pretrained(cls, path: str, step: int | None = None) -> TextToImagePipeline:
    """The model of checkpoint `step` (default: newest) of a training run.

    Args:
      path: A training workdir: with `config.gin` (rebuilt as `charred.configs.runs.
        load_run` does, its experiment's guidance scale included), or with
        `charred_run.json` only (the model config `charred.main` records; no gin, no
        trainer).
      step: The checkpoint step; None: the newest.

    Raises:
      FileNotFoundError: `path`, or its checkpoint, does not exist.
      ValueError: `path` is not a training run (e.g. one network's weights).
    """
    if not os.path.isdir(path):
      raise FileNotFoundError(f'{path} is not a directory: pass a charred training workdir.')
    if os.path.exists(os.path.join(path, 'config.gin')):
      from charred.configs import runs  # pylint: disable=g-import-not-at-top
      return cls.from_run(runs.load_run(path, step))
    fmt = pretrained.detect_format(path)
    if fmt != 'charred_run':
      raise ValueError(f'{path} holds {fmt} weights of one network, not a text-to-image '
                       'model: pass a charred training workdir (config.gin or '
                       f'{pretrained.RUN_MODEL_FILE} with checkpoints/).')
    config, params = pretrained.read_charred_run(path, step)
    codec = pretrained.make_codec(config.pixel_space, _run_autoencoder(path))
    return cls(DiffusionModel(config, codec=codec), params, step=step)

  def generator(self, *, num_steps: int = 50, guidance_scale: float | None = None,
                scheduler: str = 'ddim', guidance_rescale: float = 0.0,
                progress: bool = False) -> ImageGenerator:
    """The ImageGenerator of these settings, built (and compiled) once per pipeline."""
    key = (num_steps, self.guidance_scale if guidance_scale is None else guidance_scale,
           scheduler, guidance_rescale, progress)
    if key not in self._generators:
      self._generators[key] = self.model.generator(
          self.params, num_steps=key[0], guidance_scale=key[1], scheduler=scheduler,
          guidance_rescale=guidance_rescale, progress=progress)
    return self._generators[key]

  def __call__(self, prompts: str | Sequence[str], num_steps: int = 50,
               guidance_scale: float | None = None, scheduler: str = 'ddim', seed: int = 0,
               boxes=None, *, guidance_rescale: float = 0.0, batch_size: int = 64,
               progress: bool = False) -> list[Image.Image]:
    """One RGB image per prompt, deterministic per (seed, prompt order).

    Args:
      prompts: A prompt or a list of them.
      num_steps: Sampling steps.
      guidance_scale: Classifier-free guidance scale; None: the pipeline's.
      scheduler: A name in `charred.models.schedulers.SCHEDULERS`.
      seed: The sampling seed.
      boxes: [N, 4] pixel boxes (x0, y0, x1, y1) of each prompt's quoted text: required
        by a box-conditioned model (`TextToImageConfig.box_conditioning`), refused by
        others.
      guidance_rescale: diffusers' phi in [0, 1].
      batch_size: Prompts sampled at once.
      progress: Show a progress bar over the sampling steps.

    Returns:
      PIL images of the model's size, in prompt order.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    generator = self.generator(num_steps=num_steps, guidance_scale=guidance_scale,
                               scheduler=scheduler, guidance_rescale=guidance_rescale,
                               progress=progress)
    images = generator(list(prompts), seed=seed, batch_size=batch_size, boxes=boxes)
    return [Image.fromarray(image) for image in images]

  def export(self, out: str, *, batch: int = 1, num_steps: int = 50,
             guidance_scale: float | None = None, scheduler: str = 'ddim',
             guidance_rescale: float = 0.0, targets: Sequence[str] | None = None,
             overwrite: bool = False, settings: dict | None = None) -> dict:
    """Writes the text encoder, the guided sampling loop (these settings, `batch` prompts)
    and the decoder as StableHLO and IREE modules, with the weights in `out/weights.irpa`
    and `out/manifest.json` (see `charred.aot`); returns the manifest. `targets`: IREE
    targets (None: llvm-cpu, and cuda where the compiler has it)."""
    from charred import aot  # pylint: disable=g-import-not-at-top
    generator = self.model.generator(
        self.params, num_steps=num_steps,
        guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
        scheduler=scheduler, guidance_rescale=guidance_rescale)
    return aot.write(generator, out, batch=batch, targets=targets, overwrite=overwrite,
                     settings={'step': self.step, **(settings or {})})

  def to_int8(self, mode: str = 'weight_only') -> TextToImagePipeline:
    """This pipeline with int8 kernels in the text encoder, U-Net and VAE (see
    `charred.models.quantize`; `mode`: 'weight_only' or 'dynamic')."""
    model, params = self.model.quantized(self.params, quantize.check_mode(mode))
    return dataclasses.replace(self, model=model, params=params, _generators={})

  def weight_bytes(self) -> int:
    """Bytes of the weights sampling reads: the model's and its VAE's."""
    return quantize.nbytes(self.params) + quantize.nbytes(getattr(self.model.codec, 'params',
                                                                  {}))


def _run_autoencoder(workdir: str) -> str | None:
  """The VAE a run's `charred_run.json` records (`InitConfig.autoencoder`), if any."""
  with open(os.path.join(workdir, pretrained.RUN_MODEL_FILE)) as f:
    return json.load(f).get('init', {}).get('autoencoder')


def to_array(images: Sequence[Image.Image]) -> np.ndarray:
  """uint8 [N, H, W, 3] from the pipeline's images."""
  return np.stack([np.asarray(image) for image in images])
