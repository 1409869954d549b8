"""`scene_text` builder over ICDAR 2015, COCO-Text v2 and AnyWord-3M fixtures."""
import os

import numpy as np
import pytest

from conftest import run_cli
import scene_text_fixtures as sf

TRAIN_IMAGES = "ch4_training_images"
TRAIN_GT = "ch4_training_localization_transcription_gt"
TEST_IMAGES, TEST_GT = "ch4_test_images", "Challenge4_Test_Task1_GT"


def _box(x, y, text):
  """The box the default PIL font roughly covers for `text` drawn at (x, y)."""
  return (x, y, x + 6 * len(text) + 2, y + 12)


def _icdar_cases():
  """stem -> (words [(text, (x, y))], gt lines or None, image or None, expected caption
  or skip reason). gt lines None: no gt file; image None: no image file."""
  def gt(*words, dont_care=()):
    return [(sf.quad(*_box(x, y, t)), t) for t, (x, y) in words] + [
        (sf.quad(*_box(x, y, "xxxx")), "###") for x, y in dont_care]
  open_hours = [("OPEN", (10, 10)), ("24", (10, 50)), ("HOURS", (30, 50))]
  return {
      "img_1": (open_hours, gt(*open_hours), True,
                'A photo with the text "OPEN" and "24 HOURS".'),
      "img_2": ([("EXIT", (40, 30))], gt(("EXIT", (40, 30)), dont_care=[(60, 70)]), True,
                'A photo with the text "EXIT".'),
      "img_3": ([("Hi, you", (8, 20))], gt(("Hi, you", (8, 20))), True,
                'A photo with the text "Hi, you".'),
      "img_4": ([], gt(dont_care=[(10, 10), (10, 40)]), True, "no_legible_text"),
      "img_5": ([("FAR", (10, 10))], [(sf.quad(100, 10, 300, 30), "FAR")], True,
                "bbox_outside_image"),
      "img_6": ([("GONE", (10, 10))], gt(("GONE", (10, 10))), None, "image_missing"),
      "img_7": ([("LOST", (10, 10))], None, True, "annotation_missing"),
      "img_8": ([("CAFE", (10, 10))], "latin-1", True, "annotation_invalid_utf8"),
      "img_9": ([("BAD", (10, 10))], gt(("BAD", (10, 10))), "corrupt", "image_corrupt"),
      # Annotators' boxes overshoot the border by a pixel or two: clipped, kept.
      "img_10": ([("STOP", (0, 0))], [(sf.quad(-2, -1, 28, 12), "STOP")], True,
                 'A photo with the text "STOP".'),
      "img_11": ([("Café", (10, 30))], gt(("Café", (10, 30))), True,
                 'A photo with the text "Café".'),
  }


def write_icdar(d):
  cases = _icdar_cases()
  for n, (stem, (words, lines, image, _)) in enumerate(cases.items()):
    data = sf.photo_with_text(128, 96, words, seed=n)
    if image == "corrupt":
      data = data[:len(data) // 3]
    if image is not None:
      sf.write(os.path.join(d, TRAIN_IMAGES, f"{stem}.jpg"), data)
    gt_path = os.path.join(d, TRAIN_GT, f"gt_{stem}.txt")
    if lines == "latin-1":
      sf.write_icdar_gt(gt_path, [(sf.quad(*_box(10, 10, "CAFÉ")), "CAFÉ")], "latin-1")
    elif lines is not None:
      sf.write_icdar_gt(gt_path, lines)
  # The test archives reuse the training names: the folders keep them apart.
  sf.write(os.path.join(d, TEST_IMAGES, "img_1.jpg"),
           sf.photo_with_text(96, 128, [("TEST", (10, 10))], seed=99))
  sf.write_icdar_gt(os.path.join(d, TEST_GT, "gt_img_1.txt"),
                    [(sf.quad(*_box(10, 10, "TEST")), "TEST")])
  return cases


def _coco_cases():
  """image id -> (split, words [(text, (x, y), legible)], box override, image?, expected)."""
  return {
      101: ("train", [("OPEN", (10, 10), True), (None, (60, 60), False)], None, True,
            'A photo with the text "OPEN".'),
      102: ("train", [("24", (10, 50), True), ("HOURS", (30, 50), True),
                      ("OPEN", (10, 10), True)], None, True,
            'A photo with the text "OPEN" and "24 HOURS".'),
      103: ("train", [], None, True, "no_legible_text"),
      104: ("train", [(None, (10, 10), False)], None, True, "no_legible_text"),
      105: ("train", [("FAR", (10, 10), True)], [90, 10, 120, 12], True, "bbox_outside_image"),
      106: ("train", [("GONE", (10, 10), True)], None, False, "image_missing"),
      107: ("train", [(f"CAF{sf.INVALID_UTF8}", (10, 10), True)], None, True,
            "annotation_invalid_utf8"),
      108: ("train", [("SALE", (20, 20), True)], None, True, 'A photo with the text "SALE".'),
      109: ("train", [("BUS", (5, 30), True), ("42", (30, 30), True)], None, True,
            'A photo with the text "BUS 42".'),
      201: ("val", [("EXIT", (10, 10), True)], None, True, 'A photo with the text "EXIT".'),
  }


def write_coco_text(d, truncate=False):
  cases = _coco_cases()
  imgs, anns = [], []
  for n, (image_id, (split, words, override, has_image, _)) in enumerate(cases.items()):
    img = sf.coco_text_img(image_id, 128, 96, split)
    imgs.append(img)
    for i, (text, (x, y), legible) in enumerate(words):
      x0, y0, x1, y1 = _box(x, y, text or "xxxx")
      bbox = override or [x0, y0, x1 - x0, y1 - y0]
      anns.append(sf.coco_text_ann(1000 * image_id + i, image_id, bbox, text, legible))
    if has_image:
      drawn = [(t, xy) for t, xy, _ in words if t and sf.INVALID_UTF8 not in t]
      sf.write(os.path.join(d, "train2014", img["file_name"]),
               sf.photo_with_text(128, 96, drawn, seed=n))
  sf.write_json(os.path.join(d, "cocotext.v2.json"), sf.coco_text_json(imgs, anns),
                truncate=truncate)
  return cases


def _anyword_cases():
  """row -> (caption, annotations [(text, (x, y), valid)], image?, polygon override, expected)."""
  return [
      ("a red sign on a brick wall", [("OPEN", (10, 10), True), ("blur", (10, 60), False)],
       True, None, 'a red sign on a brick wall with the text "OPEN".'),
      ("a poster.", [("BIG", (10, 10), True), ("SALE", (40, 10), True)], True, None,
       'a poster with the text "BIG SALE".'),
      ("a shop front", [("FAR", (10, 10), True)], True, [[100, 10], [400, 10], [400, 30],
                                                         [100, 30]], "bbox_outside_image"),
      ("a bus", [("42", (10, 10), True)], False, None, "image_missing"),
      (f"caf{sf.INVALID_UTF8}", [("CAFE", (10, 10), True)], True, None,
       "caption_invalid_utf8"),
      ("a wall", [("smudge", (10, 10), False)], True, None, "no_legible_text"),
      ("", [("EXIT", (30, 30), True)], True, None, 'A photo with the text "EXIT".'),
  ]


def write_anyword(d):
  cases = _anyword_cases()
  items = []
  for n, (caption, annotations, has_image, override, _) in enumerate(cases):
    name = f"{n:06d}.jpg"
    polygons = []
    for text, (x, y), valid in annotations:
      x0, y0, x1, y1 = _box(x, y, text)
      polygons.append((override or [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], text, valid))
    items.append(sf.anyword_item(name, caption, polygons))
    if has_image:
      sf.write(os.path.join(d, "Art", "imgs", name),
               sf.photo_with_text(128, 128, [(t, xy) for t, xy, _ in annotations], seed=n))
  # data_root is a path on AnyText's machines: images are found in Art/imgs/.
  sf.write_json(os.path.join(d, "Art", "data.json"),
                {"data_root": "/data/vdb/yuxiang.tyx/AIGC/data/ocr_data/Art/imgs/",
                 "data_list": items})
  return cases


def _build(config, manual, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import scene_text  # pylint: disable=g-import-not-at-top
  builder = scene_text.SceneText(config=config, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder


def _read(builder, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return {ex["key"].decode(): ex for ex in tfds.as_numpy(ds)}


def _expected_skips(outcomes):
  counts = {}
  for outcome in outcomes:
    if not outcome.startswith(("A photo", "a ")):
      counts[outcome] = counts.get(outcome, 0) + 1
  return counts


def _check(builder, split, expected):
  """Exact survivors and captions, and the skip report, for {key: caption or reason}."""
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  got = _read(builder, split)
  kept = {k: v for k, v in expected.items() if v.startswith(("A photo", "a "))}
  assert {k: ex["caption"].decode() for k, ex in got.items()} == kept
  report = web_images.read_skip_report(builder.data_dir, split)
  assert report["skipped"] == _expected_skips(expected.values())
  assert report["kept"] == len(kept)
  for ex in got.values():
    words = [w.decode() for w in ex["words"]]
    assert ex["caption"].decode().count('"') == 2 * len(words)
    assert all(f'"{w}"' in ex["caption"].decode() for w in words)
    boxes = ex["boxes"]
    assert boxes.shape == (len(words), 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= ex["width"]).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= ex["height"]).all()
    assert ex["language"].decode() == "en"
  return got


def test_icdar2015(tmp_path):
  manual = str(tmp_path / "icdar")
  cases = write_icdar(manual)
  builder = _build("icdar2015", manual, str(tmp_path / "tfds"))
  assert set(builder.info.splits) == {"train", "test"}
  # Keys are image paths, or the gt file's where the image is missing.
  got = _check(builder, "train", {
      f"{TRAIN_IMAGES}/{stem}.jpg" if image else f"{TRAIN_GT}/gt_{stem}.txt": expected
      for stem, (_, _, image, expected) in cases.items()})
  one = got[f"{TRAIN_IMAGES}/img_1.jpg"]
  assert [w.decode() for w in one["words"]] == ["OPEN", "24 HOURS"]
  np.testing.assert_allclose(one["boxes"][1], [10, 50, 30 + 6 * 5 + 2, 62])
  # The overshooting box is clipped to the image.
  np.testing.assert_allclose(got[f"{TRAIN_IMAGES}/img_10.jpg"]["boxes"][0], [0, 0, 28, 12])
  assert one["source"].decode() == "icdar2015"
  _check(builder, "test", {f"{TEST_IMAGES}/img_1.jpg": 'A photo with the text "TEST".'})


def test_icdar2015_malformed_line_names_file_and_line(tmp_path):
  manual = str(tmp_path / "icdar")
  sf.write(os.path.join(manual, TRAIN_IMAGES, "img_1.jpg"), sf.photo_with_text(64, 64, []))
  path = os.path.join(manual, TRAIN_GT, "gt_img_1.txt")
  sf.write(path, "\ufeff1,2,3,4,5,6,7,8,OK\r\n1,2,3,x,5,6,7,8,BAD\r\n".encode())
  with pytest.raises(ValueError, match=r"gt_img_1\.txt: line 2: non-numeric coordinate") as e:
    _build("icdar2015", manual, str(tmp_path / "tfds"))
  assert "\n" not in str(e.value)
  sf.write(path, b"1,2,3,4,OK\n")
  with pytest.raises(ValueError, match=r"gt_img_1\.txt: line 1: expected x1,y1"):
    _build("icdar2015", manual, str(tmp_path / "tfds2"))


def test_coco_text(tmp_path):
  manual = str(tmp_path / "coco")
  cases = write_coco_text(manual)
  builder = _build("coco_text", manual, str(tmp_path / "tfds"))
  assert set(builder.info.splits) == {"train", "validation"}
  got = _check(builder, "train", {str(i): c[4] for i, c in cases.items() if c[0] == "train"})
  assert [w.decode() for w in got["102"]["words"]] == ["OPEN", "24 HOURS"]
  _check(builder, "validation", {"201": 'A photo with the text "EXIT".'})


def test_coco_text_truncated_json_is_one_line_error(tmp_path):
  manual = str(tmp_path / "coco")
  write_coco_text(manual, truncate=True)
  with pytest.raises(ValueError, match=r"cocotext\.v2\.json: not valid JSON") as e:
    _build("coco_text", manual, str(tmp_path / "tfds"))
  assert "\n" not in str(e.value)


def test_coco_text_unknown_annotation_is_an_error(tmp_path):
  manual = str(tmp_path / "coco")
  sf.write_json(os.path.join(manual, "cocotext.v2.json"),
                {"anns": {}, "imgs": {"5": sf.coco_text_img(5, 64, 64)}, "imgToAnns": {"5": [7]}})
  with pytest.raises(ValueError, match=r"imgToAnns\['5'\]: unknown annotation 7"):
    _build("coco_text", manual, str(tmp_path / "tfds"))


def test_anyword(tmp_path):
  manual = str(tmp_path / "anyword")
  cases = write_anyword(manual)
  builder = _build("anyword", manual, str(tmp_path / "tfds"))
  _check(builder, "train", {f"{os.path.join('Art', 'data.json')}:{n}": c[4]
                            for n, c in enumerate(cases)})


def test_phrases_and_captions():
  from charred.datasets import scene_text as st  # pylint: disable=g-import-not-at-top
  words = [st.Word("HOURS", (30, 50, 62, 62)), st.Word("OPEN", (10, 10, 36, 22)),
           st.Word("24", (10, 51, 24, 62)), st.Word("OPEN", (80, 80, 100, 92))]
  phrases = st.reading_order_phrases(words)
  assert [p.text for p in phrases] == ["OPEN", "24 HOURS"]  # The repeated OPEN once.
  assert phrases[1].box == (10, 50, 62, 62)
  assert st.text_caption(["A", "B", "C"]) == 'A photo with the text "A", "B" and "C".'
  assert st.anyword_lead("a sign that says * on it.") == "a sign that says on it"
  assert st.clip_boxes([st.Word("x", (-5, 0, 10, 10))], 100, 100, 0.02) is None
  assert st.clip_boxes([st.Word("x", (-2, 0, 10, 10))], 100, 100, 0.02)[0].box == (0, 0, 10, 10)



def test_prepare_finds_the_builder_by_name():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import scene_text, shard_inputs  # pylint: disable=g-import-not-at-top
  shard_inputs.register_builder("scene_text/coco_text")
  assert tfds.builder_cls("scene_text") is scene_text.SceneText


@pytest.mark.slow
def test_icdar2015_prepares_shards_that_train_ten_steps(tmp_path):
  manual, shards, workdir = (str(tmp_path / n) for n in ("icdar", "shards", "run"))
  write_icdar(manual)
  run_cli("datasets.prepare", "--builder=scene_text/icdar2015", f"--manual_dir={manual}",
          f"--data_dir={tmp_path / 'tfds'}", f"--out={shards}", "--quality=lossless")
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(shards, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["num_records"] == 5
  run_cli("main", "--gin_file=experiments/shards_tiny.gin", "--gin_file=experiments/micro.gin",
          f"--workdir={workdir}", "--gin.TRAIN_STEPS=10", "--gin.CHECKPOINT_EVERY=10",
          "--gin.EVAL_EVERY=0", f"--gin.SHARDS='{shards}'")
  assert "10" in os.listdir(os.path.join(workdir, "checkpoints"))
