"""The OCR path reads rendered ground-truth signs (not model samples).

If the evaluator cannot read clean renders of the very words it is asked to
score, every model metric it reports is meaningless; these tests fail then.
"""
import os
import subprocess
import sys

import numpy as np
from PIL import Image, ImageFilter
import pytest

from charred.datasets import render, words
from charred.evaluation import grid, ocr, text_metrics

NUM_WORDS = 48
SEED = 0


@pytest.fixture(scope="module")
def signs():
  """Ground-truth renders of the first validation words: (images, texts)."""
  validation = words.word_splits(words.WordSplitConfig())["validation"][:NUM_WORDS]
  examples = [render.render_example(w, SEED, i) for i, w in enumerate(validation)]
  return np.stack([e["image"] for e in examples]), [e["text"] for e in examples]


@pytest.fixture(scope="module")
def reader():
  return ocr.OcrReader()


def _degrade(image, seed, sigma=1.0, noise_std=0.05):
  """Gaussian blur then additive Gaussian noise, roughly like model samples."""
  rng = np.random.default_rng(seed)
  x = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)), np.float32)
  x += rng.normal(0.0, noise_std * 255.0, x.shape)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_reads_ground_truth_renders(signs, reader):
  images, texts = signs
  assert images.shape == (NUM_WORDS, 32, 128, 3)
  predictions = reader.read(images)
  metrics = text_metrics.score(predictions, texts)
  errors = [(t, p) for t, p in zip(texts, predictions) if text_metrics.normalize(p) != t]
  assert metrics["exact_match"] >= 0.95, (metrics, errors)
  assert metrics["num_words"] == NUM_WORDS


def test_metric_fails_for_wrong_targets(signs, reader):
  images, texts = signs
  predictions = reader.read(images[:16])
  shifted = texts[1:17]  # Every image scored against a different word.
  metrics = text_metrics.score(predictions, shifted)
  assert metrics["exact_match_ci"] <= 0.1
  assert metrics["ned"] < 0.5


def test_reads_blurred_noisy_renders(signs, reader):
  images, texts = signs
  degraded = np.stack([_degrade(im, i) for i, im in enumerate(images)])
  metrics = text_metrics.score(reader.read(degraded), texts)
  assert metrics["exact_match"] >= 0.9, metrics


def test_detector_path_reads_ground_truth(signs):
  images, texts = signs
  predictions = ocr.OcrReader(detect=True).read(images[:12])
  assert text_metrics.score(predictions, texts[:12])["exact_match"] >= 0.9, predictions


def test_reads_larger_light_on_dark_sign(reader):
  config = render.RenderConfig(height=64, width=256, font_size=(32, 40))
  image, _ = render.render("Zebra", np.random.default_rng(0), config)
  inverted = 255 - image
  assert reader.read(np.stack([image, inverted])) == ["Zebra", "Zebra"]


def test_blank_image_reads_empty(reader):
  assert reader.read([np.full((32, 128, 3), 200, np.uint8)]) == [""]


def test_normalize_contrast_makes_dark_text_on_white():
  image = np.zeros((32, 128, 3), np.uint8)
  image[10:20, 10:50] = 230  # Light "text" on black.
  grey = ocr.normalize_contrast(image)
  assert grey[0, 0] == 255 and grey[15, 20] == 0
  crop = ocr.crop_to_text(grey, margin=0.5)
  assert crop.shape == (10 + 2 * 5, 40 + 2 * 5)
  assert crop[0, 0] == 255 and crop[5, 5] == 0


def test_import_is_lazy():
  code = ("import sys, charred.evaluation; "
          "bad = [m for m in sys.modules if m.split('.')[0] in "
          "('rapidocr_onnxruntime', 'onnxruntime', 'tensorflow')]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_grid_and_save_png(signs, tmp_path):
  images, texts = signs
  labels = [grid.ocr_label(t, t) for t in texts[:5]] + [grid.ocr_label("cat", "cot")]
  assert labels[0].startswith(grid.CORRECT) and labels[-1].startswith(grid.INCORRECT)
  image = grid.make_grid(images[:6], labels, ncols=4, scale=2, margin=4)
  assert image.dtype == np.uint8 and image.ndim == 3
  assert image.shape[1] == 4 * (2 * 128 + 4) + 4
  assert image.shape[0] > 2 * (2 * 32 + 4)  # Two rows plus label strips.
  # Tiles are nearest-neighbour upscaled copies of the inputs.
  np.testing.assert_array_equal(image[4:4 + 64:2, 4:4 + 256:2], images[0])
  path = tmp_path / "sub" / "grid.png"
  grid.save_png(str(path), image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # No temp left.
