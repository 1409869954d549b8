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
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np

from charred import tokenizer
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

  shards, skipped = [], collections.Counter()
  writer, in_shard, num_read = None, 0, 0

  def close_shard():
    writer.close()
    path = os.path.join(out_dir, shards[-1]['path'])
    shards[-1].update(num_records=in_shard, num_bytes=os.path.getsize(path),
                      sha256=jxl_shards.sha256_file(path))
    if log:
      log(f"  {shards[-1]['path']}: {in_shard} records, {shards[-1]['num_bytes']:,} bytes")

  def write(batch):
    nonlocal writer, in_shard
    outputs = encode_batch(batch)
    for i, example in enumerate(batch):
      if writer is None:
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
        shards.append(dict(path=jxl_shards.shard_name(split, len(shards), 'array_record')))
        writer = array_record_module.ArrayRecordWriter(
            os.path.join(out_dir, shards[-1]['path']), ARRAY_RECORD_OPTIONS)
        in_shard = 0
      writer.write(_make_record(example, outputs, i))
      in_shard += 1
      if in_shard == examples_per_shard:
        close_shard()
        writer = None

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
  if writer is not None:
    close_shard()
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


class EncoderCache:
  """A finished cache (`write_cache`): random access, numpy batches, model checks.

  Attributes:
    manifest: the parsed manifest.json.
    text_length: tokens per caption, padded.
    empty_context: float32 [text_length, D], the empty caption's hidden states (what
      caption dropout substitutes; `trainer.train_step`'s `empty_context`).
  """

  def __init__(self, cache_dir: str):
    self.cache_dir = cache_dir
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.exists(path):
      raise FileNotFoundError(f'{cache_dir} has no {MANIFEST}: not a finished encoder cache '
                              '(still being written, or failed).')
    with open(path) as f:
      self.manifest = json.load(f)
    if self.manifest.get('format_version') != FORMAT_VERSION:
      raise ValueError(f'{path}: format_version {self.manifest.get("format_version")} is not '
                       f'{FORMAT_VERSION}.')
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
    if objective.train_text_encoder:
      raise ValueError('An encoder cache needs ObjectiveConfig.train_text_encoder=False: it '
                       'holds a frozen text encoder\'s outputs.')
    if train_config.text_encoder_on_host:
      raise ValueError('An encoder cache replaces TrainConfig.text_encoder_on_host; set it '
                       'to False.')
    if objective.device_preprocess is not None:
      raise ValueError('An encoder cache holds encoded images: '
                       'ObjectiveConfig.device_preprocess must be None.')
    want = model_fingerprint(model_config, text_encoder_params, codec)
    got = self.manifest['model']
    names = dict(text_length='text length', image_size='image size', text_encoder='text '
                 'encoder', codec='image codec (VAE)')
    for key, name in names.items():
      if got.get(key) != want[key]:
        detail = ''
        if isinstance(want[key], dict):
          differ = sorted(k for k in set(got[key]) | set(want[key])
                          if got[key].get(k) != want[key].get(k))
          detail = f' (differs in {", ".join(differ)})'
        raise ValueError(f'{self.cache_dir} was written for another {name}{detail}: '
                         'rewrite it with python -m charred.cache_encoder.')

  def close(self) -> None:
    if self._source is not None:
      self._source.__exit__(None, None, None)
