"""Builders generated through Beam (the DirectRunner, in memory) give the examples and
skip reports of an in-process build, on each builder's own test fixture. Needs
apache-beam (the `beam` extra, not installed by CI) and skips without it."""
import hashlib
import os

import numpy as np
import pytest

import test_calligraphy as calligraphy_tests
import test_doc_layout as doc_layout_tests
import test_scene_text as scene_text_tests
import test_textcaps as textcaps_tests
import test_wit as wit_tests

# One in-memory worker: Beam's multi-process start-up would dominate these tiny builds.
BEAM = 'direct_num_workers=1,direct_running_mode=in_memory'


@pytest.fixture(scope='module')
def beam():
  return pytest.importorskip('apache_beam')


def _comparable(value):
  """A feature value that compares by content: bytes by sha256, arrays as lists (NaN as
  'nan', which equals itself)."""
  if isinstance(value, dict):
    return {k: _comparable(v) for k, v in value.items()}
  if isinstance(value, bytes):
    return hashlib.sha256(value).hexdigest()
  if isinstance(value, np.ndarray):
    return repr([_comparable(v) for v in value]) if value.dtype == object else repr(
        value.tolist())
  return repr(value.item() if isinstance(value, np.generic) else value)


def _contents(builder):
  """{split: ({key: features}, skip report)} of a prepared builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  out = {}
  for split in sorted(builder.info.splits):
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    examples = {ex['key'].decode(): _comparable(ex) for ex in tfds.as_numpy(ds)}
    out[split] = examples, web_images.read_skip_report(builder.data_dir, split)
  return out


def _assert_beam_equals_local(builder_cls, config, manual, tmp_path):
  """Builds `manual` in-process and through Beam; returns the (equal) contents."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import prepare_beam  # pylint: disable=g-import-not-at-top
  contents = {}
  for mode, options in (('local', None), ('beam', prepare_beam.pipeline_options('direct', BEAM))):
    builder = builder_cls(config=config, data_dir=str(tmp_path / mode))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual, beam_options=options))
    contents[mode] = _contents(builder)
  assert contents['beam'].keys() == contents['local'].keys()
  for split, (examples, report) in contents['local'].items():
    beam_examples, beam_report = contents['beam'][split]
    assert beam_examples.keys() == examples.keys(), split
    assert beam_examples == examples, split  # captions, image sha256s, every feature
    assert beam_report == report, split
  return contents['local']


def _skipped(contents, split):
  return contents[split][1]['skipped']


@pytest.mark.parametrize('config', ['publaynet', 'doclaynet'])
def test_doc_layout(beam, config, tmp_path):
  from charred.datasets import doc_layout  # pylint: disable=g-import-not-at-top
  dirs = doc_layout_tests.write_manual_dirs(tmp_path / 'manual')
  got = _assert_beam_equals_local(doc_layout.DocLayout, config, dirs[config], tmp_path)
  # Counted in the driver, while parsing the COCO file.
  assert _skipped(got, 'train')[doc_layout.ANNOTATION_UNKNOWN_IMAGE] == 1


@pytest.mark.parametrize('config, write, driver_skips', [
    ('icdar2015', scene_text_tests.write_icdar, ('annotation_missing', 'image_missing')),
    ('coco_text', scene_text_tests.write_coco_text, ()),
    ('anyword', scene_text_tests.write_anyword, ('caption_invalid_utf8',))])
def test_scene_text(beam, config, write, driver_skips, tmp_path):
  from charred.datasets import scene_text  # pylint: disable=g-import-not-at-top
  manual = str(tmp_path / 'manual')
  write(manual)
  got = _assert_beam_equals_local(scene_text.SceneText, config, manual, tmp_path)
  # Reasons found while reading the annotations, counted in the driver.
  assert all(_skipped(got, 'train')[reason] == 1 for reason in driver_skips)


def test_textcaps(beam, tmp_path):
  from charred.datasets import textcaps  # pylint: disable=g-import-not-at-top
  manual = str(tmp_path / 'manual')
  textcaps_tests.write_textcaps(manual)
  got = _assert_beam_equals_local(textcaps.TextCaps, 'default', manual, tmp_path)
  assert _skipped(got, 'train')[textcaps.DUPLICATE_KEY] == 1  # counted in the driver


def test_calligraphy(beam, tmp_path):
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  manual = str(tmp_path / 'manual')
  calligraphy_tests._folder(manual, 'csv')  # pylint: disable=protected-access
  got = _assert_beam_equals_local(calligraphy.Calligraphy, 'default', manual, tmp_path)
  # Label rows the driver drops, and image reasons the workers count.
  skipped = _skipped(got, 'train')
  assert skipped[calligraphy.DUPLICATE_FILE] and skipped['image_corrupt']


def test_wit(beam, tmp_path):
  from charred.datasets import wit  # pylint: disable=g-import-not-at-top
  manual = str(tmp_path / 'manual')
  os.makedirs(manual)
  wit_tests.write_wit(manual)
  got = _assert_beam_equals_local(wit.WitImages, 'default', manual, tmp_path)
  assert set(got) == {'train', 'validation'} and sum(_skipped(got, 'train').values())
