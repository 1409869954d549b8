"""`prepare --task`: a web source through its named quality filters into JPEG XL shards;
a caption a filter drops never reaches a training batch."""

import dataclasses
import os

import numpy as np
import pytest

from conftest import run_cli
import web_fixtures as wf

GOOD = [f'A red bicycle leaning on wall number {i}' for i in range(8)]
# Each caption fails exactly one default filter, under the outcome named.
BAD = {
    'ok': ('caption_length', 'too_short'),
    'IMG_0001.jpg': ('url_or_filename', 'filename'),
    'https://example.org/images/cat.png': ('url_or_filename', 'url'),
    'Royalty free stock photo of a cat on a sofa': ('boilerplate', 'boilerplate'),
    'buy now buy now buy now buy now buy now': ('repetition', 'repeated_words'),
}


def write_laion(manual):
  captions = GOOD[:4] + list(BAD) + GOOD[4:]
  rows = [wf.LaionRow(c, wf.jpeg(96 if i % 2 else 64, 64, seed=i))
          for i, c in enumerate(captions)]
  rows.append(wf.LaionRow('A corrupt download', b'\xff\xd8\xff\xe0 not really a jpeg'))
  wf.write_img2dataset_shard(manual, 0, rows)


def test_filtered_captions_never_reach_a_training_batch(tmp_path):
  from charred import main  # pylint: disable=g-import-not-at-top
  from charred.configs.experiment import DataConfig  # pylint: disable=g-import-not-at-top
  from charred.datasets import bucketing, prepare  # pylint: disable=g-import-not-at-top
  from charred.models.diffusion_model import ObjectiveConfig  # pylint: disable=g-import-not-at-top
  from charred.trainers import trainer  # pylint: disable=g-import-not-at-top
  from test_trainer import micro_model  # pylint: disable=g-import-not-at-top
  manual, out = str(tmp_path / 'img2dataset'), str(tmp_path / 'shards')
  write_laion(manual)
  manifest = prepare.prepare_task('laion_hr', 'train', out, data_dir=str(tmp_path / 'tfds'),
                                  manual_dir=manual)
  assert manifest['num_records'] == len(GOOD)
  assert manifest['source']['task'] == 'laion_hr'
  dropped = {(name, reason): n for name, outcomes in manifest['filtered'].items()
             for reason, n in outcomes.items() if reason != 'kept' and n}
  assert dropped == {v: 1 for v in BAD.values()}
  # Filters run in order, each seeing what the previous kept; the builder skipped the
  # corrupt image before any of them.
  assert manifest['filtered']['valid_caption']['kept'] == len(GOOD) + len(BAD)
  assert manifest['filtered']['repetition']['kept'] == len(GOOD)

  # Several epochs of the training stream main builds from these shards.
  data = DataConfig(shards=out, buckets=bucketing.BucketConfig(
      base_resolution=64, step=32, min_side=64, max_side=96, text_lengths=(64,)))
  train = trainer.TrainConfig(train_steps=10, batch_size=2)
  model = dataclasses.replace(micro_model(), text_length=64)
  batches, _ = main.make_batches(data, model, ObjectiveConfig(), train, 0, 1,
                                 make_iterator=None, codec=None)
  stream = batches()
  seen = [str(c) for _ in range(3 * len(GOOD) // 2) for c in next(stream)['caption']]
  assert set(seen) == set(GOOD)
  assert not set(seen) & set(BAD)


def test_cli_names_bad_filters_and_sources_in_one_line(tmp_path):
  def one_error(*flags):
    proc = run_cli('prepare', *flags, f'--out={tmp_path / "out"}', check=False)
    errors = [l for l in proc.stderr.splitlines() if ': error: ' in l]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / 'out')
    return errors[0]

  assert "unknown filter 'no_such_filter'; the filters are valid_caption" in one_error(
      '--task=laion_hr', '--filters=caption_length,no_such_filter')
  assert "unknown web source 'flickr'; the sources are laion_hr, wit" in one_error(
      '--task=flickr')
  assert 'exactly one of --builder or --task' in one_error('--task=laion_hr',
                                                           '--builder=laion_hr')
  assert 'apply to --task only' in one_error('--builder=laion_hr',
                                                         '--filters=boilerplate')
  assert ("filter 'aesthetic' has no parameter 'min_scor'; its parameters are head, "
          "min_score") in one_error('--task=laion_hr', '--filters=aesthetic',
                                    '--filter_args=aesthetic.min_scor=5')
  assert "arguments for filter 'aesthetic', which is not among the filters run" in one_error(
      '--task=laion_hr', '--filters=valid_caption', '--filter_args=aesthetic.min_score=5')
  assert 'is not FILTER.PARAMETER=VALUE' in one_error('--task=laion_hr',
                                                      '--filter_args=min_score=5')


def test_aesthetic_scores_reach_the_shards_and_the_filter_drops_low_ones(tmp_path):
  from charred.datasets import jxl_shards, prepare  # pylint: disable=g-import-not-at-top
  manual, out = str(tmp_path / 'img2dataset'), str(tmp_path / 'shards')
  scores = [6.9, 4.0, 5.5, None, 7.2, 3.1, 6.5, 5.0]  # LAION-Aesthetics v2's cut: 5.0
  wf.write_img2dataset_shard(manual, 0, [
      wf.LaionRow(c, wf.jpeg(64, 64, seed=i), aesthetic=a)
      for i, (c, a) in enumerate(zip(GOOD, scores))])
  manifest = prepare.prepare_task('laion_hr', 'train', out, data_dir=str(tmp_path / 'tfds'),
                                  manual_dir=manual, filter_names=['aesthetic'],
                                  filter_args={'aesthetic': {'min_score': 5.0}})
  assert manifest['filtered'] == {'aesthetic': {'kept': 5, 'unscored': 1, 'low_score': 2}}
  assert manifest['source']['filter_args'] == {'aesthetic': {'min_score': 5.0}}
  shards = jxl_shards.JxlShards(out)
  written = {r['caption']: r['aesthetic_score'] for r in shards}
  shards.close()
  expected = {c: a for c, a in zip(GOOD, scores) if a is None or a >= 5.0}
  assert set(written) == set(expected)
  for caption, score in expected.items():
    if score is None:
      assert np.isnan(written[caption])
    else:
      assert written[caption] == pytest.approx(score, rel=1e-6)


GERMAN = ['Ein rotes Fahrrad steht an der Wand', 'Der Hund spielt im Garten mit dem Ball',
          'Eine alte Kirche auf dem Marktplatz']


@pytest.mark.slow
def test_rebalance_draws_languages_at_mt5s_distribution(tmp_path):
  from charred.datasets import prepare  # pylint: disable=g-import-not-at-top
  manual, out = str(tmp_path / 'img2dataset'), str(tmp_path / 'shards')
  rows = [wf.LaionRow(c, wf.jpeg(64, 64, seed=i)) for i, c in enumerate(GOOD + list(BAD))]
  rows += [wf.LaionRow(c, wf.jpeg(64, 64, seed=50 + i), language='de')
           for i, c in enumerate(GERMAN)]
  wf.write_img2dataset_shard(manual, 0, rows)
  draws = 400
  manifest = prepare.prepare_task('laion_hr', 'train', out, data_dir=str(tmp_path / 'tfds'),
                                  manual_dir=manual, rebalance=draws, examples_per_shard=100)
  languages = manifest['source']['languages']
  assert languages['counts'] == {'de': len(GERMAN), 'en': len(GOOD)}
  # mT5's p_l ~ n_l^0.3 over mC4 tokens (en 2,733 B, de 347 B; arXiv:2010.11934).
  de = 347**0.3 / (347**0.3 + 2733**0.3)
  assert languages['rates']['de'] == pytest.approx(de, rel=1e-9)
  assert manifest['num_records'] == draws
  assert manifest['filtered']['repetition']['kept'] == len(GOOD) + len(GERMAN)  # one census

  from charred.datasets import jxl_shards  # pylint: disable=g-import-not-at-top
  shards = jxl_shards.JxlShards(out)
  captions = [r['caption'] for r in shards]
  shards.close()
  assert not set(captions) & set(BAD)
  n_de = sum(c in GERMAN for c in captions)
  # Binomial(400, 0.35): mean 140, standard deviation 9.5. The draws are seeded; 3 sigma
  # still tells the target from the data's own mix (3 in 11: 109).
  assert abs(n_de - draws * de) < 3 * np.sqrt(draws * de * (1 - de)), n_de
