"""The encoder-output cache: what it stores against the encoders run directly, exact
resume, refusals, and a train step on cached features against one on raw data."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

import photo_fixtures
import step_fixtures
from charred import tokenizer
from charred.datasets import encoder_cache
from charred.models import diffusion
from charred.models.diffusion_model import DiffusionModel, ObjectiveConfig
from charred.models.pretrained import make_codec
from charred.models.t5_encoder import T5EncoderConfig
from charred.models.text_to_image import TextToImage, TextToImageConfig
from charred.models.unet import UNetConfig
from charred.trainers import trainer

VAE_DIR = os.path.join(os.path.dirname(__file__), 'fixtures', 'diffusers_flax', 'vae')
CAPTIONS = ['A sign that says "a".', 'bc', 'ünïcödé €', '', 'x' * 40, 'word5', 'six', '7']


def latent_model():
  """A tiny latent model (compile time dominates): the fixture VAE (8x8x4 latents), one
  U-Net block; the text reaches the U-Net through its mid block's cross-attention."""
  return TextToImageConfig(
      text_encoder=T5EncoderConfig(d_model=16, num_heads=1, head_dim=16, num_layers=1, d_ff=32),
      unet=UNetConfig(in_channels=4, out_channels=4, block_out_channels=(8,),
                      down_block_types=('DownBlock2D',), up_block_types=('UpBlock2D',),
                      layers_per_block=1, attention_head_dim=(1,), cross_attention_dim=16,
                      norm_num_groups=4, upcast_attention=False),
      noise_schedule=diffusion.NoiseSchedule('scaled_linear'), prediction_type='epsilon',
      text_length=16, image_size=(16, 16), pixel_space=False)


def raw_examples():
  tokens, _ = tokenizer.encode_batch(CAPTIONS, 16)
  return [dict(image=photo_fixtures.photo(16, 16, seed=i), text_tokens=tokens[i],
               caption=c.encode(), key=f'ex{i}') for i, c in enumerate(CAPTIONS)]


def frozen_encoder_setup():
  """The latent model with a frozen text encoder (what a cache serves), its codec, a
  batch-4 TrainConfig, optimizer and random state, as a dict."""
  model_config = latent_model()
  codec = make_codec(False, VAE_DIR)
  config = trainer.TrainConfig(train_steps=1, batch_size=4)
  model = DiffusionModel(model_config, ObjectiveConfig(caption_dropout=0.5,
                                                       train_text_encoder=False), codec)
  tx = trainer.make_tx(config, model.frozen)
  state = step_fixtures.random_state(model, config, tx)
  return dict(model_config=model_config, model=model, codec=codec, config=config, tx=tx,
              state=state)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  parts = frozen_encoder_setup()
  out = str(tmp_path_factory.mktemp('cache') / 'train')
  manifest = encoder_cache.write_cache(raw_examples(), out, parts['model_config'],
                                       parts['state'].params['text_encoder'], parts['codec'],
                                       examples_per_shard=3, batch_size=4)
  return dict(parts, out=out, manifest=manifest)


def test_records_hold_the_encoders_outputs(setup):
  cache = encoder_cache.EncoderCache(setup['out'])
  assert len(cache) == len(CAPTIONS) == setup['manifest']['num_records']
  assert [s['num_records'] for s in setup['manifest']['shards']] == [3, 3, 2]
  batch = cache.read(range(len(CAPTIONS)))
  tokens, mask = tokenizer.encode_batch(CAPTIONS, 16)
  np.testing.assert_array_equal(batch['text_tokens'], tokens)
  np.testing.assert_array_equal(batch['text_mask'], mask)
  assert list(batch['caption']) == CAPTIONS and list(batch['key']) == [f'ex{i}' for i in range(8)]
  # The hidden states: the encoder's, rounded to bfloat16 (8 significant bits) where the
  # mask is 1, zeros on padding.
  params = setup['state'].params
  direct = np.asarray(setup['model'].module.apply({'params': params}, tokens, mask,
                                           method=TextToImage.encode_text))
  got = batch['text_context']
  assert got.dtype == np.float32 and got.shape == (8, 16, 16)
  on = mask.astype(bool)
  assert np.all(np.abs(got[on] - direct[on]) <= 2.0**-8 * np.abs(direct[on]))
  assert np.all(got[~on] == 0)
  # The latent posterior: the VAE's, in float32.
  images = np.stack([e['image'] for e in raw_examples()]).astype(np.float32) / 127.5 - 1
  mean, logvar = setup['codec'].encode_distribution(images)
  np.testing.assert_allclose(batch['latent_mean'], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batch['latent_logvar'], logvar, rtol=1e-5, atol=1e-5)
  # The empty caption, stored once.
  empty_tokens, empty_mask = tokenizer.encode_batch([''], 16)
  empty = np.asarray(setup['model'].module.apply({'params': params}, empty_tokens, empty_mask,
                                          method=TextToImage.encode_text))[0]
  np.testing.assert_allclose(cache.empty_context[0], empty[0], rtol=2.0**-8)
  assert np.all(cache.empty_context[1:] == 0)


def test_batches_resume_exactly_and_split_rows_over_hosts(setup):
  cache = encoder_cache.EncoderCache(setup['out'])
  take = lambda it, n: [b['key'] for _, b in zip(range(n), it)]
  stream = take(cache.batches(2, seed=1), 10)  # 20 rows: 2.5 epochs of 8
  for epoch in range(2):  # every epoch visits every record once, in its own order
    keys = np.concatenate(stream[4 * epoch:4 * epoch + 4])
    assert sorted(keys) == sorted(f'ex{i}' for i in range(8))
  assert not np.array_equal(np.concatenate(stream[:4]), np.concatenate(stream[4:8]))
  for k in (1, 3, 5):
    resumed = take(cache.batches(2, seed=1, start_batch=k), 10 - k)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, stream[k:]))
  # Two hosts of 1 row each: their k-th batches, in order, are the one-host batch k.
  shards = [take(cache.batches(1, seed=1, shard_index=i, shard_count=2), 10) for i in (0, 1)]
  assert all(np.array_equal(np.concatenate([a, b]), s)
             for a, b, s in zip(*shards, stream))
  # One epoch in order, the incomplete last batch dropped.
  assert [list(b) for b in take(cache.batches(3, shuffle=False, repeat=False), 9)] == [
      ['ex0', 'ex1', 'ex2'], ['ex3', 'ex4', 'ex5']]


def test_cached_and_raw_paths_give_the_same_loss(setup):
  """The issue's test: one train step on cached features and one on the raw batch, same
  state, same key (caption dropout included), give the same loss."""
  s = setup
  cache = encoder_cache.EncoderCache(s['out'])
  cached = cache.read(range(4))
  examples = raw_examples()[:4]
  raw = dict(image=np.stack([e['image'] for e in examples]).astype(np.float32) / 127.5 - 1,
             text_tokens=cached['text_tokens'], text_mask=cached['text_mask'])
  rng = jax.random.PRNGKey(2)
  dropped = np.asarray(s['model'].caption_drop_mask(jax.random.fold_in(rng, 0), 0, 4))
  assert 0 < dropped.sum() < 4, dropped  # both kinds of example in the batch
  # The posterior sample: what the codec draws from the images, with the same key.
  key = jax.random.PRNGKey(5)
  np.testing.assert_allclose(
      s['codec'].sample(cached['latent_mean'][:1], cached['latent_logvar'][:1], key),
      s['codec'].encode(raw['image'][:1], key), rtol=1e-4, atol=1e-5)

  step = functools.partial(trainer.train_step, model=s['model'], config=s['config'],
                           tx=s['tx'])
  cached_step = functools.partial(trainer.train_step, config=s['config'], tx=s['tx'],
                                  model=s['model'].replace(empty_context=cache.empty_context))
  keys = ('text_tokens', 'text_mask', 'text_context', 'latent_mean', 'latent_logvar')
  batch = {k: cached[k] for k in keys}
  rotated = dict(batch, text_context=np.roll(batch['text_context'], 1, axis=0))
  raw_loss, cached_loss, wrong, no_dropout = step_fixtures.step_losses(s['state'], rng, [
      (step, raw), (cached_step, batch), (cached_step, rotated), (step, batch)])
  # Measured: bfloat16 hidden states move the loss by 4e-6 relative; feeding captions to
  # the wrong examples (rotated) by 4e-3; skipping the empty caption's selection by 3.5%.
  assert abs(cached_loss - raw_loss) < 2e-5 * raw_loss, (cached_loss, raw_loss)
  assert abs(wrong - raw_loss) > 1e-3 * raw_loss, (wrong, raw_loss)
  assert abs(no_dropout - raw_loss) > 1e-3 * raw_loss, (no_dropout, raw_loss)


def test_another_text_encoder_or_vae_is_refused(setup, tmp_path):
  s = setup
  cache = encoder_cache.EncoderCache(s['out'])
  params = s['state'].params['text_encoder']
  objective = s['model'].objective
  cache.check_model(s['model_config'], objective, s['config'], params, s['codec'])  # fine
  other = jax.tree_util.tree_map(lambda x: x * 1.001, params)
  with pytest.raises(ValueError, match=r'another text encoder \(differs in params_sha256\)'):
    cache.check_model(s['model_config'], objective, s['config'], other, s['codec'])
  vae = tmp_path / 'vae'
  shutil.copytree(VAE_DIR, vae)
  (vae / 'config.json').write_text((vae / 'config.json').read_text().replace(
      '"scaling_factor": 0.18215', '"scaling_factor": 0.13025'))
  with pytest.raises(ValueError, match=r'another image codec \(VAE\) \(differs in config\)'):
    cache.check_model(s['model_config'], objective, s['config'], params,
                      make_codec(False, str(vae)))
  longer = dataclasses.replace(s['model_config'], text_length=32)
  with pytest.raises(ValueError, match='another text length'):
    cache.check_model(longer, objective, s['config'], params, s['codec'])
  with pytest.raises(ValueError, match='train_text_encoder=False'):
    cache.check_model(s['model_config'], dataclasses.replace(objective, train_text_encoder=True),
                      s['config'], params, s['codec'])


def test_bad_examples_are_skipped_and_counted_misfits_are_errors(setup, tmp_path):
  s = setup
  examples = raw_examples()[:3]
  examples[1] = dict(examples[1], caption=b'\xff\xfe not UTF-8')
  examples.append(dict(examples[0], image=np.zeros((0, 0, 3), np.uint8), key='empty'))
  manifest = encoder_cache.write_cache(examples, str(tmp_path / 'a'), s['model_config'],
                                       s['state'].params['text_encoder'], s['codec'],
                                       batch_size=4)
  assert manifest['num_records'] == 2 and manifest['num_examples_read'] == 4
  assert manifest['skipped'] == {'empty_image': 1, 'invalid_caption': 1}
  assert list(encoder_cache.EncoderCache(str(tmp_path / 'a')).read([0, 1])['key']) == [
      'ex0', 'ex2']
  # Existing output: refused without overwrite.
  with pytest.raises(FileExistsError, match='--overwrite'):
    encoder_cache.write_cache(examples, str(tmp_path / 'a'), s['model_config'],
                              s['state'].params['text_encoder'], s['codec'], batch_size=4)
  # An image of another size is a one-line error naming the example; no manifest is left.
  wrong = [dict(examples[0], image=np.zeros((32, 32, 3), np.uint8))]
  with pytest.raises(ValueError, match=r'example ex0: image uint8 \(32, 32, 3\), the model '
                                       r'needs uint8 \(16, 16, 3\)'):
    encoder_cache.write_cache(wrong, str(tmp_path / 'b'), s['model_config'],
                              s['state'].params['text_encoder'], s['codec'], batch_size=4)
  assert not os.path.exists(tmp_path / 'b' / 'manifest.json')
  with pytest.raises(FileNotFoundError, match='not a finished encoder cache'):
    encoder_cache.EncoderCache(str(tmp_path / 'b'))


def test_writes_a_seqio_task(setup, tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from charred.datasets import tasks  # pylint: disable=g-import-not-at-top
  examples = raw_examples()[:3]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({
        'image': np.stack([e['image'] for e in examples]),
        'caption': [e['caption'] for e in examples], 'key': [e['key'] for e in examples]})

  name = 'encoder_cache_test_task'
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=['train']),
                           preprocessors=[
                               functools.partial(seqio.preprocessors.rekey, key_map={
                                   'text_tokens': 'caption', 'caption': 'caption',
                                   'image': 'image', 'key': 'key'}),
                               functools.partial(seqio.preprocessors.tokenize,
                                                 copy_pretokenized=False),
                               seqio.preprocessors.append_eos_after_trim],
                           output_features=tasks.OUTPUT_FEATURES)
  s = setup
  out = str(tmp_path / 'task')
  encoder_cache.write_cache(encoder_cache.task_examples(name, 'train', 16), out,
                            s['model_config'], s['state'].params['text_encoder'], s['codec'],
                            batch_size=4)
  direct = encoder_cache.EncoderCache(s['out']).read([0, 1, 2])
  via_task = encoder_cache.EncoderCache(out).read([0, 1, 2])
  for k in direct:
    np.testing.assert_array_equal(via_task[k], direct[k])
  with open(os.path.join(out, 'manifest.json')) as f:
    assert json.load(f)['model'] == s['manifest']['model']
