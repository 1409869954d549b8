"""Renderer, TFDS builder, SeqIO task and input pipeline of the typography data."""
import collections
import hashlib
import re

import numpy as np
import pytest

from charred import tokenizer
from charred.datasets import render
from charred.datasets import words as words_lib

# Small word lists so that 300 train examples cover most train words.
WORDS = words_lib.WordSplitConfig(vocabulary_size=1000, num_validation=40)
NUM_TRAIN = 300
TEXT_LENGTH = 48


def _config():
  from charred.datasets import typography  # pylint: disable=g-import-not-at-top
  return typography.TypographyConfig(
      name="unittest", words=WORDS, num_train_examples=NUM_TRAIN, seed=3,
      description="Tiny config for tests.")


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """The test config generated into two separate data_dirs."""
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  dirs = [str(tmp_path_factory.mktemp(f"tfds{i}")) for i in range(2)]
  for d in dirs:
    pipeline.prepare(_config(), data_dir=d)
  return dirs


def _read_split(data_dir, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("typography/unittest", data_dir=data_dir)
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def _digest(example):
  return hashlib.sha1(example["image"].tobytes() + example["caption"]).hexdigest()


# Renderer (no TF).


def test_render_deterministic_per_seed_and_index():
  a = render.render_example("hello", seed=0, index=7)
  b = render.render_example("hello", seed=0, index=7)
  assert a["image"].shape == (32, 128, 3) and a["image"].dtype == np.uint8
  np.testing.assert_array_equal(a["image"], b["image"])
  assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
  for other in (render.render_example("hello", 0, 8), render.render_example("hello", 1, 7)):
    assert not np.array_equal(a["image"], other["image"])


def test_cases_captions_and_contrast():
  examples = [render.render_example("sign", seed=0, index=i) for i in range(200)]
  cases = collections.Counter(e["case"] for e in examples)
  assert set(cases) == set(render.CASES) and min(cases.values()) > 30, cases
  assert {e["text"] for e in examples} == {"sign", "Sign", "SIGN"}
  for e in examples:
    assert e["caption"] == f'A sign that says "{e["text"]}".'
    assert e["word"] == "sign" and e["fits"]
    assert abs(render.luma(e["text_color"]) - render.luma(e["background_color"])) >= 0.5
    # Text is drawn: both colours are present in quantity.
    assert (e["image"] != e["image"][0, -1]).any(axis=-1).sum() > 20
  assert len({e["font"] for e in examples}) == len(render.RenderConfig().fonts)


def test_apply_case():
  rng = np.random.default_rng(0)
  assert {render.apply_case("new york", rng) for _ in range(100)} == {
      "new york", "New York", "NEW YORK"}
  assert render.apply_case("Word", rng, (0, 0, 1)) == "WORD"


def test_overflow_shrinks_font():
  config = render.RenderConfig(font_size=(20, 20))
  image, style = render.render("WWWWWWWWWWW", np.random.default_rng(0), config)
  assert image.shape == (32, 128, 3)
  assert style["fits"] and style["font_size"] < 20


def test_missing_font_is_a_clear_error():
  assert "DejaVuSansMono.ttf" in render.available_fonts()
  for name in render.ALL_FONTS:
    assert name in render.available_fonts()
  with pytest.raises(FileNotFoundError, match="available"):
    render.render_example("x", 0, 0, render.RenderConfig(fonts=("NoSuchFont.ttf",)))


# TFDS builder.


def test_no_validation_word_in_train_captions(data_dirs):
  from charred.datasets import typography  # pylint: disable=g-import-not-at-top
  validation = {w.lower() for w in words_lib.word_splits(WORDS)["validation"]}
  train = _read_split(data_dirs[0], "train")
  assert len(train) == NUM_TRAIN
  for ex in train:
    caption_words = set(re.findall(r"[a-z]+", ex["caption"].decode().lower()))
    assert not caption_words & validation, ex["caption"]
    assert ex["text"].decode().lower() == ex["word"].decode()
  # The split is drawn from the train list in a seeded order.
  train_words = set(words_lib.word_splits(WORDS)["train"])
  assert {ex["word"].decode() for ex in train} <= train_words
  val = _read_split(data_dirs[0], "validation")
  assert sorted(ex["word"].decode() for ex in val) == sorted(validation)
  buckets = {ex["frequency_bucket"].decode() for ex in train + val}
  assert buckets <= set(words_lib.BUCKETS) and words_lib.UNSEEN in buckets
  assert typography.Typography.BUILDER_CONFIGS[0].name == "tiny"


def test_builder_deterministic_across_data_dirs(data_dirs):
  for split in ("train", "validation"):
    a, b = (sorted(map(_digest, _read_split(d, split))) for d in data_dirs)
    assert a == b


def test_builder_images_equal_renderer(data_dirs):
  """PNG storage is lossless: stored images are exactly `generate_example`'s."""
  from charred.datasets import typography  # pylint: disable=g-import-not-at-top
  config = _config()
  val_words = words_lib.word_splits(WORDS)["validation"]
  expected = []
  for i in range(len(val_words)):
    rendered = typography.generate_example(config, "validation", i, val_words)
    ex = render.render_example(rendered["word"], config.seed, (1 << 32) + i, config.render)
    expected.append(_digest(dict(image=ex["image"], caption=ex["caption"].encode())))
  stored = sorted(map(_digest, _read_split(data_dirs[0], "validation")))
  assert stored == sorted(expected)


# SeqIO task and pipeline.


@pytest.fixture(scope="module")
def task_name(data_dirs):
  from charred.datasets import tasks  # pylint: disable=g-import-not-at-top
  name = tasks.register_typography_task("typography_unittest", "unittest", data_dirs[0])
  assert tasks.register_typography_task("typography_unittest", "unittest", data_dirs[0]) == name
  with pytest.raises(ValueError, match="already registered"):
    tasks.register_typography_task("typography_unittest", "unittest", data_dirs[1])
  return name


def test_task_tokens_match_tokenizer(task_name):
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset({"text_tokens": TEXT_LENGTH}, split="validation", shuffle=False)
  n = 0
  for ex in ds.as_numpy_iterator():
    caption = ex["caption"].decode()
    expected = tokenizer.encode(caption, tokenizer.num_tokens(caption))
    np.testing.assert_array_equal(ex["text_tokens"], expected)
    assert set(ex) >= {"image", "caption", "text", "word", "text_tokens"}
    n += 1
  assert n == WORDS.num_validation
  # Trimming keeps EOS, as append_eos_after_trim promises.
  short = next(task.get_dataset({"text_tokens": 8}, split="validation",
                                shuffle=False).as_numpy_iterator())
  np.testing.assert_array_equal(short["text_tokens"], tokenizer.encode(short["caption"].decode(), 8))


def test_pipeline_batches(task_name):
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_iterator(task_name, "validation", batch_size=16, text_length=TEXT_LENGTH,
                              shuffle=False, repeat=False)
  batches = list(it)
  assert len(batches) == WORDS.num_validation // 16  # drop_remainder
  b = batches[0]
  assert b["image"].shape == (16, 32, 128, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert b["text_tokens"].shape == b["text_mask"].shape == (16, TEXT_LENGTH)
  assert b["text_tokens"].dtype == b["text_mask"].dtype == np.int32
  ids, mask = tokenizer.encode_batch(list(b["caption"]), TEXT_LENGTH)
  np.testing.assert_array_equal(b["text_tokens"], ids)
  np.testing.assert_array_equal(b["text_mask"], mask)
  assert b["caption"].shape == (16,) and isinstance(b["caption"][0], str)


def test_pipeline_resume_is_exact(task_name, data_dirs):
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  kwargs = dict(batch_size=32, text_length=TEXT_LENGTH, seed=5)
  # 300 examples / 32 = 9.4 batches per epoch: batch 10 crosses an epoch boundary.
  it = pipeline.make_iterator(task_name, "train", **kwargs)
  full = [next(it) for _ in range(12)]
  assert it.get_state() == {"next_index": 12}
  # Batch 9 holds the end of epoch 0 and the start of epoch 1; 10 lies in epoch 1.
  for start in (9, 10):
    resumed = pipeline.make_iterator(task_name, "train", start_batch=start, **kwargs)
    for i in range(start, 12):
      batch = next(resumed)
      assert set(batch) == set(full[i])
      for k in batch:
        np.testing.assert_array_equal(batch[k], full[i][k], err_msg=f"batch {i} key {k}")
    assert resumed.get_state() == {"next_index": 12}
  # Every epoch is one full pass over the split, shuffled differently.
  epoch0 = [c for b in full[:9] for c in b["caption"]] + list(full[9]["caption"][:12])
  epoch1 = list(full[9]["caption"][12:]) + [c for b in full[10:] for c in b["caption"]]
  assert len(epoch0) == NUM_TRAIN and epoch0[:len(epoch1)] != epoch1
  train_captions = sorted(ex["caption"].decode() for ex in _read_split(data_dirs[0], "train"))
  assert sorted(epoch0) == train_captions
  resumed.set_state({"next_index": 2})  # what the trainer restores
  np.testing.assert_array_equal(next(resumed)["image"], full[2]["image"])
  other = next(pipeline.make_iterator(task_name, "train", **{**kwargs, "seed": 6}))
  assert list(other["caption"]) != list(full[0]["caption"])
