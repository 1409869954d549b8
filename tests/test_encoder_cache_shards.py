"""The bucketed encoder cache of JPEG XL shards: every record cached once at its bucket's
size, the same pixels and plan as the bucketed reader, the same loss, exact resume, and
refusals that leave nothing written."""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest

import photo_fixtures
import step_fixtures
from charred.datasets import bucketing, encoder_cache, jxl_shards
from charred.models.image_codec import PixelCodec
from charred.trainers import trainer
from test_encoder_cache import frozen_encoder_setup

# Sizes (w, h) (8, 32), (8, 24), (16, 16), (24, 8), (32, 8), all even (the fixture VAE
# halves them); captions of up to 7 bytes go to text length 8, longer ones to 16 (the
# model's text_length), so the cached empty caption (16) is cut for half the batches.
BUCKETS = bucketing.BucketConfig(base_resolution=16, step=8, min_side=8, max_side=32,
                                 text_lengths=(8, 16))
SHAPES = [(8, 16), (16, 8), (16, 16), (10, 30), (30, 10), (12, 14)]  # (h, w)
NUM_RECORDS = 30


def _write_shards(out_dir):
  examples = [dict(key=f'r{i:02d}', caption=('ab' if i % 4 else 'a longer caption ') + str(i),
                   image=photo_fixtures.photo(*SHAPES[i % len(SHAPES)], seed=i))
              for i in range(NUM_RECORDS)]
  jxl_shards.write_shards(examples, out_dir, settings=jxl_shards.JxlSettings(lossless=True),
                          examples_per_shard=8)


def _reader(shards, batch_size=4, **kwargs):
  kwargs = dict(dict(seed=3, num_threads=1, process_index=0, process_count=1), **kwargs)
  return bucketing.BucketedBatches(shards, batch_size, BUCKETS, **kwargs)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('bucketed_cache')
  shards = str(root / 'shards')
  _write_shards(shards)
  parts = frozen_encoder_setup()
  cache = str(root / 'cache')
  manifest = encoder_cache.write_bucketed_cache(
      shards, cache, parts['model_config'], parts['state'].params['text_encoder'],
      parts['codec'], buckets=BUCKETS, examples_per_shard=7, batch_size=4, num_threads=2)
  return dict(parts, shards=shards, cache=cache, manifest=manifest, root=root)


def test_every_record_is_cached_once_in_the_readers_bucket(setup):
  cache = encoder_cache.BucketedEncoderCache(setup['cache'])
  shards = jxl_shards.JxlShards(setup['shards'])
  np.testing.assert_array_equal(cache.index['source'], np.arange(NUM_RECORDS))
  np.testing.assert_array_equal(cache.index['bucket'],
                                bucketing.bucket_numbers(shards.index, BUCKETS))
  assert sorted(cache.index['position'].tolist()) == list(range(NUM_RECORDS))
  assert len(set(cache.index['bucket'].tolist())) >= 4  # several shapes and lengths
  for j in range(NUM_RECORDS):
    batch = cache.read([j])
    assert batch['key'][0] == shards.read([j])[0]['key']
    height, width, length = bucketing.bucket_shape(BUCKETS, int(cache.index['bucket'][j]))
    assert batch['latent_mean'].shape == (1, height // 2, width // 2, 4)
    assert batch['text_context'].shape == (1, length, 16)
  manifest = setup['manifest']
  assert manifest['num_records'] == manifest['num_source_records'] == NUM_RECORDS
  assert manifest['bucket_counts'] == np.bincount(cache.index['bucket'],
                                                  minlength=len(manifest['bucket_counts'])).tolist()
  assert encoder_cache._bucket_config(manifest['buckets']) == BUCKETS
  # The source shards' sha256, and the model fingerprint.
  assert [s['sha256'] for s in manifest['source']['shards']] == [
      jxl_shards.sha256_file(os.path.join(setup['shards'], s['path']))
      for s in shards.manifest['shards']]
  assert manifest['model'] == encoder_cache.model_fingerprint(
      setup['model_config'], setup['state'].params['text_encoder'], setup['codec'])
  with pytest.raises(ValueError, match='in buckets'):
    cache.read(range(NUM_RECORDS))


def test_cached_latents_and_pixels_are_what_the_reader_decodes(setup):
  """The cache's plan is the reader's (same keys, tokens, crops per batch), its latents the
  VAE's of the reader's images, and a pixel-space cache holds the reader's pixels."""
  cache = encoder_cache.BucketedEncoderCache(setup['cache'])
  pixels = str(setup['root'] / 'pixels')
  encoder_cache.write_bucketed_cache(
      setup['shards'], pixels, dataclasses.replace(setup['model_config'], pixel_space=True),
      setup['state'].params['text_encoder'], PixelCodec(), buckets=BUCKETS, batch_size=4)
  pixel_cache = encoder_cache.BucketedEncoderCache(pixels)
  reader, cached, cached_pixels = (_reader(setup['shards']), cache.batches(4, seed=3),
                                   pixel_cache.batches(4, seed=3))
  for _ in range(8):  # a whole epoch and more
    raw, got, got_pixels = next(reader), next(cached), next(cached_pixels)
    for k in ('key', 'caption', 'language', 'text_tokens', 'text_mask', 'bucket',
              'original_size', 'crop_top_left'):
      np.testing.assert_array_equal(got[k], raw[k], err_msg=k)
      np.testing.assert_array_equal(got_pixels[k], raw[k], err_msg=k)
    np.testing.assert_array_equal(got_pixels['image'], raw['image'])
    mean, logvar = setup['codec'].encode_distribution(raw['image'])
    np.testing.assert_allclose(got['latent_mean'], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got['latent_logvar'], logvar, rtol=1e-5, atol=1e-5)
    assert 'image' not in got
  assert cached.get_state() == reader.get_state()  # the same plan, the same state
  reader.close()


def test_loss_on_a_cached_batch_equals_the_readers(setup):
  s = setup
  cache = encoder_cache.BucketedEncoderCache(s['cache'])
  assert cache.empty_context.shape == (16, 16)
  reader, cached = _reader(s['shards']), cache.batches(4, seed=3)
  pairs = [(next(reader), next(cached)) for _ in range(6)]
  reader.close()
  # A batch of the short text length: the empty caption's states are cut to 8 tokens.
  raw, batch = next((r, c) for r, c in pairs if r['text_tokens'].shape[1] == 8)
  rng = next(jax.random.PRNGKey(k) for k in range(100) if 0 < np.asarray(
      s['model'].caption_drop_mask(jax.random.fold_in(jax.random.PRNGKey(k), 0), 0, 4)).sum() < 4)
  step = functools.partial(trainer.train_step, model=s['model'], config=s['config'],
                           tx=s['tx'])
  cached_step = functools.partial(trainer.train_step, config=s['config'], tx=s['tx'],
                                  model=s['model'].replace(empty_context=cache.empty_context))
  keys = ('text_tokens', 'text_mask', 'text_context', 'latent_mean', 'latent_logvar')
  cached_batch = {k: batch[k] for k in keys}
  raw_batch = {k: raw[k] for k in ('image', 'text_tokens', 'text_mask')}
  rotated = dict(cached_batch, text_context=np.roll(cached_batch['text_context'], 1, axis=0))
  raw_loss, cached_loss, wrong = step_fixtures.step_losses(s['state'], rng, [
      (step, raw_batch), (cached_step, cached_batch), (cached_step, rotated)])
  assert abs(cached_loss - raw_loss) < 2e-5 * raw_loss, (cached_loss, raw_loss)
  assert abs(wrong - raw_loss) > 1e-3 * raw_loss, (wrong, raw_loss)


def test_iterator_state_resumes_mid_epoch_and_rows_split_over_hosts(setup):
  cache = encoder_cache.BucketedEncoderCache(setup['cache'])
  take = lambda it, n: [next(it)['key'].tolist() for _ in range(n)]
  straight = take(cache.batches(2, seed=5), 20)
  for cut in (3, 7, 11):
    it = cache.batches(2, seed=5)
    take(it, cut)
    state = json.loads(json.dumps(it.get_state()))
    if cut == 3:  # mid-epoch, with partial buckets waiting
      assert state['epoch'] == 0 and state['pending'], state
    assert take(cache.batches(2, seed=5, state=state), 20 - cut) == straight[cut:]
    restored = cache.batches(2, seed=5)
    restored.set_state(state)
    assert take(restored, 3) == straight[cut:cut + 3]
  with pytest.raises(ValueError, match='state was saved with seed=5'):
    cache.batches(2, seed=6, state=state)
  # Process 1 of 2 reads rows 2..3 of every global batch of 4.
  whole = cache.batches(4, seed=5)
  mine = cache.batches(2, seed=5, process_index=1, process_count=2)
  for _ in range(4):
    assert next(mine)['key'].tolist() == next(whole)['key'].tolist()[2:]


def test_refusals_are_one_line_and_write_nothing(setup, tmp_path, monkeypatch):
  s = setup
  write = functools.partial(encoder_cache.write_bucketed_cache, model_config=s['model_config'],
                            text_encoder_params=s['state'].params['text_encoder'],
                            codec=s['codec'], buckets=BUCKETS, batch_size=4)
  out = str(tmp_path / 'out')
  for source, error, match in ((s['cache'], ValueError, 'is not a JPEG XL shard output'),
                               (str(tmp_path / 'missing'), FileNotFoundError, 'not a folder')):
    with pytest.raises(error, match=match) as e:
      write(source, out)
    assert '\n' not in str(e.value)
    assert not os.path.exists(out) and os.listdir(tmp_path) == []
  # A cache of the wrong kind, or not a cache at all.
  with pytest.raises(ValueError, match='is a bucketed encoder cache, not a fixed-size one'):
    encoder_cache.EncoderCache(s['cache'])
  with pytest.raises(ValueError, match='is not an encoder cache'):
    encoder_cache.BucketedEncoderCache(s['shards'])
  assert isinstance(encoder_cache.open_cache(s['cache']), encoder_cache.BucketedEncoderCache)
  # Other weights, other buckets.
  cache = encoder_cache.BucketedEncoderCache(s['cache'])
  params, objective = s['state'].params['text_encoder'], s['model'].objective
  check = functools.partial(cache.check_model, s['model_config'], objective, s['config'])
  check(params, s['codec'], BUCKETS)  # fine
  other = jax.tree_util.tree_map(lambda x: x * 1.001, params)
  with pytest.raises(ValueError, match=r'another text encoder \(differs in params_sha256\)'):
    check(other, s['codec'], BUCKETS)
  with pytest.raises(ValueError, match=r'other buckets \(text lengths differ'):
    check(params, s['codec'], dataclasses.replace(BUCKETS, text_lengths=(16,)))
  with pytest.raises(ValueError, match=r'other buckets \(bucket sizes differ'):
    check(params, s['codec'], dataclasses.replace(BUCKETS, step=16))
  with pytest.raises(ValueError, match='train_text_encoder=False'):
    cache.check_model(s['model_config'], dataclasses.replace(objective, train_text_encoder=True),
                      s['config'], params, s['codec'], BUCKETS)
  # An existing output is refused without overwrite; a failure half-way leaves an old one
  # whole, and no temporary folder.
  os.makedirs(out)
  (tmp_path / 'out' / 'old').write_text('kept')
  with pytest.raises(FileExistsError, match='--overwrite'):
    write(s['shards'], out)
  calls = []

  def failing(*args):
    calls.append(1)
    if len(calls) == 5:
      raise OSError('disk full')
    return real(*args)
  real = encoder_cache._bucketed_record
  monkeypatch.setattr(encoder_cache, '_bucketed_record', failing)
  with pytest.raises(OSError, match='disk full'):
    write(s['shards'], out, overwrite=True)
  assert os.listdir(tmp_path) == ['out'] and os.listdir(out) == ['old']
  monkeypatch.undo()
  write(s['shards'], out, overwrite=True)
  assert os.listdir(tmp_path) == ['out'] and 'old' not in os.listdir(out)
  assert len(encoder_cache.BucketedEncoderCache(out)) == NUM_RECORDS


def test_a_damaged_record_is_skipped_and_counted(setup, tmp_path):
  damaged = tmp_path / 'damaged'
  os.makedirs(damaged)
  # Rewrite shard 0 with record 1's image bytes cut short (the index still lists it).
  _write_shards(str(damaged / 'src'))
  source = jxl_shards.JxlShards(str(damaged / 'src'))
  records = source.read(range(NUM_RECORDS))
  records[1]['image'] = records[1]['image'][:20]
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  manifest = source.manifest
  shard = manifest['shards'][0]
  path = str(damaged / 'src' / shard['path'])
  writer = array_record_module.ArrayRecordWriter(path, jxl_shards.ARRAY_RECORD_OPTIONS)
  for r in records[:shard['num_records']]:
    writer.write(jxl_shards.serialize_record(r))
  writer.close()
  shard.update(num_bytes=os.path.getsize(path), sha256=jxl_shards.sha256_file(path))
  jxl_shards.write_json_atomically(str(damaged / 'src' / 'manifest.json'), manifest)
  s = setup
  out = encoder_cache.write_bucketed_cache(
      str(damaged / 'src'), str(damaged / 'cache'), s['model_config'],
      s['state'].params['text_encoder'], s['codec'], buckets=BUCKETS, batch_size=4)
  assert out['skipped'] == {'corrupt_image': 1} and out['num_records'] == NUM_RECORDS - 1
  cache = encoder_cache.BucketedEncoderCache(str(damaged / 'cache'))
  assert 1 not in cache.index['source'].tolist()
  assert len(cache.index) == NUM_RECORDS - 1
