"""One runnable experiment file per capability, each trained a few steps by charred.main
under the micro overlay: a VAE's latent space, prepared JPEG XL shards in buckets, an
encoder cache (of a typography task, or of shards in buckets), and FSDP across devices."""

import json
import os

import numpy as np
import pytest

from conftest import REPO, run_cli
import photo_fixtures

pytestmark = pytest.mark.slow

VAE_DIR = os.path.join(REPO, 'tests', 'fixtures', 'diffusers_flax', 'vae')


def train(experiment, workdir, *bindings, env=None, check=True):
  """charred.main on experiments/<experiment> shrunk by experiments/micro.gin, 4 steps."""
  return run_cli('main', f'--gin_file=experiments/{experiment}',
                 '--gin_file=experiments/micro.gin', f'--workdir={workdir}',
                 '--gin.TRAIN_STEPS=4', '--gin.CHECKPOINT_EVERY=4', '--gin.EVAL_EVERY=0',
                 *bindings, env=env, check=check)


def checkpoint_steps(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def test_latent_tiny_trains_in_the_vaes_latent_space(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = train('latent_tiny.gin', workdir, f"--gin.AUTOENCODER='{VAE_DIR}'",
               '--gin.EVAL_EVERY=4')
  assert 'eval validation @ 4' in proc.stdout and 'eval text_rendering @ 4' in proc.stdout
  assert checkpoint_steps(workdir) == [4]
  with open(os.path.join(workdir, 'charred_run.json')) as f:
    run = json.load(f)
  assert run['init']['autoencoder'] == VAE_DIR and not run['config']['pixel_space']
  from charred.configs import runs  # pylint: disable=g-import-not-at-top
  from charred.models.image_codec import LatentCodec  # pylint: disable=g-import-not-at-top
  loaded = runs.load_run(workdir)
  assert isinstance(loaded.model.codec, LatentCodec)
  # The U-Net sees the fixture VAE's 4 latent channels, not 3 x 4 x 4 pixel patches.
  assert loaded.params['unet']['conv_in']['kernel'].shape[2] == 4
  images = loaded.model.generator(loaded.params, num_steps=1)(['A sign that says "ab".'])
  assert images.shape == (1, 32, 128, 3) and images.dtype == np.uint8
  # Without the VAE's folder: one line naming what is missing, no checkpoint.
  bad = train('latent_tiny.gin', str(tmp_path / 'bad'), check=False)
  errors = [l for l in bad.stderr.splitlines() if ': error: ' in l]
  assert bad.returncode != 0 and len(errors) == 1 and 'InitConfig.autoencoder' in errors[0]
  assert not os.path.exists(tmp_path / 'bad')  # refused before the workdir was made


def test_shards_tiny_trains_on_prepared_shards_in_buckets(tmp_path):
  from charred.datasets import jxl_shards  # pylint: disable=g-import-not-at-top
  # Two aspect buckets (64x128 and 128x128) and two caption lengths.
  examples = [dict(key=f'{i:03d}', image=photo_fixtures.photo(64 if i % 2 else 128, 128, seed=i),
                   caption=('a photo' if i % 3 else 'a much longer web caption, ' * 2) + str(i))
              for i in range(32)]
  shards = str(tmp_path / 'shards')
  jxl_shards.write_shards(examples, shards, settings=jxl_shards.JxlSettings(lossless=True),
                          examples_per_shard=10)
  workdir = str(tmp_path / 'run')
  train('shards_tiny.gin', workdir, f"--gin.SHARDS='{shards}'")
  assert checkpoint_steps(workdir) == [4]
  from charred.configs import runs  # pylint: disable=g-import-not-at-top
  state = runs.load_run(workdir).data_state['iterator']
  # The bucketing iterator's own state (partial buckets included) went into the checkpoint:
  # 4 batches of 4 taken, and the images read past them wait in their buckets.
  assert state['num_records'] == 32 and state['num_batches'] == 4
  assert state['position'] == 16 + sum(len(v) for v in state['pending'].values())


def test_encoder_cache_tiny_trains_on_its_cache_and_refuses_other_weights(
    tmp_path, micro_data_dir):
  data_dir = f"--gin.experiment.DataConfig.data_dir='{micro_data_dir}'"
  cache = str(tmp_path / 'cache')
  run_cli('cache_encoder', '--gin_file=experiments/encoder_cache_tiny.gin',
          '--gin_file=experiments/micro.gin', data_dir, f'--out={cache}')
  workdir = str(tmp_path / 'run')
  train('encoder_cache_tiny.gin', workdir, data_dir, f"--gin.ENCODER_CACHE='{cache}'")
  assert checkpoint_steps(workdir) == [4]
  # Another seed draws another (frozen, random) text encoder than the cache holds.
  other = str(tmp_path / 'other')
  bad = train('encoder_cache_tiny.gin', other, data_dir, f"--gin.ENCODER_CACHE='{cache}'",
              '--gin.trainer.TrainConfig.seed=1', check=False)
  errors = [l for l in bad.stderr.splitlines() if ': error: ' in l]
  assert bad.returncode != 0 and len(errors) == 1 and 'text encoder' in errors[0], bad.stderr
  assert os.listdir(other) == []  # refused before anything was written


def test_encoder_cache_shards_tiny_caches_shards_in_buckets_and_trains_on_them(tmp_path):
  from charred.datasets import jxl_shards  # pylint: disable=g-import-not-at-top
  examples = [dict(key=f'{i:03d}', image=photo_fixtures.photo(64 if i % 2 else 128, 128, seed=i),
                   caption=('a photo' if i % 3 else 'a much longer web caption, ' * 2) + str(i))
              for i in range(24)]
  shards = str(tmp_path / 'shards')
  jxl_shards.write_shards(examples, shards, settings=jxl_shards.JxlSettings(lossless=True),
                          examples_per_shard=10)
  gin_files = ('--gin_file=experiments/encoder_cache_shards_tiny.gin',
               '--gin_file=experiments/micro.gin')
  cache = str(tmp_path / 'cache')
  proc = run_cli('cache_encoder', *gin_files, f'--shards={shards}', f'--out={cache}',
                 '--batch_size=4')
  assert '24 records in 4 buckets' in proc.stdout, proc.stdout
  workdir = str(tmp_path / 'run')
  train('encoder_cache_shards_tiny.gin', workdir, f"--gin.ENCODER_CACHE='{cache}'",
        '--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_EVERY=2')
  assert checkpoint_steps(workdir) == [2]
  from charred.configs import runs  # pylint: disable=g-import-not-at-top
  state = runs.load_run(workdir).data_state['iterator']
  assert state['num_records'] == 24 and state['num_batches'] == 2  # the bucketed plan's
  # One-line refusals that write nothing: shards that are not JPEG XL shards, a missing
  # folder, a cache for another (seed's) text encoder, a cache for other buckets.
  for source, message in ((cache, 'not a JPEG XL shard output'),
                          (str(tmp_path / 'missing'), 'not a folder')):
    bad = run_cli('cache_encoder', *gin_files, f'--shards={source}',
                  f'--out={tmp_path / "bad"}', check=False)
    errors = [l for l in bad.stderr.splitlines() if ': error: ' in l]
    assert bad.returncode != 0 and len(errors) == 1 and message in errors[0], bad.stderr
    assert not os.path.exists(tmp_path / 'bad')
  for binding, message in (('--gin.trainer.TrainConfig.seed=1', 'text encoder'),
                           ('--gin.bucketing.BucketConfig.text_lengths=(64,)', 'other buckets')):
    other = str(tmp_path / 'other')
    bad = train('encoder_cache_shards_tiny.gin', other, f"--gin.ENCODER_CACHE='{cache}'",
                binding, check=False)
    errors = [l for l in bad.stderr.splitlines() if ': error: ' in l]
    assert bad.returncode != 0 and len(errors) == 1 and message in errors[0], bad.stderr
    assert os.listdir(other) == []  # refused before anything was written


def test_typography_tiny_fsdp_shards_the_state_over_four_devices(tmp_path):
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  workdir = str(tmp_path / 'run')
  proc = train('typography_tiny_fsdp.gin', workdir, env=env)
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in proc.stdout, proc.stdout[-2000:]
  assert checkpoint_steps(workdir) == [4]


def test_ladder_r1_box_trains_samples_and_evaluates_in_boxes(tmp_path):
  """The box-conditioned arm end to end: trained with the renderer's boxes, the periodic
  evaluator samples its held-out words in theirs, `sample --box` draws in the box given,
  and a bad box is one line."""
  workdir = str(tmp_path / 'run')
  train('ladder_r1_box.gin', workdir, '--gin.EVAL_EVERY=4')
  metrics = [json.loads(line) for line in open(os.path.join(workdir, 'samples',
                                                            'metrics.jsonl'))]
  assert metrics[-1]['step'] == 4 and 'exact_match_ci' in metrics[-1]
  out = str(tmp_path / 'boxed.png')
  run_cli('sample', f'--workdir={workdir}', '--prompt=A sign that says "abc".',
          '--box=10,4,60,28', f'--output={out}', '--steps=2')
  assert os.path.getsize(out) > 0
  for box, message in (('10,4,200,28', 'not inside the 128x32 image'),
                       ('10,4,60', 'four integers')):
    bad = run_cli('sample', f'--workdir={workdir}', '--prompt=A sign that says "abc".',
                  f'--box={box}', f'--output={tmp_path / "bad.png"}', check=False)
    assert bad.returncode != 0 and message in bad.stderr
  # Without --box, the box is one of the data's layouts of the quoted text.
  laid_out = run_cli('sample', f'--workdir={workdir}', '--prompt=A sign that says "abc".',
                     f'--output={tmp_path / "prior.png"}', '--steps=2')
  assert 'where the training data would draw' in laid_out.stdout
  bad = run_cli('sample', f'--workdir={workdir}', '--prompt=no quotes here',
                f'--output={tmp_path / "bad.png"}', check=False)
  assert bad.returncode != 0 and 'quote it in the prompt' in bad.stderr
  # Held-out words from a file get boxes the same way.
  words = tmp_path / 'words.txt'
  words.write_text('abc\nHello\n')
  result = json.loads(run_cli('evaluate', f'--workdir={workdir}', f'--words_file={words}',
                              '--steps=2').stdout.strip().splitlines()[-1])
  assert result['num_words'] == 2
