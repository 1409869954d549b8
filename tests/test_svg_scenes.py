"""SVG scenes: captions quote the SVG's text, fonts are the bundled files, OCR reads the pixels."""
import collections
import re
import shutil
from xml.etree import ElementTree

import numpy as np
from PIL import Image, ImageDraw
import pytest

from charred.datasets import font_faces
from charred.datasets import palette
from charred.datasets import render
from charred.datasets import svg_scenes
from charred.datasets import words

VOCABULARY = words.word_splits(words.WordSplitConfig(vocabulary_size=2000))["validation"]
SVG_NS = "{http://www.w3.org/2000/svg}"


def _example(index, config=svg_scenes.SceneConfig(), seed=0):
  return svg_scenes.render_example(VOCABULARY[index % len(VOCABULARY)], VOCABULARY, seed, index,
                                   config)


def _svg_strings(svg):
  """The strings of the SVG's <text> elements (including <textPath>), in document order."""
  root = ElementTree.fromstring(svg)
  return ["".join(t.itertext()) for t in root.iter(f"{SVG_NS}text")]


def _ink_columns(image, background):
  """Columns holding pixels that differ from `background` by more than 64 (any channel)."""
  ink = (np.abs(image.astype(int) - np.asarray(background)) > 64).any(axis=(0, 2))
  return np.flatnonzero(ink)


def test_deterministic_per_seed_and_index():
  a, b = _example(5), _example(5)
  assert a["svg"] == b["svg"] and a["image"].tobytes() == b["image"].tobytes()
  assert a["caption"] == b["caption"]
  assert _example(6)["svg"] != a["svg"] and _example(5, seed=1)["svg"] != a["svg"]


def test_captions_quote_exactly_the_svg_text():
  examples = [_example(i) for i in range(100)]
  assert collections.Counter(e["kind"] for e in examples).keys() == set(svg_scenes.KINDS)
  allowed = set(svg_scenes.CAPTION_WORDS)
  for e in examples:
    quoted = re.findall(r'"([^"]*)"', e["caption"])
    assert quoted == _svg_strings(e["svg"]) == e["texts"], e["caption"]
    assert e["text"] == e["texts"][0] and e["text"].lower() == e["word"]
    assert e["image"].shape == (128, 128, 3) and e["image"].dtype == np.uint8
    # Outside the quotes, a caption only uses template words and colour names,
    # which word lists can keep out of validation.
    outside = re.sub(r'"[^"]*"', " ", e["caption"]).lower()
    assert set(re.findall(r"[a-z]+", outside)) <= allowed, e["caption"]
    for name in re.findall(r"\b(?:in|an?) (\w+)\b", outside):
      if name in palette.COLOURS:  # A named colour is drawn in the SVG.
        assert palette.hex_code(name) in e["svg"], (name, e["caption"])


def test_text_contrasts_with_what_it_lies_on():
  """The caption's text colour differs in luma from each colour named behind the text."""
  for i in range(100):
    e = _example(i)
    c = e["caption"]
    text_colour = next(g for g in re.search(r'" in (?:large )?(\w+)|(\w+) stamp', c).groups() if g)
    if e["kind"] in (svg_scenes.SIGN, svg_scenes.BADGE):  # The plate or the badge's shape.
      behind = [re.search(r"(\w+) (?:sign|badge)", c).group(1)]
    else:
      behind = re.search(r"on an? (\w+)(?:-to-(\w+) gradient)? background", c).groups()
    for b in filter(None, behind):
      assert palette.contrast(text_colour, b) >= 0.45, c


def _pil_ink(font, text, size, x, y):
  """Ink columns of `text` drawn by FreeType (PIL) with baseline origin (x, y)."""
  image = Image.new("RGB", (400, 80), "white")
  ImageDraw.Draw(image).text((x, y), text, fill="black", font=render.load_font(font, size),
                             anchor="ls")
  return _ink_columns(np.asarray(image), (255, 255, 255))


FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")


@pytest.mark.parametrize("font", FONTS)
def test_text_is_drawn_with_the_bundled_file(font):
  """resvg's ink of a word spans the columns FreeType (PIL) inks with that file,
  and not those of the other faces."""
  face = font_faces.font_face(font)
  svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="400" height="80">'
         '<rect width="400" height="80" fill="#ffffff"/>'
         f'<text x="10" y="60" font-family="{face.family}" font-weight="{face.weight}" '
         f'font-style="{face.style}" font-size="40" fill="#000000">Maximum</text></svg>')
  columns = _ink_columns(svg_scenes.rasterize(svg, [font]), (255, 255, 255))
  for other in FONTS:
    reference = _pil_ink(other, "Maximum", 40, 10, 60)
    close = abs(columns[0] - reference[0]) <= 2 and abs(columns[-1] - reference[-1]) <= 2
    assert close == (other == font), (other, columns[[0, -1]], reference[[0, -1]])


def test_system_fonts_are_not_used():
  """DejaVu Sans is installed system-wide on many hosts; with only the serif file
  loaded, resvg finds no face for it (a scene never names a family it did not load)."""
  svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="200" height="50">'
         '<rect width="200" height="50" fill="#ffffff"/>'
         '<text x="5" y="40" font-family="DejaVu Sans" font-size="30" fill="#000000">word</text>'
         '</svg>')
  assert _ink_columns(svg_scenes.rasterize(svg, ["DejaVuSans.ttf"]), (255,) * 3).size > 0
  assert _ink_columns(svg_scenes.rasterize(svg, ["DejaVuSerif.ttf"]), (255,) * 3).size == 0


def test_missing_font_raises():
  with pytest.raises(FileNotFoundError, match="NoSuchFont.ttf"):
    _example(0, svg_scenes.SceneConfig(fonts=("NoSuchFont.ttf",)))


def test_font_file_content_decides_the_pixels(tmp_path, monkeypatch):
  """A serif file saved under the sans file's name renders serif: pixels come from the file."""
  shutil.copy(render.font_path("DejaVuSerif-Bold.ttf"), tmp_path / "DejaVuSans-Bold.ttf")
  config = svg_scenes.SceneConfig(fonts=("DejaVuSans-Bold.ttf",), kinds=(svg_scenes.SIGN,))
  sans = _example(3, config)
  serif = _example(3, svg_scenes.SceneConfig(fonts=("DejaVuSerif-Bold.ttf",),
                                             kinds=(svg_scenes.SIGN,)))
  monkeypatch.setattr(render, "font_dir", lambda: str(tmp_path))
  render.load_font.cache_clear()
  try:
    swapped = _example(3, config)
  finally:
    render.load_font.cache_clear()
  assert 'font-family="DejaVu Serif"' in swapped["svg"]
  np.testing.assert_array_equal(swapped["image"], serif["image"])
  assert not np.array_equal(swapped["image"], sans["image"])


def test_size_follows_the_config():
  config = svg_scenes.SceneConfig(height=96, width=160)
  for i in range(10):
    e = _example(i, config)
    assert e["image"].shape == (96, 160, 3)
    assert 'width="160" height="96"' in e["svg"]


def test_ocr_reads_the_upright_scenes():
  """RapidOCR (its own text detector, whole image) reads every quoted string."""
  from charred.evaluation import ocr  # pylint: disable=g-import-not-at-top
  reader = ocr.OcrReader(detect=True, scale=2.0)
  config = svg_scenes.SceneConfig(kinds=(svg_scenes.SIGN, svg_scenes.BADGE, svg_scenes.POSTER,
                                         svg_scenes.STAMP))
  examples = [_example(i, config) for i in range(8)]
  read = reader.read([e["image"] for e in examples])
  hits = [all("".join(t.split()) in r for t in e["texts"]) for e, r in zip(examples, read)]
  assert sum(hits) >= 7, list(zip([e["texts"] for e in examples], read))
  # Scored against another example's strings, nothing matches.
  assert not any(all("".join(t.split()) in r for t in e["texts"])
                 for e, r in zip(examples[1:], read[:-1]))


# The `typography/svg_tiny`-style TFDS config.


def test_builder_stores_the_scenes(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  from charred.datasets import typography  # pylint: disable=g-import-not-at-top
  scene = svg_scenes.SceneConfig(height=64, width=96)
  word_config = words.WordSplitConfig(vocabulary_size=1000, num_validation=16,
                                      train_only=typography.SVG_TINY.words.train_only)
  config = typography.TypographyConfig(
      name="svg_unittest", description="SVG scenes for tests.", scene=scene, words=word_config,
      num_train_examples=48, phrase_probability=0.3, seed=2)
  pipeline.prepare(config, data_dir=str(tmp_path))
  builder = tfds.builder("typography/svg_unittest", data_dir=str(tmp_path))
  read = {split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
          for split in ("train", "validation")}
  splits = words.word_splits(word_config)
  validation = set(splits["validation"])
  assert len(read["train"]) == 48 and len(read["validation"]) == 16
  # Stored examples are the scenes drawn for (seed, split offset + index), PNG-lossless.
  expected = []
  for i in range(16):
    main = " ".join(typography.example_words(config, "validation", i, splits["validation"]))
    e = svg_scenes.render_example(main, splits["validation"], 2, (1 << 32) + i, scene)
    expected.append((e["image"].tobytes(), e["caption"], e["text"], e["font"]))
  stored = [(ex["image"].tobytes(), ex["caption"].decode(), ex["text"].decode(),
             ex["font"].decode()) for ex in read["validation"]]
  assert sorted(stored) == sorted(expected)
  assert {ex["image"].shape for ex in read["train"]} == {(64, 96, 3)}
  # No validation word is spelled anywhere in a training caption.
  for ex in read["train"]:
    assert not set(re.findall(r"[a-z]+", ex["caption"].decode().lower())) & validation
  assert any(" " in ex["text"].decode() for ex in read["train"])  # Some phrases.
  assert typography.Typography(config=typography.SVG_TINY, data_dir=str(tmp_path)).info.features[
      "image"].shape == (128, 128, 3)
