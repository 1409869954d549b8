"""JPEG XL shards: pixel-exact lossless round trip, lossy PSNR, manifest, bad inputs."""
import hashlib
import io
import json
import os
import struct

import msgpack
import numpy as np
from PIL import Image
import pytest

from charred.datasets import jxl_shards
from photo_fixtures import encode, photo, psnr

FAST_LOSSLESS = jxl_shards.JxlSettings(lossless=True, distance=None, effort=1)


def _sources():
  """PIL-made images in several formats and modes: (key, encoded bytes, caption)."""
  rgb = photo(48, 80, seed=1)
  gray = photo(40, 40, seed=2)[..., 0]
  palette = Image.fromarray(photo(36, 60, seed=3)).quantize(32)
  buf = io.BytesIO()
  palette.save(buf, format="png")
  return [
      ("rgb_png", encode(rgb, "png"), "A photo of a fox."),
      ("gray_png", encode(gray, "png"), "Ein Foto in Graustufen."),
      ("palette_png", buf.getvalue(), "Une image à palette."),
      ("rgb_jpeg", encode(photo(64, 48, seed=4), "jpeg", quality=90), "Фотография."),
      ("rgb_webp", encode(photo(30, 70, seed=5), "webp", lossless=True), "写真"),
      ("big", encode(photo(128, 96, seed=6), "png"), "x" * 300),
      ("last", encode(photo(20, 20, seed=7), "png"), ""),
  ]


def _examples():
  return [dict(image=data, caption=caption, key=key, language="en")
          for key, data, caption in _sources()]


def _pil_rgb(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("record_format", jxl_shards.FORMATS)
def test_lossless_round_trip_is_pixel_exact(tmp_path, record_format):
  out = str(tmp_path / "shards")
  manifest = jxl_shards.write_shards(_examples(), out, settings=FAST_LOSSLESS,
                                     record_format=record_format, examples_per_shard=3,
                                     num_workers=2)
  sources = _sources()
  assert manifest["num_records"] == len(sources) and manifest["skipped"] == {}
  assert [s["num_records"] for s in manifest["shards"]] == [3, 3, 1]
  reader = jxl_shards.JxlShards(out, verify=True)
  records = list(reader)
  assert [r["key"] for r in records] == [k for k, _, _ in sources]  # input order kept
  for record, (key, data, caption) in zip(records, sources):
    expected = _pil_rgb(data)
    assert record["image"][:2] == b"\xff\x0a"  # a bare JPEG XL codestream
    pixels = jxl_shards.decode_image(record["image"])
    np.testing.assert_array_equal(pixels, expected, err_msg=key)
    assert (record["height"], record["width"]) == expected.shape[:2]
    assert record["caption"] == caption and record["language"] == "en"
  # The sidecar index matches what PIL says about the sources.
  np.testing.assert_array_equal(reader.index["width"], [_pil_rgb(d).shape[1] for _, d, _ in sources])
  np.testing.assert_array_equal(reader.index["height"], [_pil_rgb(d).shape[0] for _, d, _ in sources])
  np.testing.assert_array_equal(reader.index["caption_bytes"],
                                [len(c.encode("utf-8")) for _, _, c in sources])
  # Random access by global record number, across shards.
  assert [r["key"] for r in reader.read([6, 0, 4])] == ["last", "rgb_png", "rgb_webp"]


def test_transparency_is_composited_over_white(tmp_path):
  rgba = np.dstack([photo(16, 24, seed=8), np.linspace(0, 255, 16 * 24).reshape(16, 24)])
  rgba = rgba.astype(np.uint8)
  jxl_shards.write_shards([dict(image=encode(rgba, "png"), caption="c", key="k")],
                          str(tmp_path / "o"), settings=FAST_LOSSLESS)
  (record,) = jxl_shards.JxlShards(str(tmp_path / "o"))
  alpha = rgba[..., 3:].astype(np.float64) / 255
  expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
  got = jxl_shards.decode_image(record["image"]).astype(np.float64)
  assert np.abs(got - expected).max() <= 1.0  # PIL rounds its 8-bit blend


def test_lossy_is_smaller_and_within_psnr(tmp_path):
  images = [photo(96, 128, seed=s) for s in range(3)]
  examples = [dict(image=encode(a), caption="c", key=str(i)) for i, a in enumerate(images)]
  lossy = jxl_shards.write_shards(
      examples, str(tmp_path / "lossy"), settings=jxl_shards.JxlSettings.parse("1.0", effort=3))
  lossless = jxl_shards.write_shards(examples, str(tmp_path / "lossless"),
                                     settings=FAST_LOSSLESS)
  assert lossy["codec"]["distance"] == 1.0 and not lossy["codec"]["lossless"]
  assert lossy["image_bytes"] < lossless["image_bytes"] / 2
  for record, source in zip(jxl_shards.JxlShards(str(tmp_path / "lossy")), images):
    decoded = jxl_shards.decode_image(record["image"])
    assert decoded.shape == source.shape
    # Lossy but close: about what JPEG at quality 90 gets on these images (30-31 dB).
    assert 28.0 < psnr(decoded, source) < 60.0
  # Smaller distances keep more.
  fine, coarse = (jxl_shards.JxlSettings(distance=d, effort=3) for d in (0.3, 3.0))
  assert (psnr(jxl_shards.decode_image(fine.encode(images[0])), images[0])
          > psnr(jxl_shards.decode_image(coarse.encode(images[0])), images[0]) + 3)


def test_manifest_checksums_counts_and_atomic_write(tmp_path):
  out = tmp_path / "shards"
  manifest = jxl_shards.write_shards(_examples(), str(out), settings=FAST_LOSSLESS,
                                     examples_per_shard=2, split="validation",
                                     source=dict(builder="unit/test"))
  assert sorted(os.listdir(out)) == sorted(
      ["manifest.json"] + [f"validation-{i:05d}.{ext}" for i in range(4)
                           for ext in ("array_record", "index.npy")])
  on_disk = json.loads((out / "manifest.json").read_text())
  assert on_disk == manifest
  for shard in manifest["shards"]:
    data = (out / shard["path"]).read_bytes()
    assert shard["num_bytes"] == len(data)
    assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert shard["index_sha256"] == hashlib.sha256((out / shard["index"]).read_bytes()).hexdigest()
  assert [s["num_records"] for s in manifest["shards"]] == [2, 2, 2, 1]
  assert manifest["total_bytes"] == sum(os.path.getsize(out / s["path"]) for s in manifest["shards"])
  assert manifest["source"] == {"builder": "unit/test", "split": "validation"}
  assert manifest["codec"]["libjxl"].startswith("libjxl") and manifest["codec"]["effort"] == 1
  # Each shard is an ArrayRecord file readable by array_record itself (one record per
  # chunk, for random access), holding msgpack maps.
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(str(out / manifest["shards"][0]["path"]))
  assert "group_size:1" in reader.writer_options_string()
  first = msgpack.unpackb(reader.read([0])[0])
  assert first["key"] == "rgb_png" and first["width"] == 80
  reader.close()


def test_tfrecord_shards_are_read_by_tensorflow(tmp_path):
  tf = pytest.importorskip("tensorflow")
  out = str(tmp_path / "tfr")
  manifest = jxl_shards.write_shards(_examples(), out, settings=FAST_LOSSLESS,
                                     record_format="tfrecord", examples_per_shard=4)
  files = [os.path.join(out, s["path"]) for s in manifest["shards"]]
  by_tf = [r.numpy() for r in tf.data.TFRecordDataset(files)]
  reader = jxl_shards.JxlShards(out)
  assert by_tf == reader.read_bytes(range(len(reader)))
  assert [msgpack.unpackb(r)["key"] for r in by_tf] == [k for k, _, _ in _sources()]


def test_bad_inputs_are_skipped_and_counted(tmp_path):
  good = _examples()[:2]
  jpeg = encode(photo(32, 32, seed=9), "jpeg")
  bad = [
      dict(image=b"not an image at all", caption="corrupt", key="b1"),
      dict(image=jpeg[: len(jpeg) // 2], caption="truncated jpeg", key="b2"),
      dict(image=b"", caption="zero bytes", key="b3"),
      dict(image=np.zeros((0, 16, 3), np.uint8), caption="zero size", key="b4"),
      dict(image=good[0]["image"], caption=b"caf\xe9 latin-1", key="b5"),
      dict(image=good[0]["image"], caption="no key", key=""),
  ]
  manifest = jxl_shards.write_shards([good[0], *bad, good[1]], str(tmp_path / "o"),
                                     settings=FAST_LOSSLESS)
  assert manifest["skipped"] == {"corrupt_image": 2, "empty_image": 2, "invalid_caption": 1,
                                 "missing_key": 1}
  assert manifest["num_examples_read"] == 8 and manifest["num_records"] == 2
  assert [r["key"] for r in jxl_shards.JxlShards(str(tmp_path / "o"))] == ["rgb_png", "gray_png"]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
  out = tmp_path / "o"
  jxl_shards.write_shards(_examples()[:1], str(out), settings=FAST_LOSSLESS)
  with pytest.raises(FileExistsError, match="overwrite"):
    jxl_shards.write_shards(_examples()[:2], str(out), settings=FAST_LOSSLESS)
  assert jxl_shards.read_manifest(str(out))["num_records"] == 1  # untouched
  jxl_shards.write_shards(_examples()[:2], str(out), settings=FAST_LOSSLESS, overwrite=True)
  assert jxl_shards.read_manifest(str(out))["num_records"] == 2


def test_unfinished_or_damaged_output_is_refused(tmp_path):
  out = tmp_path / "o"
  manifest = jxl_shards.write_shards(_examples(), str(out), settings=FAST_LOSSLESS,
                                     record_format="tfrecord", examples_per_shard=4)
  shard = out / manifest["shards"][0]["path"]
  data = shard.read_bytes()
  # A flipped byte keeps the size: only the checksum sees it.
  shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
  jxl_shards.JxlShards(str(out))
  with pytest.raises(ValueError, match="sha256"):
    jxl_shards.JxlShards(str(out), verify=True)
  shard.write_bytes(data[:-10])
  with pytest.raises(ValueError, match="bytes, the manifest says"):
    jxl_shards.JxlShards(str(out))
  (out / "manifest.json").unlink()  # what a writer that died leaves behind
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    jxl_shards.JxlShards(str(out))


def test_tfrecord_offsets_follow_the_published_framing(tmp_path):
  """The TFRecord reader's offsets agree with parsing the framing by hand."""
  out = str(tmp_path / "o")
  manifest = jxl_shards.write_shards(_examples(), out, settings=FAST_LOSSLESS,
                                     record_format="tfrecord", examples_per_shard=10)
  with open(os.path.join(out, manifest["shards"][0]["path"]), "rb") as f:
    data = f.read()
  records, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    records.append(data[pos + 12:pos + 12 + length])
    pos += 16 + length
  assert records == jxl_shards.JxlShards(out).read_bytes(range(7))


def test_quality_strings():
  parse = jxl_shards.JxlSettings.parse
  assert parse("lossless").lossless
  assert parse("1.5").distance == 1.5 and not parse("1.5").lossless
  assert parse("d0.5").distance == 0.5
  assert parse("q90", effort=3) == jxl_shards.JxlSettings(distance=None, quality=90.0, effort=3)
  with pytest.raises(ValueError, match="not 'lossless'"):
    parse("high")


def test_max_pixels_downscales_keeping_aspect(tmp_path):
  source = photo(100, 200, seed=10)
  jxl_shards.write_shards([dict(image=encode(source), caption="c", key="k")],
                          str(tmp_path / "o"), settings=FAST_LOSSLESS, max_pixels=50 * 100)
  (record,) = jxl_shards.JxlShards(str(tmp_path / "o"))
  assert (record["width"], record["height"]) == (100, 50)
  expected = np.asarray(Image.fromarray(source).resize((100, 50), Image.LANCZOS))
  assert np.abs(jxl_shards.decode_image(record["image"]).astype(int) - expected).max() <= 1
