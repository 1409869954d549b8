r"""Encoder-output cache: the frozen text encoder and VAE run over a dataset once.

Written by `python -m charred.cache_encoder` (its docstring has the flags and where the
model comes from); read by training with `experiment.DataConfig.encoder_cache = 'DIR'`
(the text encoder must be frozen).

Layout of DIR:
  <split>-00000.array_record   records, `examples_per_shard` each (ArrayRecord:
  ...                          random access, so resuming costs nothing)
  empty_caption.msgpack        the empty caption's record: caption dropout's hidden states
  manifest.json                written last, atomically; names the model it was written
                               for (configs and sha256 of the parameters)

A record is a msgpack map: `key`, `caption` (str), `text_tokens` (uint16 [n], the n
tokens before padding, EOS included), `text_context` (bfloat16 [n, D]: the encoder's
hidden states at those positions; padding positions are masked out of cross-attention,
so they are not stored), and `latent_mean`, `latent_logvar` (float32 [h, w, z], the
VAE's unscaled posterior) or, in pixel space, `image` (uint8 [H, W, 3]). Latents stay
float32: they are ~6x smaller than the hidden states (SD's 64x64x4 per moment against
ByT5-Base's 256 x 1536 at most), and bfloat16's 3 significant digits would move an SD
latent mean (|x| up to ~30) by more than the posterior's own standard deviation.

A bucketed cache (`write_bucketed_cache`, `cache_encoder --shards=DIR`) holds prepared JPEG
XL shards, each record decoded to its aspect bucket's size as `bucketing.BucketedBatches`
decodes it: records as above at their bucket's text length, plus `language`, `bucket`,
`original_size`, `crop` (and `latent_shape`); `index.npy` gives each record's shard
record number, bucket and file position, in shard order; the manifest (`layout:
'bucketed'`) the BucketConfig and the source shards' sha256. `BucketedEncoderCache.batches`
reads it in the bucketed reader's plan, with its checkpointable state.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np

from charred import tokenizer
from charred.datasets import bucketing
from charred.datasets import jxl_shards
from charred.datasets import streams
from charred.models.image_codec import LatentCodec
from charred.models.pretrained import InitConfig, load_checkpoints
from charred.models.text_to_image import TextToImage, TextToImageConfig, init_params

MANIFEST = 'manifest.json'
EMPTY_CAPTION = 'empty_caption.msgpack'
FORMAT_VERSION = 1
# Random access needs one record per chunk; bfloat16 activations hardly compress.
ARRAY_RECORD_OPTIONS = 'group_size:1,uncompressed'
BFLOAT16 = ml_dtypes.bfloat16

# Bad examples are skipped and counted by reason (the manifest's `skipped`).
SkipExample = jxl_shards.SkipExample


# The model a cache is written for.


def params_sha256(params) -> str:
  """sha256 over every parameter's name, dtype, shape and bytes."""
  digest = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, value in sorted((jax.tree_util.keystr(p), v) for p, v in flat):
    value = np.ascontiguousarray(np.asarray(value))
    digest.update(f'{path}:{value.dtype.str}:{value.shape};'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _jsonable(value):
  """A config (with tuples and dtypes) as the JSON a manifest holds."""
  def default(x):
    try:
      return np.dtype(x).name
    except TypeError:
      return str(x)
  return json.loads(json.dumps(value, default=default))


def model_fingerprint(model_config: TextToImageConfig, text_encoder_params, codec
                      ) -> dict[str, Any]:
  """What the cached features depend on: text length, image size, the text encoder's
  config and parameters, the codec's (identity, or a VAE's config and parameters)."""
  if isinstance(codec, LatentCodec):
    codec_print = dict(kind='latent', config=dataclasses.asdict(codec.config),
                       params_sha256=params_sha256(codec.params))
  else:
    codec_print = dict(kind='pixels')
  return _jsonable(dict(
      text_length=model_config.text_length, image_size=model_config.image_size,
      text_encoder=dict(config=dataclasses.asdict(model_config.text_encoder),
                        params_sha256=params_sha256(text_encoder_params)),
      codec=codec_print))


def initial_text_encoder_params(model_config: TextToImageConfig, seed: int, codec,
                                init: InitConfig | None = None):
  """The text encoder a run of `model_config` starts from, and keeps when frozen:
  `init.text_encoder`, or the random init `TrainConfig.seed` gives."""
  random = lambda: init_params(TextToImage(model_config), jax.random.PRNGKey(seed),
                               codec)['text_encoder']
  if init is None or not init.text_encoder:
    return jax.jit(random)()
  only_encoder = InitConfig(text_encoder=init.text_encoder)
  return load_checkpoints(only_encoder, {'text_encoder': jax.eval_shape(random)})['text_encoder']


# Writing.


def _prepare_example(example: dict[str, Any], index: int, text_length: int,
                     image_size: tuple[int, int]) -> dict[str, Any]:
  """Checks one input example; raises SkipExample (bad data) or ValueError (data that
  does not fit the model: every example would fail)."""
  key = (jxl_shards.decode_text(example['key'], jxl_shards.MISSING_KEY) if 'key' in example
         else f'#{index}')
  caption = jxl_shards.decode_text(example.get('caption', ''), jxl_shards.INVALID_CAPTION)
  image = np.asarray(example['image'])
  if image.size == 0:
    raise SkipExample(jxl_shards.EMPTY_IMAGE)
  if image.dtype != np.uint8 or image.shape != (*image_size, 3):
    raise ValueError(f'example {key}: image {image.dtype} {image.shape}, the model needs '
                     f'uint8 {(*image_size, 3)} (resize the data first).')
  tokens = np.asarray(example['text_tokens'])
  n = int(np.count_nonzero(tokens))
  if tokens.shape != (text_length,) or np.any(tokens[:n] == 0):
    raise ValueError(f'example {key}: text_tokens {tokens.shape} are not {text_length} '
                     'tokens padded with zeros at the end.')
  return dict(key=key, caption=caption, image=image, text_tokens=tokens.astype(np.int32))


def _encode_fn(model_config: TextToImageConfig, codec):
  """jit: (text encoder params, VAE params, tokens, mask, images uint8) -> outputs."""
  model = TextToImage(model_config)

  def encode(encoder_params, vae_params, tokens, mask, images):
    out = {'text_context': model.apply({'params': {'text_encoder': encoder_params}}, tokens,
                                       mask, method=TextToImage.encode_text)}
    if isinstance(codec, LatentCodec):
      x = images.astype(jnp.float32) / 127.5 - 1.0  # as the input pipeline does
      out['latent_mean'], out['latent_logvar'] = LatentCodec(
          codec.config, vae_params).encode_distribution(x)
    return out

  return jax.jit(encode)


def serialize_record(record: dict[str, Any]) -> bytes:
  return msgpack.packb(record, use_bin_type=True)


def _make_record(example, outputs, i: int, text_only: bool = False) -> bytes:
  n = int(np.count_nonzero(example['text_tokens']))
  record = dict(key=example['key'], caption=example['caption'],
                text_tokens=example['text_tokens'][:n].astype('<u2').tobytes(),
                text_context=np.asarray(outputs['text_context'][i, :n], BFLOAT16).tobytes())
  if text_only:
    pass
  elif 'latent_mean' in outputs:
    for name in ('latent_mean', 'latent_logvar'):
      record[name] = np.asarray(outputs[name][i], '<f4').tobytes()
  else:
    record['image'] = example['image'].tobytes()
  return serialize_record(record)


class _RecordShards:
  """Appends records to `<split>-NNNNN.array_record` files of `examples_per_shard` each;
  `close()` returns their manifest entries (path, num_records, num_bytes, sha256)."""

  def __init__(self, out_dir: str, split: str, examples_per_shard: int,
               log: Callable[[str], None] | None = None):
    self._out_dir, self._split, self._log = out_dir, split, log
    self._per_shard = examples_per_shard
    self.shards, self.num_records = [], 0
    self._writer, self._in_shard = None, 0

  def write(self, data: bytes) -> int:
    """Writes one record; returns its position over all shards."""
    if self._writer is None:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      self.shards.append(dict(path=jxl_shards.shard_name(self._split, len(self.shards),
                                                         'array_record')))
      self._writer = array_record_module.ArrayRecordWriter(
          os.path.join(self._out_dir, self.shards[-1]['path']), ARRAY_RECORD_OPTIONS)
      self._in_shard = 0
    self._writer.write(data)
    self._in_shard += 1
    self.num_records += 1
    if self._in_shard == self._per_shard:
      self._close_shard()
    return self.num_records - 1

  def _close_shard(self) -> None:
    self._writer.close()
    self._writer = None
    shard = self.shards[-1]
    path = os.path.join(self._out_dir, shard['path'])
    shard.update(num_records=self._in_shard, num_bytes=os.path.getsize(path),
                 sha256=jxl_shards.sha256_file(path))
    if self._log:
      self._log(f"  {shard['path']}: {self._in_shard} records, {shard['num_bytes']:,} bytes")

  def close(self) -> list[dict[str, Any]]:
    if self._writer is not None:
      self._close_shard()
    return self.shards


def write_cache(examples: Iterable[dict[str, Any]], out_dir: str,
                model_config: TextToImageConfig, text_encoder_params, codec, *,
                split: str = 'train', source: dict[str, Any] | None = None,
                examples_per_shard: int = 1000, batch_size: int = 32,
                overwrite: bool = False, log: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
  """Encodes `examples` into `out_dir` (see the module doc); returns the manifest.

  `examples`: dicts with `image` (uint8 [H, W, 3] of the model's image size),
  `text_tokens` (int [text_length], zero-padded), `caption` and optionally `key`.
  Examples keep their order; bad ones (an empty image, a caption that is not UTF-8) are
  skipped and counted. `text_encoder_params`: the frozen encoder's (`text_encoder/...`).
  """
  if examples_per_shard < 1 or batch_size < 1:
    raise ValueError(f'examples_per_shard ({examples_per_shard}) and batch_size '
                     f'({batch_size}) must be >= 1.')
  length, size = model_config.text_length, tuple(model_config.image_size)
  encode = _encode_fn(model_config, codec)
  vae_params = codec.params if isinstance(codec, LatentCodec) else {}
  fingerprint = model_fingerprint(model_config, text_encoder_params, codec)
  jxl_shards.prepare_output_dir(out_dir, overwrite)

  def encode_batch(batch):
    """Outputs for `batch`, padded to batch_size with its last example (one shape,
    one compilation)."""
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    tokens = np.stack([e['text_tokens'] for e in padded])
    return jax.device_get(encode(text_encoder_params, vae_params, tokens,
                                 (tokens != 0).astype(np.int32),
                                 np.stack([e['image'] for e in padded])))

  writer = _RecordShards(out_dir, split, examples_per_shard, log)
  skipped, num_read = collections.Counter(), 0

  def write(batch):
    outputs = encode_batch(batch)
    for i, example in enumerate(batch):
      writer.write(_make_record(example, outputs, i))

  batch = []
  for index, example in enumerate(examples):
    num_read += 1
    try:
      batch.append(_prepare_example(example, index, length, size))
    except SkipExample as e:
      skipped[e.reason] += 1
      continue
    if len(batch) == batch_size:
      write(batch)
      batch = []
  if batch:
    write(batch)
  shards = writer.close()
  empty_tokens = tokenizer.encode_batch([''], length)[0][0]
  empty = dict(key='', caption='', text_tokens=empty_tokens,
               image=np.zeros((*size, 3), np.uint8))
  with open(os.path.join(out_dir, EMPTY_CAPTION), 'wb') as f:
    f.write(_make_record(empty, encode_batch([empty]), 0, text_only=True))
  manifest = dict(
      format_version=FORMAT_VERSION,
      record_format='array_record',
      record_encoding='msgpack map: key, caption (str); text_tokens (uint16 [n]); '
                      'text_context (bfloat16 [n, D]); latent_mean, latent_logvar '
                      '(float32 [h, w, z]) or image (uint8 [H, W, 3])',
      model=fingerprint,
      text_width=int(model_config.text_encoder.d_model),
      latent_shape=(list(model_config.diffusion_shape(codec))
                    if isinstance(codec, LatentCodec) else None),
      empty_caption=EMPTY_CAPTION,
      source=dict(source or {}, split=split),
      shards=shards,
      num_records=sum(s['num_records'] for s in shards),
      num_examples_read=num_read,
      skipped=dict(sorted(skipped.items())),
      total_bytes=sum(s['num_bytes'] for s in shards),
      created=datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
  )
  jxl_shards.write_json_atomically(os.path.join(out_dir, MANIFEST), manifest)
  return manifest


def task_examples(task_name: str, split: str, text_length: int) -> Iterator[dict[str, Any]]:
  """A SeqIO task's examples in order, tokens padded to `text_length` (TensorFlow)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import tasks  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset({tasks.TOKENS_KEY: text_length}, split=split, shuffle=False,
                        num_epochs=1)
  ds = seqio.utils.trim_and_pad_dataset(ds, {tasks.TOKENS_KEY: text_length})
  yield from tfds.as_numpy(ds)


# Reading.


def read_manifest(cache_dir: str, layout: str | None) -> dict[str, Any]:
  """The manifest of a finished cache of `layout` (None: fixed-size, `write_cache`;
  'bucketed': `write_bucketed_cache`); one-line errors for anything else."""
  path = os.path.join(cache_dir, MANIFEST)
  if not os.path.isdir(cache_dir):
    raise FileNotFoundError(f'{cache_dir} is not a folder.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{cache_dir} has no {MANIFEST}: not a finished encoder cache '
                            '(still being written, or failed).')
  with open(path) as f:
    manifest = json.load(f)
  if 'model' not in manifest:  # e.g. the JPEG XL shards a bucketed cache is written from
    raise ValueError(f'{cache_dir} is not an encoder cache (python -m charred.cache_encoder '
                     'writes one).')
  if manifest.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{path}: format_version {manifest.get("format_version")} is not '
                     f'{FORMAT_VERSION}.')
  if manifest.get('layout') != layout:
    raise ValueError(f'{cache_dir} is a {manifest.get("layout") or "fixed-size"} encoder '
                     f'cache, not a {layout or "fixed-size"} one.')
  return manifest


def open_cache(cache_dir: str) -> EncoderCache | BucketedEncoderCache:
  """The cache at `cache_dir`, of either layout."""
  path = os.path.join(cache_dir, MANIFEST)
  layout = None
  if os.path.exists(path):
    with open(path) as f:
      layout = json.load(f).get('layout')
  return BucketedEncoderCache(cache_dir) if layout == BUCKETED else EncoderCache(cache_dir)


def _check_frozen(objective, train_config) -> None:
  """An encoder cache needs a frozen text encoder and images encoded before the step."""
  if objective.train_text_encoder:
    raise ValueError('An encoder cache needs ObjectiveConfig.train_text_encoder=False: it '
                     'holds a frozen text encoder\'s outputs.')
  if train_config.text_encoder_on_host:
    raise ValueError('An encoder cache replaces TrainConfig.text_encoder_on_host; set it '
                     'to False.')
  if objective.device_preprocess is not None:
    raise ValueError('An encoder cache holds encoded images: '
                     'ObjectiveConfig.device_preprocess must be None.')


_MODEL_PARTS = dict(text_length='text length', image_size='image size',
                    text_encoder='text encoder', codec='image codec (VAE)')


def _check_fingerprint(cache_dir: str, got: dict[str, Any], want: dict[str, Any],
                       keys: Sequence[str], rewrite: str) -> None:
  for key in keys:
    if got.get(key) != want[key]:
      detail = ''
      if isinstance(want[key], dict):
        differ = sorted(k for k in set(got[key]) | set(want[key])
                        if got[key].get(k) != want[key].get(k))
        detail = f' (differs in {", ".join(differ)})'
      raise ValueError(f'{cache_dir} was written for another {_MODEL_PARTS[key]}{detail}: '
                       f'rewrite it with {rewrite}.')


class EncoderCache:
  """A finished cache (`write_cache`): random access, numpy batches, model checks.

  Attributes:
    manifest: the parsed manifest.json.
    text_length: tokens per caption, padded.
    empty_context: float32 [text_length, D], the empty caption's hidden states (what
      caption dropout substitutes; `DiffusionModel`'s `empty_context`).
  """

  def __init__(self, cache_dir: str):
    self.cache_dir = cache_dir
    self.manifest = read_manifest(cache_dir, layout=None)
    self.text_length = self.manifest['model']['text_length']
    self._width = self.manifest['text_width']
    self._latent_shape = self.manifest['latent_shape']
    shards = self.manifest['shards']
    jxl_shards.check_shard_sizes(cache_dir, shards)
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self._source = array_record_data_source.ArrayRecordDataSource(
        [os.path.join(cache_dir, s['path']) for s in shards]) if shards else None
    with open(os.path.join(cache_dir, self.manifest['empty_caption']), 'rb') as f:
      self.empty_context = self._parse(f.read())['text_context']

  def __len__(self) -> int:
    return self.manifest['num_records']

  def _parse(self, data: bytes) -> dict[str, Any]:
    record = msgpack.unpackb(data, raw=False)
    tokens = np.frombuffer(record['text_tokens'], '<u2').astype(np.int32)
    n = len(tokens)
    context = np.zeros((self.text_length, self._width), np.float32)
    context[:n] = np.frombuffer(record['text_context'], BFLOAT16).reshape(n, self._width)
    out = dict(key=record['key'], caption=record['caption'], text_context=context,
               text_tokens=np.pad(tokens, (0, self.text_length - n)),
               text_mask=(np.arange(self.text_length) < n).astype(np.int32))
    if 'latent_mean' in record:
      for name in ('latent_mean', 'latent_logvar'):
        out[name] = np.frombuffer(record[name], '<f4').reshape(self._latent_shape)
    elif 'image' in record:
      h, w = self.manifest['model']['image_size']
      image = np.frombuffer(record['image'], np.uint8).reshape(h, w, 3)
      out['image'] = image.astype(np.float32) / 127.5 - 1.0  # as the input pipeline does
    return out

  def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Records `indices` as one batch: text_context float32 [B, L, D]; text_tokens,
    text_mask int32 [B, L]; latent_mean, latent_logvar float32 [B, h, w, z] (or image
    float32 [B, H, W, 3] in [-1, 1]); key, caption str [B]."""
    indices = [int(i) for i in indices]
    for i in indices:
      if not 0 <= i < len(self):
        raise IndexError(f'record {i} is not in [0, {len(self)}).')
    if len(indices) == 1:  # __getitems__ starts a thread pool per call
      data = [self._source[indices[0]]]
    else:
      data = list(self._source.__getitems__(indices))
    records = [self._parse(d) for d in data]
    return {k: np.stack([r[k] for r in records]) for k in records[0]}

  def order(self, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """Record numbers in the order epoch `epoch` visits them."""
    if not shuffle:
      return np.arange(len(self))
    return np.random.default_rng([seed, epoch]).permutation(len(self))

  def batches(self, batch_size: int, start_batch: int = 0, seed: int = 0,
              shuffle: bool = True, repeat: bool = True, shard_index: int = 0,
              shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches (see `read`) in the manner of `pipeline.make_iterator`: the stream is
    epochs 0, 1, ... (each a pass in `order(epoch)`) cut into global batches of
    `batch_size * shard_count` rows, of which shard i yields rows [i * batch_size,
    (i + 1) * batch_size) (`streams.epoch_batches`). Starting at `start_batch=k` yields
    exactly what the stream from 0 yields after k batches, reading nothing before it;
    Grain's iterator checkpoints with `get_state()` / `set_state()`. Without `repeat`, one
    epoch and no incomplete last batch."""
    dataset = streams.epoch_batches(len(self), lambda epoch: self.order(epoch, seed, shuffle),
                                    batch_size, lambda positions, indices: self.read(indices),
                                    repeat=repeat, shard_index=shard_index,
                                    shard_count=shard_count, name=self.cache_dir)
    return streams.iterate(dataset, start_batch)

  def check_model(self, model_config: TextToImageConfig, objective, train_config,
                  text_encoder_params, codec) -> None:
    """Raises ValueError unless the cache holds what the model (`objective`, a
    DiffusionModel's ObjectiveConfig) would compute with this text encoder and codec: the
    encoder must be frozen, and text length, image size and both models' configs and
    parameters must be the ones the cache was written with."""
    _check_frozen(objective, train_config)
    _check_fingerprint(self.cache_dir, self.manifest['model'],
                       model_fingerprint(model_config, text_encoder_params, codec),
                       list(_MODEL_PARTS), 'python -m charred.cache_encoder')

  def close(self) -> None:
    if self._source is not None:
      self._source.__exit__(None, None, None)


# Bucketed caches: prepared JPEG XL shards, each record at its aspect bucket's size.


BUCKETED = 'bucketed'
INDEX = 'index.npy'
# Cache record j (in shard record order): its shard record number, its bucket, and where
# it lies in the ArrayRecord files (written bucket by bucket: one encoder shape at a time).
INDEX_DTYPE = np.dtype([('source', '<i8'), ('bucket', '<i4'), ('position', '<i8')])


def _refuse_existing(out_dir: str, overwrite: bool) -> None:
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and (
      not overwrite):
    raise FileExistsError(f'{out_dir} exists and is not empty; pass --overwrite to replace it.')


def _replace_dir(tmp: str, out_dir: str) -> None:
  """Moves the finished `tmp` to `out_dir`; an old `out_dir` is removed only after."""
  old = f'{out_dir}.old-{os.getpid()}'
  if os.path.lexists(out_dir):
    os.replace(out_dir, old)
  os.replace(tmp, out_dir)
  if os.path.isdir(old):
    shutil.rmtree(old)
  elif os.path.lexists(old):
    os.remove(old)


def _text_encode_fn(model_config: TextToImageConfig):
  model = TextToImage(model_config)
  return jax.jit(lambda params, tokens, mask: model.apply(
      {'params': {'text_encoder': params}}, tokens, mask, method=TextToImage.encode_text))


def _bucketed_record(record: dict[str, Any], bucket: int, tokens: np.ndarray, outputs,
                     i: int, image: np.ndarray) -> bytes:
  n = int(np.count_nonzero(tokens))
  out = dict(key=record['key'], caption=record['caption'],
             language=record.get('language', ''), bucket=int(bucket),
             original_size=[int(x) for x in record['original_size']],
             crop=[int(x) for x in record['crop']],
             text_tokens=tokens[:n].astype('<u2').tobytes(),
             text_context=np.asarray(outputs['text_context'][i, :n], BFLOAT16).tobytes())
  if 'latent_mean' in outputs:
    out['latent_shape'] = list(outputs['latent_mean'].shape[1:])
    for name in ('latent_mean', 'latent_logvar'):
      out[name] = np.asarray(outputs[name][i], '<f4').tobytes()
  else:
    out['image'] = image.tobytes()
  return serialize_record(out)


def write_bucketed_cache(shards_dir: str, out_dir: str, model_config: TextToImageConfig,
                         text_encoder_params, codec, *, buckets: bucketing.BucketConfig,
                         resample: str = 'bicubic', examples_per_shard: int = 1000,
                         batch_size: int = 32, overwrite: bool = False,
                         num_threads: int | None = None,
                         log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Encodes every record of the prepared JPEG XL shards in `shards_dir` at its bucket's
  size (`bucketing.decode_to_bucket`: the bucketed reader's centre crop) into `out_dir`;
  returns the manifest.

  Records keep the shards' order (`index.npy` maps each to its shard record, bucket and
  file position); records that do not decode are skipped and counted. The manifest names
  the buckets, the model (`model_fingerprint`) and the sha256 of every source file. The
  cache is written into a temporary folder renamed to `out_dir` when complete, so an
  error leaves nothing and an old `out_dir` (with `overwrite`) intact until then.
  """
  if examples_per_shard < 1 or batch_size < 1:
    raise ValueError(f'examples_per_shard ({examples_per_shard}) and batch_size '
                     f'({batch_size}) must be >= 1.')
  buckets.check_text_length(model_config.text_length)
  factor = codec.downsample_factor
  uneven = [s for s in buckets.sizes() if s[0] % factor or s[1] % factor]
  if uneven:
    raise ValueError(f'bucket sizes {uneven} are not multiples of the codec\'s '
                     f'downsampling {factor}.')
  _refuse_existing(out_dir, overwrite)
  shards = jxl_shards.JxlShards(shards_dir, verify=True)  # the sha256 the manifest records
  if len(shards) == 0:
    raise ValueError(f'{shards_dir} holds no records.')
  bucket_of = bucketing.bucket_numbers(shards.index, buckets)
  fingerprint = model_fingerprint(model_config, text_encoder_params, codec)
  tmp = f'{os.path.normpath(out_dir)}.tmp-{os.getpid()}'
  if os.path.lexists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    manifest = _write_buckets(shards, bucket_of, tmp, model_config, text_encoder_params,
                              codec, buckets, resample, examples_per_shard, batch_size,
                              num_threads, log)
    source_manifest = os.path.join(shards_dir, jxl_shards.MANIFEST)
    manifest = dict(
        format_version=FORMAT_VERSION,
        layout=BUCKETED,
        record_format='array_record',
        record_encoding='msgpack map: key, caption, language (str); bucket (int); '
                        'original_size, crop ([2] int); text_tokens (uint16 [n]); '
                        'text_context (bfloat16 [n, D]); latent_mean, latent_logvar '
                        '(float32 latent_shape) or image (uint8 [H, W, 3] of the bucket)',
        model=fingerprint,
        text_width=int(model_config.text_encoder.d_model),
        buckets=_jsonable(dataclasses.asdict(buckets)),
        resample=resample,
        empty_caption=EMPTY_CAPTION,
        source=dict(shards_dir=os.path.abspath(shards_dir),
                    manifest_sha256=jxl_shards.sha256_file(source_manifest),
                    shards=[{k: s[k] for k in ('path', 'sha256', 'index', 'index_sha256')}
                            for s in shards.manifest['shards']]),
        **manifest,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'))
    jxl_shards.write_json_atomically(os.path.join(tmp, MANIFEST), manifest)
    _replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    shards.close()
  return manifest


def _write_buckets(shards, bucket_of, out_dir, model_config, text_encoder_params, codec,
                   buckets, resample, examples_per_shard, batch_size, num_threads, log
                   ) -> dict[str, Any]:
  """The records, index and empty caption of `write_bucketed_cache`; its manifest's counts."""
  encode = _encode_fn(model_config, codec)
  vae_params = codec.params if isinstance(codec, LatentCodec) else {}
  writer = _RecordShards(out_dir, 'train', examples_per_shard, log)
  skipped, rows = collections.Counter(), []

  def decode(record: int, size):
    try:
      return bucketing.decode_to_bucket(shards.read_bytes([record])[0], size, None, resample)
    except Exception:  # damaged: skipped and counted  # pylint: disable=broad-except
      return None

  with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
    for bucket in np.unique(bucket_of):
      height, width, length = bucketing.bucket_shape(buckets, int(bucket))
      records = np.flatnonzero(bucket_of == bucket)
      for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        decoded = list(pool.map(lambda r: decode(int(r), (width, height)), chunk))
        skipped[jxl_shards.CORRUPT_IMAGE] += sum(d is None for d in decoded)
        good = [(int(r), d) for r, d in zip(chunk, decoded) if d is not None]
        if not good:
          continue
        tokens, mask = tokenizer.encode_batch([d[0]['caption'] for _, d in good], length)
        images = np.stack([d[1] for _, d in good])
        pad = batch_size - len(good)  # one shape per bucket, one compilation
        outputs = jax.device_get(encode(
            text_encoder_params, vae_params, np.pad(tokens, ((0, pad), (0, 0)), mode='edge'),
            np.pad(mask, ((0, pad), (0, 0)), mode='edge'),
            np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)), mode='edge')))
        for i, (r, (record, image)) in enumerate(good):
          position = writer.write(_bucketed_record(record, bucket, tokens[i], outputs, i, image))
          rows.append((r, int(bucket), position))
  shard_entries = writer.close()
  index = np.array(sorted(rows), INDEX_DTYPE)
  np.save(os.path.join(out_dir, INDEX), index)
  longest = max(buckets.text_lengths)
  empty_tokens, empty_mask = tokenizer.encode_batch([''], longest)
  context = jax.device_get(_text_encode_fn(model_config)(text_encoder_params, empty_tokens,
                                                          empty_mask))
  n = int(empty_mask.sum())
  with open(os.path.join(out_dir, EMPTY_CAPTION), 'wb') as f:
    f.write(serialize_record(dict(key='', caption='',
                                  text_tokens=empty_tokens[0, :n].astype('<u2').tobytes(),
                                  text_context=np.asarray(context[0, :n], BFLOAT16).tobytes())))
  return dict(
      index=INDEX, index_sha256=jxl_shards.sha256_file(os.path.join(out_dir, INDEX)),
      shards=shard_entries,
      num_records=len(index),
      num_source_records=len(bucket_of),
      skipped=dict(sorted((k, v) for k, v in skipped.items() if v)),
      bucket_counts=np.bincount(index['bucket'],
                                minlength=bucketing.num_buckets(buckets)).tolist(),
      total_bytes=sum(s['num_bytes'] for s in shard_entries))


def _bucket_config(value: dict[str, Any]) -> bucketing.BucketConfig:
  return bucketing.BucketConfig(**dict(value, text_lengths=tuple(value['text_lengths'])))


class BucketedEncoderCache:
  """A finished bucketed cache (`write_bucketed_cache`): numpy batches of one bucket each,
  in the bucketed reader's plan, and model and bucket checks.

  Attributes:
    manifest: the parsed manifest.json.
    buckets: the BucketConfig it was written for.
    index: INDEX_DTYPE [num_records]: shard record, bucket and file position per record.
    empty_context: float32 [longest text length, D], the empty caption's hidden states
      (cut to a batch's text length by the model, `diffusion_model.fit_length`).
  """

  def __init__(self, cache_dir: str):
    self.cache_dir = cache_dir
    self.manifest = read_manifest(cache_dir, BUCKETED)
    self.buckets = _bucket_config(self.manifest['buckets'])
    self._width = self.manifest['text_width']
    self.index = np.load(os.path.join(cache_dir, self.manifest['index']))
    if len(self.index) != self.manifest['num_records']:
      raise ValueError(f'{cache_dir}/{self.manifest["index"]}: {len(self.index)} rows, the '
                       f'manifest says {self.manifest["num_records"]}.')
    shards = self.manifest['shards']
    jxl_shards.check_shard_sizes(cache_dir, shards)
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self._source = array_record_data_source.ArrayRecordDataSource(
        [os.path.join(cache_dir, s['path']) for s in shards]) if shards else None
    with open(os.path.join(cache_dir, self.manifest['empty_caption']), 'rb') as f:
      empty = self._parse(f.read(), max(self.buckets.text_lengths))
    self.empty_context = empty['text_context']

  def __len__(self) -> int:
    return len(self.index)

  def _parse(self, data: bytes, text_length: int) -> dict[str, Any]:
    record = msgpack.unpackb(data, raw=False)
    tokens = np.frombuffer(record['text_tokens'], '<u2').astype(np.int32)
    n = len(tokens)
    context = np.zeros((text_length, self._width), np.float32)
    context[:n] = np.frombuffer(record['text_context'], BFLOAT16).reshape(n, self._width)
    out = dict(key=record['key'], caption=record['caption'], text_context=context,
               text_tokens=np.pad(tokens, (0, text_length - n)),
               text_mask=(np.arange(text_length) < n).astype(np.int32))
    if 'latent_mean' in record:
      for name in ('latent_mean', 'latent_logvar'):
        out[name] = np.frombuffer(record[name], '<f4').reshape(record['latent_shape'])
    elif 'image' in record:
      height, width, _ = bucketing.bucket_shape(self.buckets, record['bucket'])
      image = np.frombuffer(record['image'], np.uint8).reshape(height, width, 3)
      # As BucketedBatches converts, to the bit.
      out['image'] = np.multiply(image, 2.0 / 255.0, dtype=np.float32) - 1.0
    if 'bucket' in record:
      out.update(language=record['language'], bucket=np.int32(record['bucket']),
                 original_size=np.asarray(record['original_size'], np.int32),
                 crop_top_left=np.asarray(record['crop'], np.int32))
    return out

  def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Records `indices` (of one bucket) as one batch, keys as BucketedBatches' with
    text_context float32 [B, L, D] and, in a latent space, latent_mean and latent_logvar
    float32 [B, h, w, z] instead of image."""
    indices = [int(i) for i in indices]
    for i in indices:
      if not 0 <= i < len(self):
        raise IndexError(f'record {i} is not in [0, {len(self)}).')
    found = set(self.index['bucket'][indices].tolist())
    if len(found) != 1:
      raise ValueError(f'records {indices} are in buckets {sorted(found)}, not one.')
    text_length = bucketing.bucket_shape(self.buckets, found.pop())[2]
    positions = [int(p) for p in self.index['position'][indices]]
    if len(positions) == 1:  # __getitems__ starts a thread pool per call
      data = [self._source[positions[0]]]
    else:
      data = list(self._source.__getitems__(positions))
    records = [self._parse(d, text_length) for d in data]
    return {k: np.stack([r[k] for r in records]) for k in records[0]}

  def batches(self, batch_size: int, *, seed: int = 0, shuffle: bool = True,
              repeat: bool = True, process_index: int | None = None,
              process_count: int | None = None, prefetch: int = 2,
              state: dict[str, Any] | None = None) -> bucketing.PlannedBatches:
    """This process's rows of the global batches `bucketing.BucketedBatches` plans over
    the same records (without skipped records, the same batches, and the same state)."""
    process_index, process_count = bucketing.check_process(process_index, process_count)
    global_batch_size = batch_size * process_count
    return bucketing.PlannedBatches(
        bucketing.plan(self.index['bucket'], global_batch_size, seed=seed, shuffle=shuffle,
                       repeat=repeat),
        lambda planned: self.read(bucketing.process_rows(planned, process_index, batch_size)),
        bucketing.state_fingerprint(len(self), self.buckets, global_batch_size, seed, shuffle),
        prefetch, state)

  def check_model(self, model_config: TextToImageConfig, objective, train_config,
                  text_encoder_params, codec, buckets: bucketing.BucketConfig) -> None:
    """Raises ValueError unless the cache holds what training `model_config` on `buckets`
    would compute: a frozen text encoder and the codec with the cache's configs and
    parameters, the same bucket sizes and text lengths, none longer than the model's."""
    _check_frozen(objective, train_config)
    rewrite = 'python -m charred.cache_encoder --shards=...'
    _check_fingerprint(self.cache_dir, self.manifest['model'],
                       model_fingerprint(model_config, text_encoder_params, codec),
                       ('text_encoder', 'codec'), rewrite)
    got = (self.buckets.sizes(), tuple(self.buckets.text_lengths))
    want = (buckets.sizes(), tuple(buckets.text_lengths))
    if got != want:
      what = 'bucket sizes' if got[0] != want[0] else 'text lengths'
      raise ValueError(f'{self.cache_dir} was written for other buckets ({what} differ from '
                       f'DataConfig.buckets): rewrite it with {rewrite}.')
    buckets.check_text_length(model_config.text_length)

  def close(self) -> None:
    if self._source is not None:
      self._source.__exit__(None, None, None)
