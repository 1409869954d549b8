"""Aspect-ratio x caption-length bucketed batches from JPEG XL shards; TF-free, resumable.

NovelAI-style buckets (see `aspect_buckets`): every image goes to the bucket whose aspect
ratio is nearest in log space, is resized to cover it and cropped (centre, or a seeded
random crop); its caption goes to the shortest text length that holds it (longer ones
are truncated to the longest). Every batch comes from one (aspect, text length) bucket,
so the model sees few distinct shapes (each compiles once).

The stream (`BucketedBatches`) is a pure function of (shards, config, global batch size,
seed), a Grain pipeline: `streams.bucket_batches` plans global batches (epoch e visits all
records in a seeded pseudo-random order, a Feistel permutation computed pointwise, so no
per-epoch index array; each record number joins its bucket's buffer, and a full buffer is
the next batch), a map decodes this process's rows, and Grain's prefetch thread reads
ahead. Buffers carry over across epochs, so nothing is dropped (a bucket with fewer
records than one batch fills over several epochs, repeating records). Bucket assignment
reads only the shards' `.index.npy` sidecars; images are read and decoded only for the
rows this process yields.

Multi-host: all processes plan the same global batches of `batch_size * process_count`
records and process i decodes rows [i * batch_size, (i + 1) * batch_size): every host's
batch has the same shape at every step (one global array), and the data of a step does
not depend on the number of hosts.

The pieces are functions of their arguments, shared with the encoder cache
(`encoder_cache.write_bucketed_cache` and its reader), so that a cache holds what this
reader decodes and is read in the same plan: `bucket_numbers`, `bucket_shape`,
`epoch_permutation`, `plan`, `decode_to_bucket`, and `PlannedBatches` (a plan mapped into
batches, with its checkpointable state).

Resuming: `get_state()` is a small JSON-able dict (epoch, position, batch count and the
record numbers waiting in partial buckets); `BucketedBatches(..., state=s)` or
`set_state(s)` continues with exactly the batch that followed.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from charred import tokenizer
from charred.datasets import jxl_shards
from charred.datasets import streams

STATE_VERSION = 1
_ORDER_CHUNK = 4096
_RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC,
             "bilinear": Image.BILINEAR, "box": Image.BOX}


def aspect_buckets(base_resolution: int = 512, step: int = 64, min_side: int = 256,
                   max_side: int | None = None) -> list[tuple[int, int]]:
  """(width, height) buckets with area <= base_resolution^2, sorted by width / height.

  Widths run from `min_side` to `max_side` (default 2 * base) in `step`s; each gets the
  largest height, a multiple of `step` no larger than `max_side`, whose area fits the
  budget. Their transposes and the square base bucket are added; duplicates removed.
  """
  max_side = max_side or 2 * base_resolution
  if min(base_resolution, step, min_side) <= 0 or base_resolution % step:
    raise ValueError(f"base_resolution {base_resolution} must be a positive multiple "
                     f"of step {step}, and min_side {min_side} positive.")
  budget = base_resolution * base_resolution
  sizes = {(base_resolution, base_resolution)}
  for width in range(min_side, max_side + 1, step):
    height = min(max_side, budget // width // step * step)
    if height >= min_side:
      sizes.update({(width, height), (height, width)})
  return sorted(sizes, key=lambda s: (s[0] / s[1], s))


def nearest_bucket(width, height, buckets: Sequence[tuple[int, int]]):
  """Index of the bucket nearest in log aspect ratio (first of ties); vectorised."""
  log_ratios = np.log([w / h for w, h in buckets])
  ratio = np.log(np.asarray(width, np.float64) / np.asarray(height, np.float64))
  return np.abs(ratio[..., None] - log_ratios).argmin(-1)


def text_length_bucket(num_tokens, text_lengths: Sequence[int]):
  """Index of the shortest text length >= num_tokens (the last if none); vectorised."""
  index = np.searchsorted(np.asarray(text_lengths), np.asarray(num_tokens), side="left")
  return np.minimum(index, len(text_lengths) - 1)


def crop_box(width: int, height: int, size: tuple[int, int],
             rng: np.random.Generator | None = None) -> tuple[float, float, float, float]:
  """The (left, top, right, bottom) source region that, scaled to cover `size` = (w, h),
  is kept: centred, or uniformly placed when `rng` is given."""
  scale = max(size[0] / width, size[1] / height)
  crop_w, crop_h = min(width, size[0] / scale), min(height, size[1] / scale)
  u, v = (0.5, 0.5) if rng is None else rng.random(2)
  left, top = u * (width - crop_w), v * (height - crop_h)
  return left, top, left + crop_w, top + crop_h


def resize_to_bucket(image: np.ndarray, size: tuple[int, int],
                     rng: np.random.Generator | None = None,
                     resample: str = "bicubic") -> tuple[np.ndarray, tuple[int, int]]:
  """uint8 [H, W, 3] -> uint8 [size[1], size[0], 3] covering then cropping; also returns
  the crop's (top, left) in resized pixels (SDXL's crop conditioning).

  One PIL resize of just the kept region: the same pixels as resizing the whole image
  and then cropping, without resampling what the crop discards.
  """
  height, width = image.shape[:2]
  box = crop_box(width, height, size, rng)
  scale = max(size[0] / width, size[1] / height)
  out = Image.fromarray(image).resize(size, _RESAMPLE[resample], box=box, reducing_gap=3.0)
  return np.asarray(out), (round(box[1] * scale), round(box[0] * scale))


@dataclasses.dataclass(frozen=True)
class BucketConfig:
  """Buckets: see `aspect_buckets`; `text_lengths` are token lengths (bytes + EOS), so a
  caption of n UTF-8 bytes goes to the first length >= n + 1."""
  base_resolution: int = 512
  step: int = 64
  min_side: int = 256
  max_side: int | None = None
  text_lengths: tuple[int, ...] = (64, 128, 256)

  def sizes(self) -> list[tuple[int, int]]:
    return aspect_buckets(self.base_resolution, self.step, self.min_side, self.max_side)

  def check_text_length(self, model_text_length: int) -> None:
    """Refuses text lengths a model of `model_text_length` tokens cannot read."""
    longest = max(self.text_lengths)
    if longest > model_text_length:
      raise ValueError(f'DataConfig.buckets.text_lengths go up to {longest} tokens, more '
                       f'than the model\'s text_length {model_text_length}.')


class FeistelPermutation:
  """A seeded bijection of [0, n), evaluated pointwise in O(1) memory.

  A 4-round Feistel network permutes the smallest power-of-4 domain >= n; values that
  land outside [0, n) are encrypted again ("cycle walking"), which restricts a
  permutation of the domain to one of [0, n). The domain is under 4n, so ~2 rounds of
  walking on average.
  """

  def __init__(self, n: int, seed: Sequence[int] | int):
    self.n = int(n)
    bits = max(2, (self.n - 1).bit_length())
    self._half = (bits + 1) // 2
    self._mask = np.uint64((1 << self._half) - 1)
    self._keys = np.random.default_rng(seed).integers(0, 2**63, size=4, dtype=np.uint64)

  @staticmethod
  def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: every input bit affects every output bit.
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))

  def _encrypt(self, x: np.ndarray) -> np.ndarray:
    half = np.uint64(self._half)
    left, right = x >> half, x & self._mask
    for key in self._keys:
      left, right = right, left ^ (self._mix(right ^ key) & self._mask)
    return (left << half) | right

  def __call__(self, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    if self.n <= 1:
      return x.astype(np.int64)
    y = self._encrypt(x)
    outside = y >= self.n
    while outside.any():
      y[outside] = self._encrypt(y[outside])
      outside = y >= self.n
    return y.astype(np.int64)


# The pieces both the bucketed reader and the encoder cache (datasets.encoder_cache) use,
# so that a cache holds exactly what the reader would decode, in the same plan.


def bucket_numbers(index: np.ndarray, config: BucketConfig) -> np.ndarray:
  """int32 [N]: every record's bucket, from a shards' `.index.npy` rows (width, height,
  caption_bytes): aspect bucket * len(text_lengths) + text length bucket."""
  sizes, lengths = config.sizes(), tuple(config.text_lengths)
  return (nearest_bucket(index["width"], index["height"], sizes) * len(lengths)
          + text_length_bucket(np.asarray(index["caption_bytes"]) + 1, lengths)
          ).astype(np.int32)


def num_buckets(config: BucketConfig) -> int:
  return len(config.sizes()) * len(config.text_lengths)


def bucket_shape(config: BucketConfig, bucket: int) -> tuple[int, int, int]:
  """(height, width, text_length) of bucket number `bucket`."""
  lengths = tuple(config.text_lengths)
  width, height = config.sizes()[bucket // len(lengths)]
  return height, width, lengths[bucket % len(lengths)]


def epoch_permutation(num_records: int, seed: int, shuffle: bool = True):
  """(epoch, positions) -> record numbers: epoch e's seeded order (a Feistel permutation,
  pointwise), or the identity without `shuffle`."""
  if not shuffle:
    return lambda epoch, positions: positions
  return lambda epoch, positions: FeistelPermutation(num_records, [seed, epoch])(positions)


def plan(bucket_of: np.ndarray, global_batch_size: int, *, seed: int, shuffle: bool = True,
         repeat: bool = True):
  """The global batches of one bucket each (`streams.bucket_batches`) over records whose
  buckets are `bucket_of`, in `epoch_permutation`'s order."""
  return streams.bucket_batches(len(bucket_of), epoch_permutation(len(bucket_of), seed, shuffle),
                                bucket_of, global_batch_size, repeat=repeat,
                                chunk_size=_ORDER_CHUNK)


def state_fingerprint(num_records: int, config: BucketConfig, global_batch_size: int,
                      seed: int, shuffle: bool) -> dict[str, Any]:
  """What a saved plan state is valid for (`PlannedBatches.set_state` checks it)."""
  return dict(version=STATE_VERSION, num_records=num_records, seed=seed, shuffle=shuffle,
              global_batch_size=global_batch_size,
              buckets=[list(s) for s in config.sizes()],
              text_lengths=list(config.text_lengths))


def process_rows(planned: dict[str, Any], process_index: int, batch_size: int) -> np.ndarray:
  """This process's record numbers of a planned global batch."""
  first = process_index * batch_size
  return planned["indices"][first:first + batch_size]


def decode_to_bucket(data: bytes, size: tuple[int, int], rng: np.random.Generator | None = None,
                     resample: str = "bicubic") -> tuple[dict[str, Any], np.ndarray]:
  """A serialized shard record -> (the record with `original_size` (height, width) and
  `crop` (top, left) added and `image` dropped, uint8 [size[1], size[0], 3] pixels)."""
  record = jxl_shards.parse_record(data)
  pixels = jxl_shards.decode_image(record.pop("image"))
  if pixels.ndim != 3 or pixels.shape[-1] != 3:
    raise ValueError(f"decoded shape {pixels.shape}")
  resized, crop = resize_to_bucket(pixels, size, rng, resample)
  record.update(original_size=(pixels.shape[0], pixels.shape[1]), crop=crop)
  return record, resized


def check_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(process_index, process_count), JAX's where None."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  return process_index, process_count


class PlannedBatches:
  """A planned stream (`plan`) mapped by `decode` into batches, read ahead by Grain's
  prefetch thread; checkpointable: `get_state()` is the plan's state (see
  `streams.bucket_batches`) with `fingerprint`, which `set_state` checks."""

  def __init__(self, planned, decode, fingerprint: dict[str, Any], prefetch: int = 2,
               state: dict[str, Any] | None = None):
    self._fingerprint = fingerprint
    # Grain's prefetch thread decodes the next batches; its state is the plan's after the
    # last batch yielded.
    self._iterator = iter(grain.experimental.ThreadPrefetchIterDataset(
        planned.map(decode), prefetch_buffer_size=max(1, prefetch)))
    if state is not None:
      self.set_state(state)

  def get_state(self) -> dict[str, Any]:
    """JSON-able state after the last batch yielded: the fingerprint, and the plan's
    epoch, position, batch count and the record numbers waiting in partial buckets."""
    return dict(self._fingerprint, **self._iterator.get_state())

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues the stream after the batch `state` was taken at."""
    for name, value in self._fingerprint.items():
      if state.get(name) != value:
        raise ValueError(f"state was saved with {name}={state.get(name)!r}, this iterator "
                         f"has {value!r}.")
    self._iterator.set_state({k: v for k, v in state.items() if k not in self._fingerprint})

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def close(self) -> None:
    self._iterator.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class BucketedBatches(PlannedBatches):
  """Iterator of numpy batches, each from one bucket, exactly resumable.

  Batches: image [B, H, W, 3] (float32 in [-1, 1], or uint8 with image_dtype=np.uint8),
  text_tokens / text_mask int32 [B, L] (ByT5 bytes, see charred.tokenizer), caption,
  key, language (numpy str [B]), bucket int32 [B] (all equal; see `bucket_shape`),
  original_size int32 [B, 2] (stored height, width) and crop_top_left int32 [B, 2].

  Resizing uses PIL's antialiased filters, bicubic by default (about a third cheaper
  than Lanczos, and as sharp when downscaling).

  Records that fail to read or decode are counted in `metrics` and their rows filled
  with another row of the same batch (zeros and '' if none decodes), so that every
  process keeps yielding the same shapes in step.
  """

  def __init__(self, shards: str | jxl_shards.JxlShards, batch_size: int,
               config: BucketConfig = BucketConfig(), *, seed: int = 0,
               shuffle: bool = True, repeat: bool = True, random_crop: bool = False,
               resample: str = "bicubic", image_dtype=np.float32,
               process_index: int | None = None, process_count: int | None = None,
               num_threads: int | None = None, prefetch: int = 2,
               state: dict[str, Any] | None = None):
    process_index, process_count = check_process(process_index, process_count)
    if resample not in _RESAMPLE:
      raise ValueError(f"resample {resample!r} is not one of {sorted(_RESAMPLE)}.")
    self.shards = (shards if isinstance(shards, jxl_shards.JxlShards)
                   else jxl_shards.JxlShards(shards))
    self.config = config
    self.batch_size = batch_size
    self.global_batch_size = batch_size * process_count
    self._process_index = process_index
    self._seed = seed
    self._random_crop, self._resample = random_crop, resample
    self._image_dtype = np.dtype(image_dtype)
    self.sizes = config.sizes()
    self.text_lengths = tuple(config.text_lengths)
    if len(self.shards.index) == 0:
      raise ValueError(f"{self.shards.out_dir} holds no records.")
    self._bucket_of = bucket_numbers(self.shards.index, config)
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1)
    self.metrics = collections.Counter()
    super().__init__(
        plan(self._bucket_of, self.global_batch_size, seed=seed, shuffle=shuffle,
             repeat=repeat), self._decode,
        state_fingerprint(len(self.shards), config, self.global_batch_size, seed, shuffle),
        prefetch, state)

  # Buckets.

  @property
  def num_buckets(self) -> int:
    return num_buckets(self.config)

  def bucket_shape(self, bucket: int) -> tuple[int, int, int]:
    """(height, width, text_length) of bucket number `bucket`."""
    return bucket_shape(self.config, bucket)

  def bucket_counts(self) -> np.ndarray:
    """Records per bucket."""
    return np.bincount(self._bucket_of, minlength=self.num_buckets)

  # Decoding (Grain's prefetch thread, rows on the pool).

  def _load_row(self, images: np.ndarray, row: int, key: int, batch_number: int,
                global_row: int) -> dict[str, Any] | None:
    height, width, _ = images.shape[1:]
    try:
      rng = (np.random.default_rng([self._seed, batch_number, global_row])
             if self._random_crop else None)
      record, resized = decode_to_bucket(self.shards.read_bytes([key])[0], (width, height),
                                         rng, self._resample)
    except Exception as e:  # A damaged record must not stop training.  # pylint: disable=broad-except
      return dict(error=type(e).__name__)
    if self._image_dtype == np.uint8:
      images[row] = resized
    else:  # In place, without a float temporary of the whole image.
      np.multiply(resized, 2.0 / 255.0, out=images[row], dtype=self._image_dtype)
      images[row] -= 1.0
    return dict(caption=record["caption"], key=record["key"],
                language=record.get("language", ""),
                original_size=record["original_size"], crop=record["crop"])

  def _decode(self, planned: dict[str, Any]) -> dict[str, np.ndarray]:
    """This process's rows of a planned global batch, decoded into one batch."""
    bucket, first = planned["bucket"], self._process_index * self.batch_size
    keys = process_rows(planned, self._process_index, self.batch_size)
    height, width, text_length = self.bucket_shape(bucket)
    images = np.empty((self.batch_size, height, width, 3), self._image_dtype)
    futures = [self._pool.submit(self._load_row, images, i, int(key), planned["number"],
                                 first + i) for i, key in enumerate(keys)]
    rows = [f.result() for f in futures]
    good = [i for i, r in enumerate(rows) if "error" not in r]
    for i, r in enumerate(rows):
      if "error" in r:
        self.metrics[f"bad_record/{r['error']}"] += 1
        if good:
          images[i], rows[i] = images[good[0]], rows[good[0]]
        else:
          images[i] = 0
          rows[i] = dict(caption="", key="", language="", original_size=(0, 0), crop=(0, 0))
    captions = [r["caption"] for r in rows]
    tokens, mask = tokenizer.encode_batch(captions, text_length)
    self.metrics["batches"] += 1
    self.metrics["images"] += len(rows)
    return dict(
        image=images, caption=np.array(captions, dtype=np.str_),
        key=np.array([r["key"] for r in rows], dtype=np.str_),
        language=np.array([r["language"] for r in rows], dtype=np.str_),
        text_tokens=tokens, text_mask=mask,
        bucket=np.full((len(rows),), bucket, np.int32),
        original_size=np.array([r["original_size"] for r in rows], np.int32),
        crop_top_left=np.array([r["crop"] for r in rows], np.int32))

  def close(self) -> None:
    super().close()
    self._pool.shutdown(wait=True)
