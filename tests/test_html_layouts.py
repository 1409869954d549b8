"""HTML/CSS layouts: captions match the page, fonts are the bundled files, OCR reads the pixels.

Tests that need Chromium skip where none is installed (set $CHARRED_CHROMIUM or
`apt-get install chromium`).
"""
import dataclasses
import html.parser
import re

import numpy as np
from PIL import Image, ImageDraw
import pytest

from charred.datasets import chromium
from charred.datasets import font_faces
from charred.datasets import html_layouts
from charred.datasets import render
from charred.datasets import words

VOCABULARY = words.word_splits(words.WordSplitConfig(vocabulary_size=2000))["validation"]
NUM_EXAMPLES = 12


@pytest.fixture(scope="module")
def browser():
  try:
    chromium.find_executable()
  except FileNotFoundError as e:
    pytest.skip(f"No Chromium: {e}")
  with chromium.Chromium() as b:
    yield b


@pytest.fixture(scope="module")
def examples(browser):
  return [_example(i, browser) for i in range(NUM_EXAMPLES)]


def _example(index, browser, config=html_layouts.LayoutConfig(), seed=0):
  return html_layouts.render_example(VOCABULARY[index % len(VOCABULARY)], VOCABULARY, seed,
                                     index, config, browser)


class _StringsOfClassT(html.parser.HTMLParser):
  """The text of each element whose class list holds 't', in document order."""

  def __init__(self):
    super().__init__()
    self.strings, self._open = [], []

  def handle_starttag(self, tag, attrs):
    if "t" in (dict(attrs).get("class") or "").split():
      self._open.append(tag)
      self.strings.append("")

  def handle_endtag(self, tag):
    if self._open and self._open[-1] == tag:
      self._open.pop()

  def handle_data(self, data):
    if self._open:
      self.strings[-1] += data


def _page_strings(page):
  parser = _StringsOfClassT()
  parser.feed(page)
  return parser.strings


def _ink_columns(image, background=(255, 255, 255)):
  ink = (np.abs(image.astype(int) - np.asarray(background)) > 64).any(axis=(0, 2))
  return np.flatnonzero(ink)


# Without Chromium.


def test_missing_chromium_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv(chromium.ENV_VAR, str(tmp_path / "nothing"))
  with pytest.raises(FileNotFoundError, match=chromium.ENV_VAR):
    chromium.find_executable()
  monkeypatch.delenv(chromium.ENV_VAR)
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
    chromium.find_executable()
  monkeypatch.setattr(html_layouts, "_browser", None)
  with pytest.raises(FileNotFoundError, match="No Chromium"):
    html_layouts.render_example("word", VOCABULARY, 0, 0)


def test_missing_font_raises_before_any_browser(monkeypatch):
  monkeypatch.setattr(html_layouts, "default_browser", lambda: pytest.fail("browser started"))
  config = html_layouts.LayoutConfig(fonts=(("NoSuchFont.ttf", "DejaVuSans.ttf"),))
  with pytest.raises(FileNotFoundError, match="NoSuchFont.ttf"):
    html_layouts.render_example("word", VOCABULARY, 0, 0, config)


def test_page_declares_only_the_bundled_files():
  layout = html_layouts.Layout(body="<div class='t'>x</div>", css="", caption="", texts=["x"])
  faces = [font_faces.font_face("DejaVuSerif-Bold.ttf"), font_faces.font_face("DejaVuSans.ttf")]
  page = html_layouts.page(layout, faces, 64, 32, 1.0)
  sources = re.findall(r'src: url\("file://([^"]+)"\)', page)
  assert sources == [render.font_path("DejaVuSerif-Bold.ttf"), render.font_path("DejaVuSans.ttf")]


def test_fits():
  boxes = np.array([[2, 2, 50, 20], [2, 30, 60, 48]], np.float32)
  assert html_layouts.fits(boxes, [False, False], 64, 64)
  assert not html_layouts.fits(boxes, [False, True], 64, 64)  # An element overflows.
  assert not html_layouts.fits(boxes, [False, False], 56, 64)  # Past the right edge.
  assert not html_layouts.fits(boxes, [False, False], 64, 40)  # Past the bottom.
  overlapping = boxes.copy()
  overlapping[1, 1] = 19
  assert not html_layouts.fits(overlapping, [False, False], 64, 64)


# With Chromium.


def test_captions_name_exactly_the_page_strings(examples):
  assert {e["kind"] for e in examples} == set(html_layouts.TEMPLATES)
  allowed = set(html_layouts.CAPTION_WORDS)
  for e in examples:
    assert e["image"].shape == (256, 256, 3) and e["image"].dtype == np.uint8
    assert _page_strings(e["html"]) == e["texts"], e["caption"]
    assert e["text"] == e["texts"][0] and e["text"].lower() == e["word"]
    # Words are quoted as drawn; numbers (prices, counts) appear unquoted.
    quoted = re.findall(r'"([^"]*)"', e["caption"])
    assert quoted == [t for t in e["texts"] if re.search(r"[A-Za-z]", t)], e["caption"]
    outside = re.sub(r'"[^"]*"', " ", e["caption"])
    numbers = re.findall(r"\d+(?:\.\d+)?", outside)
    assert numbers == [t for t in e["texts"] if not re.search(r"[A-Za-z]", t)], e["caption"]
    assert set(re.findall(r"[a-z]+", outside.lower())) <= allowed, e["caption"]


def test_boxes_lie_in_the_image_and_hold_the_ink(examples):
  for e in examples:
    boxes = e["boxes"]
    assert boxes.shape == (len(e["texts"]), 4)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 256).all() and (boxes[:, 3] <= 256).all()
    for (x0, y0, x1, y1) in boxes.astype(int):
      crop = e["image"][y0:y1 + 1, x0:x1 + 1]
      assert (crop != crop[0, 0]).any(axis=-1).sum() > 10  # Text is drawn there.


def test_ocr_reads_each_string_in_its_box(examples):
  """RapidOCR reads every single-line string from its box's crop (paragraphs wrap)."""
  from charred.evaluation import ocr  # pylint: disable=g-import-not-at-top
  reader = ocr.OcrReader(scale=2.0)
  crops, targets = [], []
  for e in examples:
    for text, (x0, y0, x1, y1) in zip(e["texts"], e["boxes"]):
      if e["kind"] == html_layouts.TWO_COLUMN and text != e["text"]:
        continue
      x0, y0 = int(max(0, x0 - 3)), int(max(0, y0 - 3))
      crops.append(e["image"][y0:int(y1) + 4, x0:int(x1) + 4])
      targets.append("".join(text.split()))
  read = reader.read(crops)
  errors = [(t, r) for t, r in zip(targets, read) if t != r]
  assert len(errors) <= 0.05 * len(targets), errors
  assert sum(t == r for t, r in zip(targets[1:], read[:-1])) <= 0.05 * len(targets)


def test_deterministic_across_browsers(examples, browser):
  assert _example(3, browser)["image"].tobytes() == examples[3]["image"].tobytes()
  with chromium.Chromium() as other:
    again = _example(3, other)
  assert again["image"].tobytes() == examples[3]["image"].tobytes()
  assert again["html"] == examples[3]["html"] and again["caption"] == examples[3]["caption"]
  assert _example(3, browser, seed=1)["caption"] != examples[3]["caption"]


FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")


@pytest.mark.parametrize("font", FONTS)
def test_text_is_drawn_with_the_bundled_file(browser, font):
  """Chromium's ink of a word spans the columns FreeType (PIL) inks with that
  file, and not those of the other faces."""
  layout = html_layouts.Layout(
      body='<div class="t word">Maximum</div><div class="t dot">.</div>',
      css=""".word { font-family: "charred-heading"; position: absolute; left: 10px; top: 0;
                     font-size: 40px; line-height: 80px; }
             .dot { font-family: "charred-body"; font-size: 1px; }""",
      caption="", texts=[])
  faces = [font_faces.font_face(font), font_faces.font_face("DejaVuSans.ttf")]
  page = html_layouts.page(layout, faces, 400, 80, 1.0)
  image, _ = browser.screenshot(page, 400, 80)
  columns = _ink_columns(image)
  for other in FONTS:
    reference = Image.new("RGB", (400, 80), "white")
    ImageDraw.Draw(reference).text((10, 40), "Maximum", fill="black",
                                   font=render.load_font(other, 40), anchor="lm")
    expected = _ink_columns(np.asarray(reference))
    close = abs(columns[0] - expected[0]) <= 2 and abs(columns[-1] - expected[-1]) <= 2
    assert close == (other == font), (other, columns[[0, -1]], expected[[0, -1]])


def test_font_that_does_not_load_raises(browser, tmp_path):
  (tmp_path / "broken.ttf").write_bytes(b"not a font")
  broken = (tmp_path / "broken.ttf").as_uri()
  page = (f'<style>@font-face {{ font-family: "x"; src: url("{broken}"); }}</style>'
          '<div style="font-family: x">word</div>')
  with pytest.raises(RuntimeError, match="did not load"):
    browser.screenshot(page, 64, 32)
  # A face the page declares but never uses fails too: its text would be in another font.
  unused = page.replace('<div style="font-family: x">', "<div>")
  with pytest.raises(RuntimeError, match="did not load"):
    browser.screenshot(unused, 64, 32)
  image, _ = browser.screenshot("<p>ok</p>", 64, 32)  # The browser still works.
  assert image.shape == (32, 64, 3)


def test_viewport_size_and_shrinking(browser):
  config = html_layouts.LayoutConfig(height=96, width=160)
  for i in range(4):
    e = _example(i, browser, config)
    assert e["image"].shape == (96, 160, 3)
    assert html_layouts.fits(e["boxes"], [False] * len(e["boxes"]), 160, 96)
  # Long strings in a small viewport: the unit shrinks until they fit, or it is an error.
  long = "nightingales nightingales"
  config = html_layouts.LayoutConfig(height=128, width=128, templates=(html_layouts.BANNER,))
  e = html_layouts.render_example(long, VOCABULARY, 0, 1, config, browser)
  assert e["unit"] < 0.5 and e["text"].lower() == long
  assert html_layouts.fits(e["boxes"], [False] * len(e["boxes"]), 128, 128)
  with pytest.raises(ValueError, match="overflows"):
    html_layouts.render_example(long, VOCABULARY, 0, 1,
                                dataclasses.replace(config, max_attempts=1), browser)


# The `typography/layout_tiny`-style TFDS config.


def test_builder_stores_the_layouts(browser, tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  from charred.datasets import typography  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(html_layouts, "_browser", browser)  # Reuse the running browser.
  layout = html_layouts.LayoutConfig(height=128, width=192)
  word_config = words.WordSplitConfig(vocabulary_size=1000, num_validation=8,
                                      train_only=typography.LAYOUT_TINY.words.train_only)
  config = typography.TypographyConfig(
      name="layout_unittest", description="Layouts for tests.", scene=layout, words=word_config,
      num_train_examples=16, phrase_probability=0.3, seed=2)
  pipeline.prepare(config, data_dir=str(tmp_path))
  builder = tfds.builder("typography/layout_unittest", data_dir=str(tmp_path))
  read = {split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
          for split in ("train", "validation")}
  splits = words.word_splits(word_config)
  assert len(read["train"]) == 16 and len(read["validation"]) == 8
  expected = []
  for i in range(8):
    main = " ".join(typography.example_words(config, "validation", i, splits["validation"]))
    e = html_layouts.render_example(main, splits["validation"], 2, (1 << 32) + i, layout, browser)
    expected.append((e["image"].tobytes(), e["caption"], e["text"]))
  stored = [(ex["image"].tobytes(), ex["caption"].decode(), ex["text"].decode())
            for ex in read["validation"]]
  assert sorted(stored) == sorted(expected)
  validation = set(splits["validation"])
  for ex in read["train"]:
    assert ex["image"].shape == (128, 192, 3)
    assert not set(re.findall(r"[a-z]+", ex["caption"].decode().lower())) & validation
