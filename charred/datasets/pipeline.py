"""Input pipeline: SeqIO typography task -> numpy batches for the TF-free trainer.

Batches are a pure function of (task, split, batch size, text length, seed,
shuffle, repeat): the stream started at `start_batch=k` equals the stream
started at 0 with its first k batches dropped, so a trainer resumes exactly
by checkpointing the iterator's state (`{'next_index': k}`) alone. Epochs are
built one at a time (rather than seqio's `num_epochs=None` followed by
`skip(k)`) so that resuming costs at most one epoch of reading, not all k
batches: skipping through seqio's preprocessing runs at only ~5k examples/s
on 2 CPU cores.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from charred.datasets import streams
from charred.datasets import tasks
from charred.datasets import typography

STRING_KEYS = ("caption", "text", "word", "frequency_bucket")


def prepare(builder_config: str | typography.TypographyConfig = "tiny",
            data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Generates `typography/<builder_config>` into `data_dir` unless already there."""
  if isinstance(builder_config, typography.TypographyConfig):
    builder = typography.Typography(config=builder_config, data_dir=data_dir)
  else:
    builder = tfds.builder(f"typography/{builder_config}", data_dir=data_dir)
  if not builder.is_prepared():
    print(f"Generating {builder.name}/{builder.builder_config.name} "
          f"into {builder.data_dir} ...", flush=True)
    builder.download_and_prepare()
  return builder


def _to_model_inputs(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  out = {k: batch[k] for k in STRING_KEYS if k in batch}
  out["image"] = tf.cast(batch["image"], tf.float32) / 127.5 - 1.0
  tokens = tf.cast(batch[tasks.TOKENS_KEY], tf.int32)
  out[tasks.TOKENS_KEY] = tokens
  out["text_mask"] = tf.cast(tokens != 0, tf.int32)  # 0 is PAD; EOS (1) counts.
  return out


def epoch_seed(seed: int, epoch: int) -> int:
  """Shuffle seed of one epoch: every epoch is shuffled differently."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def make_epoch_dataset(task_name: str, split: str, text_length: int, *, seed: int = 0,
                       epoch: int = 0, shuffle: bool = True,
                       shuffle_buffer_size: int = 8192) -> tf.data.Dataset:
  """One pass over `split`, unbatched, tokens padded to exactly `text_length`.

  Element shapes: image float32 [H, W, 3] in [-1, 1]; text_tokens and
  text_mask int32 [text_length]; string features tf.string [].
  """
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(
      sequence_length={tasks.TOKENS_KEY: text_length},
      split=split,
      shuffle=shuffle,
      shuffle_buffer_size=shuffle_buffer_size,
      seed=epoch_seed(seed, epoch),
      num_epochs=1,
  )
  # The tokens are EOS-terminated and trimmed already; pad them to text_length.
  ds = seqio.utils.trim_and_pad_dataset(ds, {tasks.TOKENS_KEY: text_length})
  ds = ds.map(_to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps and interleaves keep their order.
  return ds.with_options(options)


def _numpy_batches(ds: tf.data.Dataset, batch_size: int):
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  for batch in tfds.as_numpy(ds):
    for k in STRING_KEYS:
      if k in batch:
        batch[k] = np.char.decode(batch[k].astype(np.bytes_), "utf-8")
    yield batch


def _placeholders(element_spec, n: int) -> tf.data.Dataset:
  """`n` all-zero (or empty-string) elements matching `element_spec`."""
  zeros = {k: tf.zeros(spec.shape, spec.dtype) for k, spec in element_spec.items()}
  return tf.data.Dataset.from_tensors(zeros).repeat(n)


def _shard_rows(ds: tf.data.Dataset, first: int, global_batch: int, batch_size: int,
                shard_index: int) -> tf.data.Dataset:
  """The elements of `ds` (whose first element is number `first` of the whole stream)
  that fall in rows [shard_index * batch_size, (shard_index + 1) * batch_size) of their
  global batch."""
  keep = lambda i, _: (first + i) % global_batch // batch_size == shard_index
  return ds.enumerate().filter(keep).map(lambda _, x: x)


def make_iterator(task_name: str, split: str, batch_size: int, text_length: int,
                  seed: int = 0, start_batch: int = 0, shuffle: bool = True,
                  repeat: bool = True, data_dir: str | None = None,
                  shuffle_buffer_size: int = 8192, shard_index: int = 0,
                  shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """An iterator of numpy batches of `task_name`.

  Shapes: image float32 [B, H, W, 3] in [-1, 1]; text_tokens, text_mask int32
  [B, text_length] (mask is 1 on bytes and EOS); caption, text, word,
  frequency_bucket numpy str [B]. Incomplete final batches are dropped.

  The stream is the concatenation of epochs 0, 1, ... (each a pass over the
  split shuffled with `epoch_seed(seed, epoch)`), cut into batches. Batch k
  therefore starts in epoch (k * B) // N, so resuming at `start_batch=k` reads
  at most one epoch instead of all k batches, and yields exactly what the
  stream from 0 yields after its first k batches.

  Multi-host: with `shard_count` > 1 (one shard per host, see
  `partitioning.process_batch_shard`), the stream is cut into global batches of
  `batch_size * shard_count` rows, exactly as one host would cut it, and shard i yields
  rows [i * batch_size, (i + 1) * batch_size) of each. The shards' k-th batches,
  concatenated in shard order, are the single-host batch k; so the data of a step does
  not depend on the number of hosts, and `start_batch` (counted in global batches)
  resumes every shard exactly. Each host reads the whole stream and keeps its rows.

  The iterator checkpoints with `get_state()` / `set_state()` (Grain's protocol, state
  `{'next_index': k}`): restoring restarts the stream at batch k as `start_batch=k` does.

  `data_dir` is only used to register 'typography_<config>' tasks that are not
  registered yet; a registered task keeps its own data_dir.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count}).")
  if task_name not in seqio.TaskRegistry.names():
    prefix = "typography_"
    if not task_name.startswith(prefix):
      raise ValueError(f"Unknown SeqIO task {task_name!r}; register it first with "
                       "charred.datasets.tasks.register_typography_task.")
    tasks.register_typography_task(task_name, task_name[len(prefix):], data_dir)
  num_examples = seqio.get_mixture_or_task(task_name).num_input_examples(split)
  global_batch = batch_size * shard_count
  if not num_examples or num_examples < global_batch:
    raise ValueError(f"{task_name}:{split} has {num_examples} examples, fewer than "
                     f"one batch of {global_batch}.")
  return streams.RestartableIterator(functools.partial(
      _batches, task_name, split, batch_size, text_length, num_examples, seed=seed,
      shuffle=shuffle, repeat=repeat, shuffle_buffer_size=shuffle_buffer_size,
      shard_index=shard_index, shard_count=shard_count), start_batch)


def _batches(task_name: str, split: str, batch_size: int, text_length: int,
             num_examples: int, start_batch: int, *, seed: int, shuffle: bool, repeat: bool,
             shuffle_buffer_size: int, shard_index: int, shard_count: int):
  """`make_iterator`'s stream from batch `start_batch` on."""
  global_batch = batch_size * shard_count
  epoch, skip = divmod(start_batch * global_batch, num_examples)
  if not repeat and epoch > 0:
    return
  tail = None  # The previous epoch's last (incomplete) batch.
  while True:
    ds = make_epoch_dataset(task_name, split, text_length, seed=seed, epoch=epoch,
                            shuffle=shuffle, shuffle_buffer_size=shuffle_buffer_size)
    ds = ds.skip(skip)
    if not repeat:  # Drop the incomplete last global batch, on every shard alike.
      ds = ds.take(num_examples // global_batch * global_batch - skip)
    if shard_count > 1:
      ds = _shard_rows(ds, epoch * num_examples + skip, global_batch, batch_size, shard_index)
    num_tail = 0 if tail is None else len(tail["image"])
    if num_tail:
      # Keep batches aligned across the epoch boundary: placeholders take the
      # tail's rows in the first batch and are swapped for it below.
      ds = _placeholders(ds.element_spec, num_tail).concatenate(ds)
    for batch in _numpy_batches(ds, batch_size):
      if num_tail:
        batch = {k: np.concatenate([tail[k], v[num_tail:]]) for k, v in batch.items()}
        num_tail, tail = 0, None
      if len(batch["image"]) == batch_size:
        yield batch
      else:
        tail = batch
    if not repeat:
      return  # drop_remainder: the incomplete tail is not yielded.
    epoch, skip = epoch + 1, 0


def register_task(builder_config: str = "tiny", data_dir: str | None = None) -> str:
  """Registers the SeqIO task `typography_<builder_config>` over `data_dir`."""
  return tasks.register_typography_task(f"typography_{builder_config}", builder_config,
                                        data_dir)


def rendering_targets(builder_config: str = "tiny", split: str = "validation",
                      data_dir: str | None = None) -> list[dict[str, str]]:
  """Held-out prompts in split order: dicts with `prompt` (the caption), `text` (what
  the image must show, cased as rendered) and `bucket` (word frequency bucket)."""
  builder = tfds.builder(f"typography/{builder_config}", data_dir=data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return [{"prompt": ex["caption"].decode(), "text": ex["text"].decode(),
           "bucket": ex["frequency_bucket"].decode()} for ex in tfds.as_numpy(ds)]
