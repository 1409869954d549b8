"""The TF-free signs path (datasets/signs.py) against the TFDS builder and the font."""
import hashlib
import sys

import numpy as np
import pytest

from charred import tokenizer
from charred.datasets import render, signs
from charred.datasets import words as words_lib


def _digest(image, caption, text, word, bucket):
  return hashlib.sha1(np.asarray(image).tobytes() + f'{caption}|{text}|{word}|{bucket}'.encode()
                      ).hexdigest()


@pytest.fixture(scope='module')
def micro_tfds(tmp_path_factory):
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  pipeline.prepare('micro', data_dir)
  return data_dir


def test_signs_need_no_tensorflow():
  import subprocess  # pylint: disable=g-import-not-at-top
  code = ('import sys; from charred.datasets import signs; from charred.configs import '
          'experiment; it = signs.make_iterator("micro", "train", 4, 32); next(it); '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_same_examples_as_the_tfds_builder(micro_tfds, split):
  """Every example of the TFDS split, bit for bit, and nothing else (TFDS stores them in
  its own key-hash order; the TF-free path reads them by index)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('typography/micro', data_dir=micro_tfds)
  stored = sorted(_digest(ex['image'], *(ex[k].decode() for k in (
      'caption', 'text', 'word', 'frequency_bucket')))
                  for ex in tfds.as_numpy(builder.as_dataset(split=split)))
  source = signs.SignsSource('micro', split)
  ours = sorted(_digest(ex['image'], ex['caption'], ex['text'], ex['word'],
                        ex['frequency_bucket']) for ex in (source[i] for i in range(len(source))))
  assert ours == stored


def test_same_batches_as_the_tfds_pipeline_in_example_order(micro_tfds):
  """The TFDS pipeline's unshuffled batches, put in index order, are the TF-free path's."""
  from charred.datasets import pipeline, tasks  # pylint: disable=g-import-not-at-top
  # A task name of its own: other tests register typography_micro over other data_dirs.
  task = tasks.register_typography_task('typography_micro_signs_test', 'micro', micro_tfds)
  theirs = list(pipeline.make_iterator(task, 'validation', 8, 32, shuffle=False, repeat=False))
  ours = list(signs.make_iterator('micro', 'validation', 8, 32, shuffle=False, repeat=False))
  assert len(ours) == len(theirs) == 4
  cat = lambda batches, k: np.concatenate([b[k] for b in batches])
  # Rows of the TFDS stream, matched to ours by caption + image.
  index = {(c, cat(ours, 'image')[i].tobytes()): i for i, c in enumerate(cat(ours, 'caption'))}
  order = [index[(c, im.tobytes())] for c, im in zip(cat(theirs, 'caption'),
                                                     cat(theirs, 'image'))]
  assert sorted(order) == list(range(32))
  for key in ('image', 'text_tokens', 'text_mask', 'caption', 'text', 'word',
              'frequency_bucket'):
    np.testing.assert_array_equal(cat(ours, key)[order], cat(theirs, key), err_msg=key)


def test_rendering_targets_equal_the_pipeline(micro_tfds):
  """The same held-out prompts (TFDS lists them in its stored order, signs by index)."""
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  key = lambda t: t['prompt']
  theirs = pipeline.rendering_targets('micro', 'validation', micro_tfds)
  # The TFDS examples store no text box; everything else is the same.
  ours = [{k: v for k, v in t.items() if k != 'box'} for t in signs.rendering_targets('micro')]
  assert sorted(ours, key=key) == sorted(theirs, key=key)


def test_stream_is_a_function_of_seed_and_position():
  a = signs.make_iterator('micro', 'train', 16, 32, seed=3)
  batches = [next(a) for _ in range(20)]  # 320 > 256 examples: crosses an epoch
  resumed = signs.make_iterator('micro', 'train', 16, 32, seed=3, start_batch=17)
  for k in (17, 18, 19):
    got = next(resumed)
    for key in batches[k]:
      np.testing.assert_array_equal(got[key], batches[k][key])
  epoch0 = np.concatenate([b['caption'] for b in batches[:16]])
  source = signs.SignsSource('micro', 'train')
  assert sorted(epoch0) == sorted(source[i]['caption'] for i in range(len(source)))
  other = next(signs.make_iterator('micro', 'train', 16, 32, seed=4))
  assert list(other['caption']) != list(batches[0]['caption'])


def test_length_curriculum_lets_in_one_letter_per_share_of_the_ramp():
  # 3..8 letters over 600 images: six lengths, 100 images each.
  got = [signs.curriculum_max_length(p, 600, 3, 8) for p in (0, 99, 100, 250, 599, 600, 9999)]
  assert got == [3, 3, 4, 5, 8, 8, 8]
  assert signs.curriculum_max_length(0, 0, 3, 8) == 8
  plain = signs.make_iterator('micro', 'train', 16, 32, seed=2, prefetch=0)
  ramped = signs.make_iterator('micro', 'train', 16, 32, seed=2, length_curriculum=96,
                               prefetch=0)
  for k in range(8):
    a, b = next(plain), next(ramped)
    limits = [signs.curriculum_max_length(16 * k + i, 96, 3, 8) for i in range(16)]
    assert all(len(w) <= m for w, m in zip(b['word'], limits)), (k, b['word'])
    # Words that fit keep their example, style and all; after the ramp nothing changes.
    for i, (wa, m) in enumerate(zip(a['word'], limits)):
      if len(wa) <= m:
        np.testing.assert_array_equal(a['image'][i], b['image'][i])
        assert a['caption'][i] == b['caption'][i]
    if k >= 6:
      np.testing.assert_array_equal(a['image'], b['image'])


def test_data_mix_options_need_the_rendered_source():
  from charred.configs import experiment
  with pytest.raises(ValueError, match="source='render'"):
    experiment.DataConfig(source='tfds', length_curriculum=100)
  with pytest.raises(ValueError, match="source='render'"):
    experiment.DataConfig(source='tfds', train_random_fraction=0.5)
  data = experiment.DataConfig(builder_config='micro', source='render',
                               train_random_fraction=0.0, length_curriculum=10**6)
  batch = next(experiment.typography_batches(data, 'train', 16, 32, prefetch=0))
  assert all(len(w) == 3 and w.isalpha() for w in batch['word'])
  assert all(words_lib.frequency_bucket(w) != words_lib.UNSEEN for w in batch['word'])


def test_grid_signs_put_each_glyph_on_three_whole_patches():
  source = signs.SignsSource('tiny_grid', 'train')
  for i in range(12):
    ex = source[i]
    ink = (ex['image'].astype(int).sum(-1) < 3 * 128)  # black on white
    for k, (x0, _, x1, _) in enumerate(render.glyph_boxes(ex['text'], ex)):
      assert (x0, x1) == (4 + 12 * k, 16 + 12 * k), (ex['text'], k)
    # Nothing is drawn left of the first cell or right of the last.
    cols = np.flatnonzero(ink.any(0))
    assert cols.min() >= 4 and cols.max() < 4 + 12 * len(ex['text']), ex['text']
  # One placement: the same text in the same weight is the same image, whatever the seed.
  by_font = {}
  for seed in range(8):
    image, style = render.render('Hello', np.random.default_rng(seed), signs.TINY_GRID.render)
    by_font.setdefault(style['font'], []).append(image)
  assert len(by_font) == 2
  for images in by_font.values():
    for image in images[1:]:
      np.testing.assert_array_equal(image, images[0])


def test_shards_are_rows_of_the_global_batch():
  whole = next(signs.make_iterator('micro', 'train', 8, 32, seed=1))
  parts = [next(signs.make_iterator('micro', 'train', 4, 32, seed=1, shard_index=i,
                                    shard_count=2)) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])


def test_glyph_boxes_are_the_monospace_advance_cells():
  """DejaVu Sans Mono advances every glyph by 1233/2048 em (its hmtx table), which PIL's
  BASIC layout rounds to whole pixels."""
  ex = render.render_example('wordy', seed=0, index=5, config=signs.TINY.render)
  boxes = render.glyph_boxes(ex['text'], ex)
  advance = round(ex['font_size'] * 1233 / 2048)
  for k, (x0, _, x1, _) in enumerate(boxes):
    assert x0 == int(np.floor(ex['x'] + k * advance))
    assert x1 == int(np.ceil(ex['x'] + (k + 1) * advance))


def test_glyph_tokens_cover_the_ink_and_name_its_byte():
  source = signs.SignsSource('micro', 'train')
  for i in range(20):
    ex = source[i]
    batch = signs.make_batch([ex], 32)
    glyphs = batch['glyph_tokens'][0]
    ink = (ex['image'] != np.asarray(ex['background_color'], np.uint8)).any(-1)
    assert glyphs[ink].min() >= 0, ex['caption']  # every drawn pixel lies in a glyph box
    start = ex['caption'].index(ex['text'])
    tokens = batch['text_tokens'][0]
    for k, letter in enumerate(ex['text']):
      box = render.glyph_boxes(ex['text'], ex)[k]
      token = glyphs[(box[1] + box[3]) // 2, (box[0] + box[2]) // 2]
      assert token == start + k  # bytes: a character's token is its byte index
      assert tokenizer.decode([tokens[token]]) == letter
      assert batch['glyph_chars'][0][(box[1] + box[3]) // 2, (box[0] + box[2]) // 2] == ord(letter)
    np.testing.assert_array_equal(batch['glyph_chars'][0] >= 0, glyphs >= 0)
    # The blank token is the closing quote right after the text.
    blank = batch['blank_tokens'][0]
    assert blank == start + len(ex['text']) and tokenizer.decode([tokens[blank]]) == '"'
  # A caption cut before its closing quote has no blank token.
  assert signs.make_batch([source[0]], 12)['blank_tokens'][0] == -1


def test_subword_glyph_tokens_name_the_piece_holding_the_letter():
  from charred import subword  # pylint: disable=g-import-not-at-top
  blind = subword.get_tokenizer('subword_en_1k')
  ex = signs.SignsSource('micro', 'train')[0]
  batch = signs.make_batch([ex], 32, tokenizer=blind)
  pieces = blind.pieces(ex['caption'])
  for k, letter in enumerate(ex['text']):
    box = render.glyph_boxes(ex['text'], ex)[k]
    token = batch['glyph_tokens'][0][(box[1] + box[3]) // 2, (box[0] + box[2]) // 2]
    assert letter in pieces[token], (letter, pieces[token])
  assert batch['glyph_tokens'][0].max() < len(pieces)


def test_iterator_state_resumes_the_stream_where_start_batch_would():
  # Grain's iterator: its checkpointed state and `start_batch` count the same batches,
  # with and without prefetching, and a restored iterator continues exactly.
  def captions(iterator, n):
    return [list(next(iterator)['caption']) for _ in range(n)]

  straight = captions(signs.make_iterator('micro', 'train', 4, 32, seed=5, prefetch=0), 6)
  running = signs.make_iterator('micro', 'train', 4, 32, seed=5, prefetch=3)
  assert captions(running, 2) == straight[:2]
  state = running.get_state()
  assert captions(signs.make_iterator('micro', 'train', 4, 32, seed=5, start_batch=2),
                  4) == straight[2:]
  restored = signs.make_iterator('micro', 'train', 4, 32, seed=5, start_batch=2)
  restored.set_state(state)
  assert captions(restored, 4) == straight[2:]
  assert restored.get_state() == signs.make_iterator(
      'micro', 'train', 4, 32, seed=5, start_batch=6).get_state()
