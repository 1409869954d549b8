"""LAION's improved aesthetic predictor: an MLP head over CLIP ViT-L/14 image embeddings.

The released head (christophschuhmann/improved-aesthetic-predictor,
`sac+logos+ava1-l14-linearMSE.pth`, the model behind LAION-Aesthetics v2) is a torch
nn.Sequential of Linear 768->1024, Dropout 0.2, Linear 1024->128, Dropout 0.2,
Linear 128->64, Dropout 0.1, Linear 64->16, Linear 16->1, with no activations,
applied to the L2-normalised embedding (a zero vector is left as is). Its state dict keys
are therefore `layers.{0,2,4,6,7}.{weight,bias}`, weights stored [out, in].

Being linear, the head is one affine map of the normalised embedding; the tf.data
annotator uses that (`AestheticHead.affine`), `__call__` applies the layers in turn as the
reference does. Numpy only: no TensorFlow unless `annotate_and_filter` is called.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

EMBEDDING_DIM = 768
LAYER_SIZES = (EMBEDDING_DIM, 1024, 128, 64, 16, 1)
# Positions of the Linear layers in the reference nn.Sequential (Dropouts at 1, 3, 5).
LINEAR_INDICES = (0, 2, 4, 6, 7)
EMBEDDING_KEY = "clip_image_embedding"
SCORE_KEY = "aesthetic_score"


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """x / ||x|| along the last axis; zero vectors stay zero."""
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.where(norm == 0, 1, norm)


@dataclasses.dataclass(frozen=True)
class AestheticHead:
  """kernels[i]: float32 [in, out]; biases[i]: float32 [out], for the five layers."""
  kernels: tuple[np.ndarray, ...]
  biases: tuple[np.ndarray, ...]

  @classmethod
  def from_state_dict(cls, state: Mapping[str, np.ndarray],
                      source: str = "state dict") -> "AestheticHead":
    """From the reference's torch state dict (arrays keyed `layers.<i>.weight|bias`)."""
    kernels, biases = [], []
    for i, (n_in, n_out) in zip(LINEAR_INDICES, zip(LAYER_SIZES[:-1], LAYER_SIZES[1:])):
      for suffix, shape in (("weight", (n_out, n_in)), ("bias", (n_out,))):
        key = f"layers.{i}.{suffix}"
        if key not in state:
          raise ValueError(f"{source}: no {key!r}; not LAION's aesthetic head "
                           f"(keys: {sorted(state)[:8]}).")
        if tuple(np.shape(state[key])) != shape:
          raise ValueError(f"{source}: {key} has shape {tuple(np.shape(state[key]))}, "
                           f"expected {shape}.")
      kernels.append(np.asarray(state[f"layers.{i}.weight"], np.float32).T)
      biases.append(np.asarray(state[f"layers.{i}.bias"], np.float32))
    return cls(tuple(kernels), tuple(biases))

  def __call__(self, embeddings: np.ndarray) -> np.ndarray:
    """Scores of CLIP ViT-L/14 image embeddings [..., 768] (normalised here) -> [...]."""
    x = l2_normalize(np.asarray(embeddings, np.float32))
    for kernel, bias in zip(self.kernels, self.biases):
      x = x @ kernel + bias
    return x[..., 0]

  def affine(self) -> tuple[np.ndarray, float]:
    """(w [768], b) with score = normalize(e) . w + b, composed in float64."""
    w = np.eye(EMBEDDING_DIM)
    b = np.zeros(EMBEDDING_DIM)
    for kernel, bias in zip(self.kernels, self.biases):
      w, b = w @ kernel.astype(np.float64), b @ kernel.astype(np.float64) + bias
    return w[:, 0], float(b[0])


def load(path: str) -> AestheticHead:
  """Reads `sac+logos+ava1-l14-linearMSE.pth` (or any head saved in its layout) with torch's
  weights-only loader; bad files raise a one-line error naming `path`."""
  from charred.models.convert import sources  # pylint: disable=g-import-not-at-top
  tensors = sources.open_torch_bin(path)
  state = {name: t.load() for name, t in tensors.items() if name.startswith("layers.")}
  return AestheticHead.from_state_dict(state, source=path)


def annotate_and_filter(ds, head: AestheticHead | str | None = None,
                        min_score: float | None = None, counts=None,
                        name: str = "aesthetic", embedding_key: str = EMBEDDING_KEY,
                        score_key: str = SCORE_KEY):
  """Scores examples and drops those below `min_score` ('low_score').

  An example's score is its metadata `aesthetic_score` when that is a number, else the
  head's score of its `clip_image_embedding` (when a `head` is given and the embedding is
  finite and non-zero), written into `aesthetic_score`. Examples with neither pass and are
  counted 'unscored' (their score stays NaN); with `min_score=None` nothing is dropped
  and the filter only annotates and counts. A SeqIO preprocessor; counts go to
  `filters.COUNTS` unless `counts` (a filters.FilterCounts) is given.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from charred.datasets import filters  # pylint: disable=g-import-not-at-top
  if isinstance(head, str):  # A path, as `prepare --filter_args=aesthetic.head=PATH` gives.
    head = load(head)
  if head is not None:
    w, b = head.affine()
    w = tf.constant(w, tf.float64)

  def with_score(ex):
    ex = dict(ex)
    score = (tf.cast(ex[score_key], tf.float32) if score_key in ex
             else tf.constant(float("nan")))
    if head is not None and embedding_key in ex:
      e = tf.cast(tf.reshape(ex[embedding_key], [EMBEDDING_DIM]), tf.float64)
      norm = tf.norm(e)
      usable = tf.reduce_all(tf.math.is_finite(e)) & (norm > 0)
      unit = e / tf.where(usable, norm, tf.constant(1.0, tf.float64))
      predicted = tf.cast(tf.tensordot(unit, w, 1) + b, tf.float32)
      score = tf.where(tf.math.is_nan(score) & usable, predicted, score)
    ex[score_key] = score
    return ex

  def outcome(ex):
    score = ex[score_key]
    low = tf.constant(False) if min_score is None else score < min_score
    # 0 kept, 1 unscored (passes), 2 low_score.
    return tf.where(tf.math.is_nan(score), 1, tf.where(low, 2, 0))

  ds = ds.map(with_score, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return filters.counting_filter(ds, name, (filters.KEPT, "unscored", "low_score"), outcome,
                                 counts, num_passing=2)
