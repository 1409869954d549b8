"""Periodic evaluators: sample held-out prompts, look at them, read them with OCR."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

from charred.evaluation import grid, text_metrics
from charred.evaluation.ocr import OcrReader
from charred.models.generation import ImageGenerator
from charred.models.text_to_image import TextToImage


@dataclasses.dataclass(frozen=True)
class SampleEvalConfig:
  num_prompts: int = 32  # first N held-out words, a fixed grid across the run
  num_steps: int = 50  # DDIM steps
  guidance_scale: float = 3.0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class RenderingTarget:
  """A held-out prompt and the text an OCR engine should read in its image."""
  prompt: str
  text: str
  bucket: str = ''


def read_and_score(ocr: OcrReader, images, texts: Sequence[str], buckets: Sequence[str]):
  """OCR the images: (text_metrics.score of the readings, a '✓ target → read' label each)."""
  read = ocr.read(images)
  return (text_metrics.score(read, texts, buckets=buckets),
          [grid.ocr_label(t, r) for t, r in zip(texts, read)])


class TextRenderingEvaluator:
  """Samples a fixed grid of held-out prompts and scores them with OCR.

  Writes `workdir/samples/step_<N>.png` (each tile labelled `target -> read`) and image
  and scalar summaries. It uses its own RNG, so it never changes training.
  """

  def __init__(self, model: TextToImage, targets: Sequence[RenderingTarget], workdir: str,
               config: SampleEvalConfig, ocr: OcrReader | None = None):
    self.targets = list(targets)[:config.num_prompts]
    self.config = config
    self.sample_dir = os.path.join(workdir, 'samples')
    self.generator = ImageGenerator(model, None, num_steps=config.num_steps,
                                    guidance_scale=config.guidance_scale)
    self.ocr = ocr or OcrReader()

  def __call__(self, step: int, params, writer) -> dict[str, float]:
    start = time.time()
    self.generator.params = params
    images = self.generator([t.prompt for t in self.targets], seed=self.config.seed,
                            batch_size=len(self.targets))
    scores, labels = read_and_score(self.ocr, images, [t.text for t in self.targets],
                                    [t.bucket for t in self.targets])
    picture = grid.make_grid(images, labels)
    os.makedirs(self.sample_dir, exist_ok=True)
    grid.save_png(os.path.join(self.sample_dir, f'step_{step}.png'), picture)
    writer.write_images(step, {'samples': picture[None]})
    metrics = {f'eval/{k}': float(v) for k, v in scores.items()}
    metrics['eval/seconds'] = time.time() - start
    writer.write_scalars(step, metrics)
    return metrics

