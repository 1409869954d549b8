"""`laion_hr` builder over img2dataset fixtures, and its SeqIO task."""
import io
import math
import os
import tarfile

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import web_fixtures as wf

MIN_SIDE = 48
GOOD_CAPTION = 'A red "STOP" sign'
UNICODE_CAPTION = "Café «Zürich» – 東京 ☕"


def _rgba_png():
  rgba = wf.image_array(50, 60, seed=12, channels=4)
  rgba[..., 3] = np.linspace(0, 255, 50, dtype=np.uint8)[None, :]  # Alpha ramp.
  return wf.encode(rgba, "PNG")


# Shard 0: one row per case. name -> (row, expected skip reason or None if kept).
def _shard0():
  good = wf.jpeg(64, 80, seed=0)
  return {
      "good": (wf.LaionRow(GOOD_CAPTION, good, similarity=0.31), None),
      "unicode": (wf.LaionRow(UNICODE_CAPTION, wf.jpeg(72, 64, seed=1), language="iw"), None),
      "watermark": (wf.LaionRow("wm", wf.jpeg(64, 64, 2), pwatermark=0.81), "watermark"),
      "at_thresholds": (wf.LaionRow("edge", wf.jpeg(64, 64, 3), pwatermark=0.8, punsafe=0.5,
                                    language="zh-TW"), None),
      "unsafe": (wf.LaionRow("nsfw", wf.jpeg(64, 64, 4), punsafe=0.51), "unsafe"),
      "corrupt": (wf.LaionRow("corrupt", good[: len(good) // 2]), "image_corrupt"),
      "zero_size": (wf.LaionRow("empty", b""), "image_empty"),
      "bad_utf8": (wf.LaionRow("placeholder", wf.jpeg(64, 64, 5), txt=b"caf\xe9 \xff"),
                   "caption_invalid_utf8"),
      "small": (wf.LaionRow("small", wf.jpeg(40, 96, 6)), "image_too_small"),
      "failed": (wf.LaionRow("404", None), "not_downloaded"),
      "gray_no_scores": (wf.LaionRow("gray", wf.jpeg(56, 56, 7, mode="L"), pwatermark=None,
                                     punsafe=None, language="nolang"), None),
      # img2dataset --skip_reencode keeps the original bytes under '.jpg'.
      "webp": (wf.LaionRow("webp", wf.encode(wf.image_array(64, 64, 8), "WEBP", quality=90)),
               None),
      "rgba_png": (wf.LaionRow("logo", _rgba_png()), None),
      "not_in_tar": (wf.LaionRow("lost", wf.jpeg(64, 64, 9), in_tar=False), "missing_from_tar"),
      "large": (wf.LaionRow("large", wf.jpeg(1024, 1024, 10)), None),
  }


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  """Three shards: every case; a truncated tar; a tar without parquet."""
  d = str(tmp_path_factory.mktemp("img2dataset"))
  cases = _shard0()
  keys0 = wf.write_img2dataset_shard(d, 0, [row for row, _ in cases.values()])
  # Shard 1: four good rows; the tar is cut in the middle of the third image.
  rows1 = [wf.LaionRow(f"shard one {i}", wf.jpeg(64, 64, 20 + i)) for i in range(4)]
  keys1 = wf.write_img2dataset_shard(d, 1, rows1)
  tar1 = os.path.join(d, "00001.tar")
  with tarfile.open(tar1) as t:
    third = t.getmember(f"{keys1[2]}.jpg")
  with open(tar1, "r+b") as f:
    f.truncate(third.offset_data + third.size // 2)
  # Shard 2: metadata from the .json members only; one of them unparseable.
  rows2 = [wf.LaionRow("json one", wf.jpeg(64, 64, 30), pwatermark=0.2),
           wf.LaionRow("json two", wf.jpeg(64, 64, 31), pwatermark=0.9),
           wf.LaionRow("json bad", wf.jpeg(64, 64, 32), json=b"{not json")]
  keys2 = wf.write_img2dataset_shard(d, 2, rows2, with_parquet=False)
  return dict(dir=d, cases=cases, keys0=dict(zip(cases, keys0)), rows1=rows1, keys1=keys1,
              rows2=rows2, keys2=keys2)


def _build(manual, data_dir, config):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import laion_hr  # pylint: disable=g-import-not-at-top
  builder = laion_hr.LaionHr(config=config, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder


def _unittest_config():
  from charred.datasets import laion_hr  # pylint: disable=g-import-not-at-top
  return laion_hr.LaionHrConfig(name="unittest", description="Tests.", min_side=MIN_SIDE)


def _read(builder, decode):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split="train", shuffle_files=False, decoders=decoders)
  return {ex["key"].decode(): ex for ex in tfds.as_numpy(ds)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def built(manual_dir, data_dir):
  builder = _build(manual_dir["dir"], data_dir, _unittest_config())
  return builder, _read(builder, decode=False), _read(builder, decode=True)


def test_exactly_the_good_examples_survive(manual_dir, built):
  _, raw, _ = built
  cases, keys0 = manual_dir["cases"], manual_dir["keys0"]
  expected = {keys0[name] for name, (_, reason) in cases.items() if reason is None}
  expected |= set(manual_dir["keys1"][:2])  # Before the damage in the truncated tar.
  expected.add(manual_dir["keys2"][0])  # json metadata, pwatermark 0.2.
  assert set(raw) == expected
  for name, (row, reason) in cases.items():
    if reason is None:
      ex = raw[keys0[name]]
      assert ex["caption"].decode() == row.caption
      assert ex["source"].decode() == "laion_hr"
      assert ex["url"].decode() == f"https://example.com/00000/{list(cases).index(name)}.jpg"
  assert raw[manual_dir["keys2"][0]]["caption"].decode() == "json one"
  assert raw[manual_dir["keys2"][0]]["pwatermark"] == np.float32(0.2)


def test_skip_report_counts_every_reason(manual_dir, built):
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  builder, raw, _ = built
  report = web_images.read_skip_report(builder.data_dir, "train")
  expected = {}
  for _, reason in manual_dir["cases"].values():
    if reason:
      expected[reason] = expected.get(reason, 0) + 1
  expected["tar_truncated"] = 2  # Third and fourth rows of shard 1.
  expected["watermark"] += 1  # Shard 2's second sample (json pwatermark 0.9).
  expected["metadata_missing"] = 1  # Shard 2's unparseable json.
  assert report["skipped"] == expected
  assert report["kept"] == len(raw)
  assert report["total_skipped"] == sum(expected.values())
  assert report["split"] == "train" and report["dataset"] == "laion_hr/unittest"
  # Every input row is accounted for once.
  assert report["kept"] + report["total_skipped"] == len(manual_dir["cases"]) + 4 + 3
  assert builder.info.splits["train"].num_examples == len(raw)


def test_metadata_sizes_and_languages(manual_dir, built):
  _, raw, decoded = built
  cases, keys0 = manual_dir["cases"], manual_dir["keys0"]
  languages = {"good": "en", "unicode": "he", "at_thresholds": "zh", "gray_no_scores": ""}
  for name, language in languages.items():
    assert raw[keys0[name]]["language"].decode() == language
  good = raw[keys0["good"]]
  assert good["similarity"] == np.float32(0.31)
  assert good["pwatermark"] == np.float32(0.1) and good["punsafe"] == np.float32(0.01)
  assert math.isnan(good["aesthetic_score"])
  gray = raw[keys0["gray_no_scores"]]
  assert math.isnan(gray["pwatermark"]) and math.isnan(gray["punsafe"])
  for name, (row, reason) in cases.items():
    if reason is None:
      width, height = Image.open(io.BytesIO(row.image)).size
      ex = raw[keys0[name]]
      assert (ex["width"], ex["height"]) == (width, height), name
      assert (ex["original_width"], ex["original_height"]) == (width, height), name
      assert decoded[keys0[name]]["image"].shape == (height, width, 3), name


def test_images_kept_as_delivered_or_reencoded(manual_dir, built):
  _, raw, decoded = built
  cases, keys0 = manual_dir["cases"], manual_dir["keys0"]
  for name in ("good", "unicode", "gray_no_scores", "large"):
    assert raw[keys0[name]]["image"] == cases[name][0].image, name  # Bytes as delivered.
    want = wf.decode(cases[name][0].image)
    got = decoded[keys0[name]]["image"]
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 2.0, name  # Two JPEG decoders.
  # WebP: re-encoded (TF cannot be trusted with it), close to PIL's decoding.
  webp = raw[keys0["webp"]]["image"]
  assert Image.open(io.BytesIO(webp)).format in ("JPEG", "PNG")
  diff = decoded[keys0["webp"]]["image"].astype(int) - wf.decode(cases["webp"][0].image)
  assert np.abs(diff).mean() < 3.0
  # Transparent PNG: composited over white, losslessly.
  assert Image.open(io.BytesIO(raw[keys0["rgba_png"]]["image"])).format == "PNG"
  rgba = wf.decode(cases["rgba_png"][0].image).astype(np.float64)
  alpha = rgba[..., 3:] / 255
  want = rgba[..., :3] * alpha + 255 * (1 - alpha)
  assert np.abs(decoded[keys0["rgba_png"]]["image"] - want).max() <= 1.0


def test_unfiltered_and_default_thresholds(manual_dir, tmp_path):
  from charred.datasets import laion_hr  # pylint: disable=g-import-not-at-top
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  assert (laion_hr.DEFAULT.max_pwatermark, laion_hr.DEFAULT.max_punsafe,
          laion_hr.DEFAULT.min_side) == (0.8, 0.5, 1024)
  keys0 = manual_dir["keys0"]
  unfiltered = _build(manual_dir["dir"], str(tmp_path / "u"), "unfiltered")
  kept = set(_read(unfiltered, decode=False))
  assert {keys0["watermark"], keys0["unsafe"], keys0["small"],
          manual_dir["keys2"][1]} <= kept
  skipped = web_images.read_skip_report(unfiltered.data_dir, "train")["skipped"]
  assert not {"watermark", "unsafe", "image_too_small"} & set(skipped)
  default = _build(manual_dir["dir"], str(tmp_path / "d"), "default")
  assert set(_read(default, decode=False)) == {keys0["large"]}  # The one 1024 px image.


def test_truncated_tar_reader_keeps_samples_before_the_damage(manual_dir):
  from charred.datasets import webdataset_tar  # pylint: disable=g-import-not-at-top
  got = []
  with pytest.raises(webdataset_tar.TarDamaged, match="00001.tar"):
    for key, members in webdataset_tar.iter_samples(os.path.join(manual_dir["dir"], "00001.tar")):
      got.append((key, members["txt"].decode(), sorted(members)))
  assert got == [(k, f"shard one {i}", ["jpg", "json", "txt"])
                 for i, k in enumerate(manual_dir["keys1"][:2])]
  # Cut between members: tarfile's stream reader stops silently, the marker check does not.
  whole = os.path.join(manual_dir["dir"], "00000.tar")
  with tarfile.open(whole) as t:
    second = t.getmembers()[3]  # First member of the second sample.
  with open(whole, "rb") as f:
    data = f.read(second.offset)
  cut = os.path.join(manual_dir["dir"], "cut.tar.part")
  with open(cut, "wb") as f:
    f.write(data)
  assert not webdataset_tar.has_end_marker(cut) and webdataset_tar.has_end_marker(whole)
  with pytest.raises(webdataset_tar.TarDamaged, match="end-of-archive"):
    list(webdataset_tar.iter_samples(cut))


# Malformed parquet files: one-line errors naming the file and row.


def _write_parquet(path, columns):
  pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize("columns, match", [
    (None, r"bad\.parquet: not a readable parquet file"),
    ({"key": ["1"], "url": ["u"]}, r"bad\.parquet: no column status"),
    ({"key": ["1", "2", None], "status": ["success"] * 3}, r"bad\.parquet: row 2: invalid key"),
    ({"key": ["1", "2", "3", "2"], "status": ["success"] * 4},
     r"bad\.parquet: row 3: duplicate key '2'"),
    ({"key": ["1", "2"], "status": ["success"] * 2, "pwatermark": ["0.1", "n/a"]},
     r"bad\.parquet: row 1: column pwatermark: 'n/a' is not a number"),
])
def test_malformed_parquet_is_a_clear_error(tmp_path, columns, match):
  from charred.datasets import laion_hr  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "bad.parquet")
  if columns is None:
    with open(path, "wb") as f:
      f.write(b"this is not parquet")
  else:
    _write_parquet(path, columns)
  with pytest.raises(ValueError, match=match) as err:
    laion_hr.read_shard_metadata(path)
  assert "\n" not in str(err.value)


def test_malformed_parquet_fails_the_build(tmp_path):
  manual = str(tmp_path / "manual")
  wf.write_img2dataset_shard(manual, 0, [wf.LaionRow("a", wf.jpeg(64, 64))])
  _write_parquet(os.path.join(manual, "00000.parquet"), {"key": ["0", "0"], "status": ["a", "b"]})
  with pytest.raises(ValueError, match=r"00000\.parquet: row 1: duplicate key"):
    _build(manual, str(tmp_path / "tfds"), _unittest_config())


# SeqIO task.


def test_source_task_tokenizes_captions(built, data_dir):
  import seqio  # pylint: disable=g-import-not-at-top
  from charred.datasets import source_tasks  # pylint: disable=g-import-not-at-top
  builder, raw, _ = built
  tfds_name = f"laion_hr/unittest:{builder.VERSION}"
  name = source_tasks.register_source_task("laion_hr_unittest", tfds_name, data_dir)
  assert source_tasks.register_source_task("laion_hr_unittest", tfds_name, data_dir) == name
  with pytest.raises(ValueError, match="already registered"):
    source_tasks.register_source_task("laion_hr_unittest", tfds_name, data_dir,
                                      decode_image=False)
  task = seqio.get_mixture_or_task(name)
  length = 16  # Trims the longer captions, not the shorter ones.
  seen = set()
  for ex in task.get_dataset({"text_tokens": length}, split="train",
                             shuffle=False).as_numpy_iterator():
    caption = ex["caption"].decode()
    # ByT5 by hand: byte b -> b + 3, at most length - 1 bytes, then EOS = 1.
    expected = [b + 3 for b in caption.encode("utf-8")][: length - 1] + [1]
    assert ex["text_tokens"].tolist() == expected
    assert set(ex) == {"text_tokens", "image", "caption", "language", "width", "height", "key"}
    assert ex["image"].shape == (ex["height"], ex["width"], 3)
    seen.add(caption)
  assert seen == {ex["caption"].decode() for ex in raw.values()}
  assert {len(c.encode()) < length for c in seen} == {True, False}


def test_source_preprocessors_see_the_metadata(built, data_dir):
  import seqio  # pylint: disable=g-import-not-at-top
  from charred.datasets import source_tasks  # pylint: disable=g-import-not-at-top
  builder, raw, _ = built
  low_watermark = lambda ds: ds.filter(lambda ex: ex["pwatermark"] < 0.15)
  name = source_tasks.register_source_task(
      "laion_hr_unittest_filtered", f"laion_hr/unittest:{builder.VERSION}", data_dir,
      decode_image=False, source_preprocessors=[low_watermark])
  got = [ex for ex in seqio.get_mixture_or_task(name).get_dataset(
      {"text_tokens": 32}, split="train", shuffle=False).as_numpy_iterator()]
  assert {ex["key"].decode() for ex in got} == {
      k for k, ex in raw.items() if ex["pwatermark"] < np.float32(0.15)}  # NaN fails too.
  assert all(ex["image"] == raw[ex["key"].decode()]["image"] for ex in got)  # Still encoded.
