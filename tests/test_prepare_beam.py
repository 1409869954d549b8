"""`prepare --runner`: the Beam pipeline writes what the single-process path writes, and a
failing worker leaves nothing behind. The pipeline tests need apache-beam (the `beam`
extra, not installed by CI) and skip without it; the pure pieces run everywhere."""
import importlib.util
import os
import sys
import types

import pytest

from conftest import run_cli
import web_fixtures as wf

BUILDER = 'laion_hr/unfiltered'
ROWS = 120  # bad rows 7, 13, 50, 96, 110 (web_fixtures.laion_bad_row)
EXPECTED_SKIPS = {'caption_invalid_utf8': 2, 'image_corrupt': 2, 'not_downloaded': 1}
BEAM = 'direct_num_workers=2'


@pytest.fixture(scope='module')
def beam():
  return pytest.importorskip('apache_beam')


@pytest.fixture(scope='module')
def manual_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('img2dataset'))
  skips = wf.write_laion_hr_fixture(d, ROWS, rows_per_shard=40, min_side=48, max_side=96)
  assert skips == EXPECTED_SKIPS
  return d


def _contents(out):
  c = wf.shard_contents(out)
  c['manifest']['source'].pop('data_dir')
  return c


def _skip_report(data_dir):
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  return web_images.read_skip_report(os.path.join(data_dir, 'laion_hr', 'unfiltered', '1.0.0'),
                                     'train')


@pytest.fixture(scope='module')
def single(manual_dir, tmp_path_factory):
  from charred.datasets import prepare  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('single')
  prepare.prepare(BUILDER, 'train', str(root / 'out'), data_dir=str(root / 'tfds'),
                  manual_dir=manual_dir, examples_per_shard=25)
  return root


def test_beam_prepare_equals_single_process(beam, manual_dir, single, tmp_path):
  from charred.datasets import prepare  # pylint: disable=g-import-not-at-top
  manifest = prepare.prepare(BUILDER, 'train', str(tmp_path / 'out'),
                             data_dir=str(tmp_path / 'tfds'), manual_dir=manual_dir,
                             examples_per_shard=25, runner='direct', beam_options=BEAM)
  assert manifest['num_records'] == ROWS - sum(EXPECTED_SKIPS.values())
  assert [s['num_records'] for s in manifest['shards']] == [25, 25, 25, 25, 15]
  expected, got = _contents(str(single / 'out')), _contents(str(tmp_path / 'out'))
  assert got['manifest'] == expected['manifest']  # shard sha256s included
  assert got['records'] == expected['records']  # keys, captions, decoded pixels
  # The builder, generated through Beam, skipped and counted the same rows.
  assert _skip_report(str(tmp_path / 'tfds')) == _skip_report(str(single / 'tfds'))
  assert _skip_report(str(tmp_path / 'tfds'))['skipped'] == EXPECTED_SKIPS
  assert sorted(os.listdir(tmp_path)) == ['out', 'tfds']  # no temporary directory left


def test_beam_task_counts_filters_as_single_process(beam, manual_dir, single, tmp_path):
  from charred.datasets import prepare  # pylint: disable=g-import-not-at-top
  outs = {}
  for name, runner in (('single', None), ('beam', 'direct')):
    outs[name] = str(tmp_path / name)
    prepare.prepare_task('laion_hr', 'train', outs[name], data_dir=str(single / 'tfds'),
                         examples_per_shard=40, runner=runner,
                         beam_options=BEAM if runner else None,
                         filter_names=('valid_caption', 'caption_length'),
                         filter_args={'caption_length': {'min_bytes': 40}})
  expected, got = _contents(outs['single']), _contents(outs['beam'])
  assert got == expected
  filtered = got['manifest']['filtered']
  assert filtered['valid_caption']['kept'] == ROWS - sum(EXPECTED_SKIPS.values())
  # The workers ran the filter with its argument, not its default (5 bytes).
  assert 0 < filtered['caption_length']['too_short'] < filtered['valid_caption']['kept']


def test_failing_worker_leaves_no_manifest_or_output(beam, single, tmp_path):
  """One chunk of the input cannot be read (a truncated TFDS file): the pipeline fails,
  and neither --out nor a manifest nor a temporary directory is left."""
  import shutil  # pylint: disable=g-import-not-at-top
  from charred.datasets import prepare  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'tfds'
  shutil.copytree(single / 'tfds', data_dir)
  version_dir = data_dir / 'laion_hr' / 'unfiltered' / '1.0.0'
  records = [p for p in version_dir.iterdir() if '.tfrecord' in p.name]
  assert len(records) == 1
  size = records[0].stat().st_size
  with open(records[0], 'r+b') as f:
    f.truncate(size * 2 // 3)  # the chunks over the first part still read
  out = tmp_path / 'shards' / 'out'
  with pytest.raises(Exception, match='(?i)truncated|data ?loss|corrupt'):
    prepare.prepare(BUILDER, 'train', str(out), data_dir=str(data_dir), runner='direct',
                    beam_options=BEAM, examples_per_shard=25)
  assert not out.exists()
  assert os.listdir(tmp_path / 'shards') == []
  assert not list(tmp_path.rglob('manifest.json'))


def test_pipeline_options(beam):
  from charred.datasets import prepare_beam  # pylint: disable=g-import-not-at-top
  options = prepare_beam.pipeline_options('direct').get_all_options()
  assert options['runner'] == 'DirectRunner'
  assert options['direct_running_mode'] == 'multi_processing'
  assert options['direct_num_workers'] == os.cpu_count()
  options = prepare_beam.pipeline_options(
      'direct', 'direct_num_workers=3,direct_running_mode=in_memory').get_all_options()
  assert (options['direct_num_workers'], options['direct_running_mode']) == (3, 'in_memory')
  options = prepare_beam.pipeline_options(
      'DataflowRunner', 'project=p,region=europe-west4,temp_location=gs://b/t').get_all_options()
  assert (options['runner'], options['project'], options['region']) == (
      'DataflowRunner', 'p', 'europe-west4')


# Without Beam, and pure pieces: these run in CI.


def test_runner_without_beam_is_a_one_line_error(monkeypatch):
  from charred.datasets import prepare_beam  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'apache_beam', None)  # import raises ImportError
  with pytest.raises(ValueError, match=r"--runner needs Apache Beam.*pip install 'charred\[beam\]'"):
    prepare_beam.pipeline_options('direct')


@pytest.mark.skipif(importlib.util.find_spec('apache_beam') is not None,
                    reason='Beam is installed here')
def test_cli_runner_without_beam(tmp_path):
  out = tmp_path / 'out'
  proc = run_cli('prepare', '--builder=laion_hr/unfiltered', f'--out={out}',
                 f'--manual_dir={tmp_path}', '--runner=direct', check=False)
  errors = [l for l in proc.stderr.splitlines() if ': error: ' in l]
  assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
  assert "pip install 'charred[beam]'" in errors[0]
  assert not out.exists()


def test_plan_shards_packs_records_in_input_order():
  from charred.datasets import prepare_beam  # pylint: disable=g-import-not-at-top
  chunks = [dict(chunk=2, num_records=5), dict(chunk=0, num_records=3),
            dict(chunk=1, num_records=0), dict(chunk=3, num_records=2)]
  assert list(prepare_beam.plan_shards(chunks, 4)) == [
      (0, [(0, 0, 3), (2, 0, 1)]), (1, [(2, 1, 5)]), (2, [(3, 0, 2)])]
  assert list(prepare_beam.plan_shards([dict(chunk=0, num_records=0)], 4)) == []


def test_chunk_splits_cover_the_split_in_order():
  from charred.datasets import prepare_beam  # pylint: disable=g-import-not-at-top
  infos = {'train': types.SimpleNamespace(num_examples=10),
           'validation': types.SimpleNamespace(num_examples=3)}
  assert prepare_beam.chunk_splits('train', infos, 4) == [
      'train[0:3]', 'train[3:6]', 'train[6:9]', 'train[9:10]']
  assert prepare_beam.chunk_splits('train[2:7]+validation', infos, 2) == [
      'train[2:6]', 'train[6:7]', 'validation[0:3]']
  assert prepare_beam.chunk_splits('train', infos, 1, max_chunk=6) == [
      'train[0:6]', 'train[6:10]']
