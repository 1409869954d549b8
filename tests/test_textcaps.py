"""`textcaps` builder over TextCaps 0.1 + TextVQA Rosetta OCR fixtures with local images."""
import json
import os

import numpy as np
import pytest

from conftest import run_cli
import scene_text_fixtures as sf

TRAIN_JSON, VAL_JSON = "TextCaps_0.1_train.json", "TextCaps_0.1_val.json"
TRAIN_OCR = "TextVQA_Rosetta_OCR_v0.2_train.json"

LISTERINE = ("Five Listerine Zero mouthwash bottles on a store shelf",
             'Five "Listerine Zero" mouthwash bottles on a store shelf')


def _cases():
  """caption_id -> (image_id, caption, OCR words [(word, box)] or None, image?,
  expected caption (default config) or skip reason)."""
  # Rosetta's tokens keep punctuation ('ZERO,'): matched without it.
  listerine_ocr = [("LISTERINE", (0.1, 0.2, 0.4, 0.1)), ("ZERO,", (0.55, 0.2, 0.2, 0.1)),
                   ("ALCOHOL", (0.1, 0.6, 0.5, 0.1))]
  return {
      100000000: ("011e7e629fb9ae7b", LISTERINE[0], listerine_ocr, True, LISTERINE[1]),
      # Already quoted by its writer: kept as written.
      100000001: ("011e7e629fb9ae7b", 'A shelf of bottles that say "zero alcohol".',
                  listerine_ocr, True, 'A shelf of bottles that say "zero alcohol".'),
      # No OCR of this image: kept as written.
      100000002: ("09efcb22ca121f57", "A large clock on a wall.", None, True,
                  "A large clock on a wall."),
      # '10:22' is not one OCR token ('10', '22'); 'a' is too short to quote.
      100000003: ("1a2b3c4d5e6f7a8b", "The time is 10:22 on a Rolex watch.",
                  [("10", (0.3, 0.3, 0.1, 0.1)), ("22", (0.45, 0.3, 0.1, 0.1)),
                   ("a", (0.1, 0.8, 0.05, 0.1)), ("ROLEX", (0.3, 0.6, 0.3, 0.1))], True,
                  'The time is 10:22 on a "Rolex" watch.'),
      100000004: ("2b3c4d5e6f7a8b9c", "A sign far away", [("FAR", (0.9, 0.1, 0.5, 0.1))],
                  True, "bbox_outside_image"),
      100000005: ("3c4d5e6f7a8b9c0d", "A missing photo", None, False, "image_missing"),
      100000006: ("4d5e6f7a8b9c0d1e", f"caf{sf.INVALID_UTF8} sign", None, True,
                  "caption_invalid_utf8"),
      100000007: ("5e6f7a8b9c0d1e2f", "   ", None, True, "caption_empty"),
      100000008: ("6f7a8b9c0d1e2f3a", "A sign", [(f"CAF{sf.INVALID_UTF8}", (0.1, 0.1, 0.2, 0.1))],
                  True, "annotation_invalid_utf8"),
  }


def write_textcaps(d, truncate=False):
  cases = _cases()
  rows, ocr = [], {}
  for n, (caption_id, (image_id, caption, words, has_image, _)) in enumerate(cases.items()):
    rows.append(sf.textcaps_row(image_id, caption_id, caption, 128, 96))
    if words is not None:
      ocr[image_id] = sf.rosetta_row(image_id, words)
    path = os.path.join(d, "train_images", f"{image_id}.jpg")
    if has_image and not os.path.exists(path):
      drawn = [(w, (int(x * 128), int(y * 96))) for w, (x, y, _, _) in words or []
               if sf.INVALID_UTF8 not in w]
      sf.write(path, sf.photo_with_text(128, 96, drawn, seed=n))
  rows.append(sf.textcaps_row("09efcb22ca121f57", 100000002, "A repeated caption id", 128, 96))
  sf.write_json(os.path.join(d, TRAIN_JSON), sf.textcaps_json(rows), truncate=truncate)
  sf.write_json(os.path.join(d, TRAIN_OCR), {"dataset_type": "train", "dataset_name": "textvqa",
                                             "dataset_version": 0.2,
                                             "data": list(ocr.values())})
  sf.write_json(os.path.join(d, VAL_JSON), sf.textcaps_json(
      [sf.textcaps_row("09efcb22ca121f57", 200000000, "A clock, validation.", 128, 96, "val")],
      "val"))
  return cases


def _build(manual, data_dir, config="default"):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import textcaps  # pylint: disable=g-import-not-at-top
  builder = textcaps.TextCaps(config=config, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder


def _read(builder, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return {ex["key"].decode(): ex for ex in tfds.as_numpy(ds)}


def _is_reason(outcome):
  return "_" in outcome and " " not in outcome


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("textcaps"))
  return dict(dir=d, cases=write_textcaps(d))


def test_exact_survivors_captions_and_skips(manual_dir, tmp_path):
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  builder = _build(manual_dir["dir"], str(tmp_path / "tfds"))
  assert set(builder.info.splits) == {"train", "validation"}
  got = _read(builder, "train")
  cases = manual_dir["cases"]
  kept = {str(k): c[4] for k, c in cases.items() if not _is_reason(c[4])}
  assert {k: ex["caption"].decode() for k, ex in got.items()} == kept
  skipped = {}
  for c in cases.values():
    if _is_reason(c[4]):
      skipped[c[4]] = skipped.get(c[4], 0) + 1
  skipped["duplicate_key"] = 1
  report = web_images.read_skip_report(builder.data_dir, "train")
  assert report["skipped"] == skipped and report["kept"] == len(kept)
  listerine = got["100000000"]
  assert [w.decode() for w in listerine["words"]] == ["Listerine Zero"]
  # The union of the two OCR boxes, in pixels of the 128 x 96 image.
  np.testing.assert_allclose(listerine["boxes"], [[0.1 * 128, 0.2 * 96, 0.75 * 128, 0.3 * 96]],
                             rtol=1e-5)
  assert listerine["image_id"].decode() == "011e7e629fb9ae7b"
  assert (listerine["width"], listerine["height"]) == (128, 96)
  assert listerine["source"].decode() == "textcaps" and listerine["language"].decode() == "en"
  assert got["100000002"]["boxes"].shape == (0, 4)
  val = _read(builder, "validation")
  assert [ex["caption"].decode() for ex in val.values()] == ["A clock, validation."]


def test_plain_config_keeps_captions_as_written(manual_dir, tmp_path):
  got = _read(_build(manual_dir["dir"], str(tmp_path / "tfds"), "plain"), "train")
  assert got["100000000"]["caption"].decode() == LISTERINE[0]
  assert got["100000003"]["caption"].decode() == "The time is 10:22 on a Rolex watch."


def test_truncated_json_is_one_line_error(tmp_path):
  write_textcaps(str(tmp_path), truncate=True)
  with pytest.raises(ValueError, match=r"TextCaps_0\.1_train\.json: not valid JSON") as e:
    _build(str(tmp_path), str(tmp_path / "tfds"))
  assert "\n" not in str(e.value)


def test_row_without_caption_names_file_and_row(tmp_path):
  row = sf.textcaps_row("011e7e629fb9ae7b", 1, "x", 64, 64)
  del row["caption_str"]
  sf.write_json(str(tmp_path / TRAIN_JSON), sf.textcaps_json(
      [sf.textcaps_row("011e7e629fb9ae7b", 0, "ok", 64, 64), row]))
  with pytest.raises(ValueError, match=r"TextCaps_0\.1_train\.json: row 1: lacks image_id, "
                     r"caption_id, caption_str"):
    _build(str(tmp_path), str(tmp_path / "tfds"))


def test_ocr_box_without_numbers_names_file_and_row(tmp_path):
  from charred.datasets import textcaps  # pylint: disable=g-import-not-at-top
  bad = sf.rosetta_row("a", [("X", (0.1, 0.1, 0.1, 0.1))])
  bad["ocr_info"][0]["bounding_box"]["width"] = "wide"
  sf.write_json(str(tmp_path / TRAIN_OCR), {"data": [sf.rosetta_row("b", []), bad]})
  with pytest.raises(ValueError, match=r"OCR_v0\.2_train\.json: row 1: ocr_info\[0\]: width: "
                     r"'wide' is not a number"):
    textcaps.read_ocr(tmp_path / TRAIN_OCR)


def test_quote_ocr_words():
  from charred.datasets import textcaps  # pylint: disable=g-import-not-at-top
  caption, phrases = textcaps.quote_ocr_words(
      "A Coca-Cola sign, and COKE. 7 Eleven!", {"coca-cola", "coke", "7", "eleven", ""})
  assert caption == 'A "Coca-Cola" sign, and "COKE". "7 Eleven"!'
  assert phrases == ["Coca-Cola", "COKE", "7 Eleven"]



def test_prepare_finds_the_builder_by_name():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import shard_inputs, textcaps  # pylint: disable=g-import-not-at-top
  shard_inputs.register_builder("textcaps")
  assert tfds.builder_cls("textcaps") is textcaps.TextCaps


@pytest.mark.slow
def test_prepares_shards_that_train_ten_steps(tmp_path):
  manual, shards, workdir = (str(tmp_path / n) for n in ("textcaps", "shards", "run"))
  cases = write_textcaps(manual)
  run_cli("datasets.prepare", "--builder=textcaps", f"--manual_dir={manual}",
          f"--data_dir={tmp_path / 'tfds'}", f"--out={shards}", "--quality=lossless")
  with open(os.path.join(shards, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["num_records"] == sum(not _is_reason(c[4]) for c in cases.values())
  run_cli("main", "--gin_file=experiments/shards_tiny.gin", "--gin_file=experiments/micro.gin",
          f"--workdir={workdir}", "--gin.TRAIN_STEPS=10", "--gin.CHECKPOINT_EVERY=10",
          "--gin.EVAL_EVERY=0", f"--gin.SHARDS='{shards}'")
  assert "10" in os.listdir(os.path.join(workdir, "checkpoints"))
