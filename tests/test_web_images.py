"""Image probing, caption and metadata helpers of the web builders."""
import io
import math

import numpy as np
from PIL import Image
import pytest

from charred.datasets import web_images
import web_fixtures as wf


def _save(image, fmt, **kwargs):
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _tf_decode(data):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # What tfds.features.Image does with stored bytes.
  return tf.image.decode_image(data, channels=3).numpy()


RGB = wf.image_array(40, 30, seed=1)


@pytest.mark.parametrize("name, data, kept_as_is", [
    ("jpeg", _save(Image.fromarray(RGB), "JPEG"), True),
    ("gray_jpeg", _save(Image.fromarray(RGB).convert("L"), "JPEG"), True),
    ("png", _save(Image.fromarray(RGB), "PNG"), True),
    ("palette_png", _save(Image.fromarray(RGB).convert("P"), "PNG"), True),
    ("cmyk_jpeg", _save(Image.fromarray(RGB).convert("CMYK"), "JPEG"), False),
    ("webp", _save(Image.fromarray(RGB), "WEBP", lossless=True), False),
    ("gif", _save(Image.fromarray(RGB).convert("P"), "GIF", save_all=True,
                  append_images=[Image.fromarray(RGB[::-1].copy()).convert("P")]), False),
    ("bmp", _save(Image.fromarray(RGB), "BMP"), False),
    ("tiff", _save(Image.fromarray(RGB), "TIFF"), False),
    ("bilevel_png", _save(Image.fromarray(RGB).convert("1"), "PNG"), False),
    ("transparent_palette_png", _save(Image.fromarray(RGB).convert("P"), "PNG",
                                      transparency=0), False),
], ids=lambda v: v if isinstance(v, str) else "")
def test_probe_yields_what_tensorflow_decodes(name, data, kept_as_is):
  image, reason = web_images.probe_image(data)
  assert reason is None, name
  assert (image.width, image.height) == (40, 30)
  assert (image.data == data) == kept_as_is and image.reencoded != kept_as_is
  assert Image.open(io.BytesIO(image.data)).format in ("JPEG", "PNG")
  decoded = _tf_decode(image.data)
  assert decoded.shape == (30, 40, 3)
  if name in ("bmp", "tiff"):  # Lossless sources: PNG, exactly PIL's pixels.
    np.testing.assert_array_equal(decoded, RGB)
  if name == "webp":  # Lossy or not, WebP becomes a quality-95 JPEG.
    assert Image.open(io.BytesIO(image.data)).format == "JPEG"
    assert np.abs(decoded.astype(int) - RGB).mean() < 3.0


def test_16_bit_png_is_rescaled_not_clipped():
  levels = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
  image, _ = web_images.probe_image(_save(Image.fromarray(levels), "PNG"))
  decoded = _tf_decode(image.data)
  np.testing.assert_array_equal(decoded[..., 0], np.round(levels / 257).astype(np.uint8))


@pytest.mark.parametrize("data, reason", [
    (None, "image_empty"), (b"", "image_empty"), (b"not an image", "image_corrupt"),
    (_save(Image.fromarray(RGB), "JPEG")[:300], "image_corrupt"),
    (_save(Image.fromarray(RGB), "PNG")[:-30], "image_corrupt"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "image_corrupt"),
], ids=["none", "zero_size", "garbage", "truncated_jpeg", "truncated_png", "svg"])
def test_bad_images_are_reasons_not_errors(data, reason):
  assert web_images.probe_image(data) == (None, reason)


def test_read_image_file(tmp_path):
  assert web_images.read_image_file(tmp_path / "nope.jpg") == (None, "image_missing")
  assert web_images.read_image_file(tmp_path) == (None, "image_missing")
  (tmp_path / "a.jpg").write_bytes(b"abc")
  assert web_images.read_image_file(tmp_path / "a.jpg") == (b"abc", None)


def test_decode_caption():
  assert web_images.decode_caption("  Ünïcödé sign \n".encode()) == ("Ünïcödé sign", None)
  assert web_images.decode_caption(b"caf\xe9") == (None, "caption_invalid_utf8")
  # A str read with errors='surrogateescape' carries bad bytes as lone surrogates.
  escaped = b"caf\xe9".decode("utf-8", "surrogateescape")
  assert web_images.decode_caption(escaped) == (None, "caption_invalid_utf8")
  assert web_images.decode_caption(" \t") == (None, "caption_empty")
  assert web_images.decode_caption(None) == (None, "caption_empty")


def test_normalize_language():
  cases = {"en": "en", "EN": "en", "zh-TW": "zh", "zh-cn": "zh", "iw": "he", "in": "id",
           "simple": "en", "pt_BR": "pt", "ceb": "", "nolang": "", "und": "", "": "",
           None: "", "\udcff": ""}
  for code, expected in cases.items():
    assert web_images.normalize_language(code) == expected, code


def test_float_metadata_and_thresholds():
  assert math.isnan(web_images.float_or_nan(None)) and math.isnan(web_images.float_or_nan(" "))
  assert web_images.float_or_nan("0.25") == 0.25 and web_images.float_or_nan(3) == 3.0
  for bad in ("n/a", [1], True):
    with pytest.raises(ValueError, match="is not a number"):
      web_images.float_or_nan(bad)
  assert not web_images.above(float(np.float32(0.8)), 0.8)  # float32 scores vs a float64 limit.
  assert web_images.above(0.8000001, 0.8) and not web_images.above(math.nan, 0.0)


def test_skip_counter_report(tmp_path):
  counter = web_images.SkipCounter()
  for reason in ("image_corrupt", "caption_empty", "image_corrupt"):
    counter.skip(reason)
  counter.keep()
  counter.skip("tar_truncated", 0)
  assert counter.summary("d/c", "train") == (
      "d/c train: kept 1, skipped 3 (caption_empty=1, image_corrupt=2)")
  web_images.write_skip_report(tmp_path, "d/c", "train", counter)
  assert web_images.read_skip_report(tmp_path, "train") == {
      "dataset": "d/c", "split": "train", "kept": 1, "total_skipped": 3,
      "skipped": {"caption_empty": 1, "image_corrupt": 2}}
