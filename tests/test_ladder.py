"""The realism ladder (issue 23; datasets/ladder.py, signs.CONFIGS 'r1'..'r4')."""
import dataclasses
import hashlib
import re
import subprocess
import sys

import numpy as np
import pytest

from charred.datasets import render, signs
from charred.datasets import words as words_lib

RUNGS = [name for name in ('r1', 'r2', 'r3', 'r4') if name in signs.CONFIGS]
SPLITS = ('train', 'validation', 'test')


def _r0_digest(name, split, n=8):
  src = signs.SignsSource(name, split)
  h = hashlib.sha256()
  for i in range(n):
    ex = src[i]
    h.update(ex['image'].tobytes())
    h.update(ex['caption'].encode())
    h.update(repr([ex['x'], ex['y'], ex['font'], ex['font_size']]).encode())
    h.update(np.asarray(signs.glyph_index_map(ex)).tobytes())
  return h.hexdigest()[:16]


# Computed with this same digest from the code before the ladder (commit 754aec5, the
# parent of 'ladder R1'): the first 8 examples of each split, pixels, captions, placement
# and glyph boxes. The ladder must not move a pixel of the configs before it.
BEFORE_THE_LADDER = {
    'tiny_grid': {'train': '5b6cf2be844753b2', 'validation': '563f5d3c0b5b924a'},
    'tiny': {'train': 'e904c663795c64c6', 'validation': '81cbf377d663156b'},
    'tiny_bw': {'train': 'dea0fd70dbb3c1cc', 'validation': '2ec85f2346f044df'},
    'tiny16': {'train': 'd12923630dcd3c63', 'validation': 'eefc6388fd0a4604'},
    'micro': {'train': '08620116c64fada4', 'validation': '6b592b23e7ababd9'},
    'base': {'train': '2d3b1b77358ffa78', 'validation': '8b070ca59c790e86'},
}


@pytest.mark.parametrize('name', sorted(BEFORE_THE_LADDER))
def test_configs_before_the_ladder_render_the_same_pixels(name):
  got = {split: _r0_digest(name, split) for split in ('train', 'validation')}
  assert got == BEFORE_THE_LADDER[name]


def test_r0_is_tiny_grid():
  assert signs.CONFIGS['r0'] is signs.TINY_GRID


@pytest.mark.parametrize('name', RUNGS)
def test_deterministic_by_index(name):
  for split in SPLITS:
    a, b = signs.SignsSource(name, split), signs.SignsSource(name, split)
    for i in (0, 1, 7):
      np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
      assert a[i]['caption'] == b[i]['caption']
      assert a[i]['text_box'] == b[i]['text_box']
    assert not np.array_equal(a[0]['image'], a[1]['image'])


def _ink(ex):
  """Pixels the text drew: the renderer's coverage mask."""
  return ex['text_mask']


@pytest.mark.parametrize('name', RUNGS)
def test_glyph_boxes_cover_the_ink(name):
  inside = total = 0
  src = signs.SignsSource(name, 'train')
  for i in range(50):
    ex = src[i]
    index_map = signs.glyph_index_map(ex)
    ink = _ink(ex)
    if name in ('r1', 'r2'):  # Plain background: every pixel off it is text.
      off_paper = np.any(ex['image'] != np.asarray(ex['background_color'], np.uint8), -1)
      ink = off_paper
    inside += int((ink & (index_map >= 0)).sum())
    total += int(ink.sum())
    x0, y0, x1, y1 = ex['text_box']
    ys, xs = np.nonzero(index_map >= 0)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
  assert total and inside / total >= 0.99, inside / total


@pytest.mark.parametrize('name', RUNGS)
def test_held_out_words_and_fonts_never_train(name):
  config = signs.CONFIGS[name]
  splits = words_lib.word_splits(config.words)
  held_out = {w.lower() for s in ('validation', 'test') for w in splits[s]}
  assert held_out and not held_out & {w.lower() for w in splits['train']}
  held_fonts = set(config.validation_fonts) | set(config.test_fonts)
  assert not {f.lower() for f in held_fonts} & {f.lower() for f in config.render.fonts}
  assert not set(config.validation_fonts) & set(config.test_fonts)
  src = signs.SignsSource(name, 'train')
  for i in range(300):
    ex = src[i]
    tokens = set(re.findall('[a-z]+', ex['caption'].lower()))
    assert not tokens & held_out, (ex['caption'], tokens & held_out)
    assert ex['font'] not in held_fonts
    if config.language is not None:
      held_templates = config.language.validation_templates + config.language.test_templates
      assert ex['template'] in config.language.templates
      assert ex['template'].lower() not in {t.lower() for t in held_templates}


def test_validation_words_are_tiny_grids():
  ladder = words_lib.word_splits(signs.CONFIGS['r1'].words)
  grid = words_lib.word_splits(signs.TINY_GRID.words)
  assert ladder['validation'] == grid['validation']
  assert len(ladder['test']) == 300 and set(ladder['train']) < set(grid['train'])


def test_r1_places_the_word_anywhere():
  src = signs.SignsSource('r1', 'train')
  boxes = np.array([src[i]['text_box'] for i in range(200)])
  width, height = src.config.render.width, src.config.render.height
  assert boxes[:, 0].min() <= 4 and boxes[:, 2].max() >= width - 4  # left and right edges
  assert boxes[:, 0].max() >= width // 2  # short words start past the middle
  assert boxes[:, 1].min() <= 2 and boxes[:, 3].max() >= height - 2
  assert boxes[:, 0].min() >= 2 and boxes[:, 2].max() <= width - 2  # the 2 px margin
  ex = src[0]
  assert ex['font_size'] == 20 and ex['font'] in render.MONO_FONTS
  assert ex['caption'] == f'A sign that says "{ex["text"]}".'


@pytest.mark.parametrize('name', RUNGS)
def test_batches_carry_the_text_box(name):
  src = signs.SignsSource(name, 'validation')
  examples = [src[i] for i in range(3)]
  batch = signs.make_batch(examples, 96 if name == 'r4' else 32)
  assert batch['text_box'].dtype == np.int32 and batch['text_box'].shape == (3, 4)
  np.testing.assert_array_equal(batch['text_box'], [ex['text_box'] for ex in examples])
  assert signs.rendering_targets(name, 'test')[0]['text']


def test_text_box_of_a_fixed_placement_example():
  ex = signs.SignsSource('tiny_grid', 'train')[0]
  x0, y0, x1, y1 = ex['text_box']
  assert (x0, x1) == (4, 4 + 12 * len(ex['text']))
  assert signs.make_batch([ex], 32)['text_box'].tolist() == [[x0, y0, x1, y1]]


def test_a_missing_font_fails_in_one_line_when_the_config_is_used():
  config = dataclasses.replace(signs.CONFIGS['r1'], render=dataclasses.replace(
      signs.CONFIGS['r1'].render, fonts=('NoSuchFont.ttf',)))
  with pytest.raises(FileNotFoundError) as error:
    signs.SignsSource(config, 'train')
  assert 'NoSuchFont.ttf' in str(error.value) and '\n' not in str(error.value)


def test_a_font_without_a_glyph_fails_in_one_line_naming_it():
  # Kalam (a wheel face) has Latin; ask for a letter no font here has.
  from charred.datasets import ladder  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as error:
    ladder.check_fonts(('DejaVuSansMono.ttf',), 'ab\U0001F99C', 'the test')
  message = str(error.value)
  assert 'DejaVuSansMono.ttf' in message and "'\U0001F99C'" in message and '\n' not in message


def test_no_test_split_without_test_words():
  with pytest.raises(ValueError, match='no test words'):
    signs.SignsSource('tiny_grid', 'test')


def test_r2_draws_proportional_faces_at_sizes_varying_twofold():
  src = signs.SignsSource('r2', 'train')
  examples = [src[i] for i in range(200)]
  fonts = {ex['font'] for ex in examples}
  from charred.datasets import ladder  # pylint: disable=g-import-not-at-top
  assert {ladder.family(f) for f in fonts} == set(ladder.FAMILIES)
  assert len(fonts) >= 8
  heights = [ex['text_box'][3] - ex['text_box'][1] for ex in examples]
  sizes = [ex['font_size'] for ex in examples]
  assert max(sizes) >= 2 * min(sizes) and max(heights) >= 2 * min(heights)
  sans = render.load_font('DejaVuSans.ttf', 20)
  assert sans.getlength('m') > 1.5 * sans.getlength('i')  # proportional advances
  held = [signs.SignsSource('r2', s)[i]['font'] for s in ('validation', 'test')
          for i in range(40)]
  assert 'DejaVuSerif-Italic.ttf' in held and 'DejaVuSans-BoldOblique.ttf' in held


def test_r3_colours_backgrounds_and_rotation():
  src = signs.SignsSource('r3', 'train')
  examples = [src[i] for i in range(100)]
  angles = [ex['angle'] for ex in examples]
  assert max(abs(a) for a in angles) <= 5.0 and max(angles) > 3 and min(angles) < -3
  for ex in examples:
    assert abs(render.luma(ex['text_color']) - render.luma(ex['background_color'])) >= 0.5
  # Not plain: most backgrounds show more than a handful of colours away from the text.
  busy = sum(len(np.unique(ex['image'][~ex['text_mask']].reshape(-1, 3), axis=0)) > 50
             for ex in examples)
  assert busy >= 50
  text_colours = {ex['text_color'] for ex in examples}
  assert len(text_colours) >= 90


def test_r4_language():
  config = signs.CONFIGS['r4']
  from charred.datasets import ladder, palette  # pylint: disable=g-import-not-at-top
  language = config.language
  assert len(language.templates) >= 8 and len(language.validation_templates) >= 2
  assert len(language.test_templates) >= 2
  assert not set(language.templates) & set(language.validation_templates + language.test_templates)
  assert not set(language.validation_templates) & set(language.test_templates)
  assert (config.render.height, config.render.width) == (64, 256)
  templates = {}
  lengths, counts = [], []
  for split, n in (('train', 300), ('validation', 100), ('test', 100)):
    src = signs.SignsSource('r4', split)
    for i in range(n):
      ex = src[i]
      caption, text = ex['caption'], ex['text']
      assert len(caption.encode()) <= 95 and '"' not in text
      assert caption.count('"') == 2 and caption.split('"')[1] == text
      assert caption == ex['template'].format(text, colour=ex['colour'],
                                              style=ladder.STYLE_WORDS[ex['family']])
      assert 1 <= len(text) <= 12
      tokens = [t for t in re.split(r'[ &-]+', text.strip('.!?:')) if t]
      assert 1 <= len(tokens) <= 3
      if split != 'train':
        assert any(w == src.words[i % len(src.words)] for w in ex['words'])
      if '{colour}' in ex['template']:
        assert tuple(ex['text_color']) == palette.COLOURS[ex['colour']]
      want = ladder.template_family(ex['template'])
      if want:
        assert ex['family'] == want
      assert ladder.family(ex['font']) == ex['family']
      templates.setdefault(split, set()).add(ex['template'])
      lengths.append(len(text))
      counts.append(len(tokens))
  assert templates['train'] <= set(language.templates)
  assert set(language.validation_templates) <= templates['validation']
  assert set(language.test_templates) <= templates['test']
  assert min(lengths) <= 3 and max(lengths) == 12 and set(counts) == {1, 2, 3}
  assert any(c.isdigit() for c in ''.join(ex['text'] for ex in [src[i] for i in range(50)]))


def test_a_template_without_one_quoted_text_is_refused():
  from charred.datasets import ladder  # pylint: disable=g-import-not-at-top
  bad = ladder.LanguageConfig(templates=('A sign that says {}.',))
  with pytest.raises(ValueError, match='quote'):
    bad.check()
  with pytest.raises(ValueError, match='quote'):
    signs.SignsSource(dataclasses.replace(signs.CONFIGS['r4'], language=bad), 'train')


def test_rendering_the_ladder_imports_no_tensorflow():
  # The rendered source runs on hosts with jax but no TensorFlow or TFDS, Caveat included.
  code = ('import sys\n'
          'from charred.datasets import signs\n'
          'fonts = set()\n'
          'for name in ("r2", "r4"):\n'
          '  s = signs.SignsSource(name, "train")\n'
          '  fonts |= {s[i]["font"] for i in range(8)}\n'
          'print(sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules))\n'
          'print("caveat" in fonts)\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines() == ['[]', 'True'], proc.stdout


def test_line_boxes_sit_one_distance_above_the_baseline_whatever_the_letters():
  def tops_above_baseline(name):
    src = signs.SignsSource(name, 'train')
    tops = set()
    for i in range(40):
      ex = src[i]
      x0, y0, x1, y1 = ex['text_box']
      ys, xs = np.nonzero(ex['text_mask'])
      assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
      tops.add(ex['y'] - y0)  # 'y': the baseline
    return tops
  ascent, _ = render.load_font('DejaVuSansMono.ttf', 20).getmetrics()
  assert tops_above_baseline('r1') == {ascent}
  assert len(tops_above_baseline('r1_ink')) > 1  # ink boxes follow ascenders
