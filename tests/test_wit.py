"""`wit_images` builder over WiT TSV fixtures with local images."""
import gzip
import hashlib
import io
import math
import os

import numpy as np
from PIL import Image
import pytest

import web_fixtures as wf

TRAIN_TSV = "wit_v1.train.all-00000-of-00010.tsv.gz"
VAL_TSV = "wit_v1.val.all-00000-of-00005.tsv"
MULTILINE = "Line one\twith a tab\nand \"quotes\" on line two"


def _cases():
  """name -> (row fields, image bytes or None for no file, expected caption or skip reason)."""
  jpeg = lambda seed, w=300, h=260: wf.jpeg(w, h, seed)
  return {
      "reference": (dict(caption_reference_description="The Eiffel Tower at night",
                         caption_alt_text_description="alt", caption_attribution_description="English: attr"),
                    jpeg(0), ("The Eiffel Tower at night", "reference")),
      "alt_text": (dict(caption_alt_text_description="  A map of Paris  "), jpeg(1),
                   ("A map of Paris", "alt_text")),
      "attribution_en": (dict(caption_attribution_description="English: A red square on white"),
                         jpeg(2), ("A red square on white", "attribution")),
      "attribution_fr": (dict(caption_attribution_description="Français : Un carré rouge"),
                         jpeg(3), ("Un carré rouge", "attribution")),
      "attribution_no_language": (dict(caption_attribution_description="Warning: high voltage"),
                                  jpeg(4), ("Warning: high voltage", "attribution")),
      "missing_file": (dict(caption_reference_description="gone"), None, "image_missing"),
      "zero_size": (dict(caption_reference_description="empty"), b"", "image_empty"),
      "corrupt": (dict(caption_reference_description="broken"), jpeg(5)[:700], "image_corrupt"),
      "bad_utf8": (dict(caption_reference_description=f"caf{wf.INVALID_UTF8}"), jpeg(6),
                   "caption_invalid_utf8"),
      "bad_utf8_then_alt": (dict(caption_reference_description=f"x{wf.INVALID_UTF8}",
                                 caption_alt_text_description="fallback"), jpeg(7),
                            ("fallback", "alt_text")),
      "no_caption": (dict(), jpeg(8), "caption_empty"),
      "small": (dict(caption_reference_description="small"), jpeg(9, 200, 300), "image_too_small"),
      "multiline": (dict(caption_reference_description=MULTILINE), jpeg(10),
                    (MULTILINE, "reference")),
      "png_zh": (dict(caption_reference_description="台北的街道", language="zh-TW",
                      image_url="https://upload.wikimedia.org/a/b/Street.PNG", mime_type="image/png",
                      original_width="1600", original_height="1200"),
                 wf.encode(wf.image_array(320, 256, 11), "PNG"), ("台北的街道", "reference")),
      "simple_english": (dict(caption_reference_description="A cat", language="simple"), jpeg(12),
                         ("A cat", "reference")),
  }


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  return write_wit(str(tmp_path_factory.mktemp("wit")))


def write_wit(d):
  """The WiT fixture in `d`: a gzipped train TSV and a validation TSV with their images."""
  cases = _cases()
  rows = []
  for n, (fields, image, _) in enumerate(cases.values()):
    row = wf.wit_row(n, **fields)
    rows.append(row)
    if image is not None:
      wf.write_wit_image(d, row["image_url"], image)
  wf.write_wit_tsv(os.path.join(d, TRAIN_TSV), rows)
  val_rows = [wf.wit_row(100 + i, caption_reference_description=f"validation {i}",
                         language="ceb") for i in range(2)]
  for i, row in enumerate(val_rows):
    wf.write_wit_image(d, row["image_url"], wf.jpeg(256, 256, 50 + i))
  wf.write_wit_tsv(os.path.join(d, VAL_TSV), val_rows)
  return dict(dir=d, cases=cases, rows=rows)


def _build(manual, data_dir, config="default"):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import wit  # pylint: disable=g-import-not-at-top
  builder = wit.WitImages(config=config, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder


def _read(builder, split, decode=False):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  return {ex["key"].decode(): ex for ex in tfds.as_numpy(ds)}


@pytest.fixture(scope="module")
def built(manual_dir, tmp_path_factory):
  builder = _build(manual_dir["dir"], str(tmp_path_factory.mktemp("tfds")))
  return builder, _read(builder, "train"), _read(builder, "train", decode=True)


def test_image_filename_convention():
  from charred.datasets import wit  # pylint: disable=g-import-not-at-top
  url = "https://upload.wikimedia.org/wikipedia/commons/4/4b/La_Tour_Eiffel.JPG"
  assert wit.image_filename(url) == hashlib.sha1(url.encode()).hexdigest() + ".jpg"
  assert wit.image_filename("https://x.org/a/noext?x=1.png") == hashlib.sha1(
      b"https://x.org/a/noext?x=1.png").hexdigest()


def test_exactly_the_good_rows_survive(manual_dir, built):
  _, raw, decoded = built
  names = list(manual_dir["cases"])
  kept = {name: expected for name, (_, _, expected) in manual_dir["cases"].items()
          if isinstance(expected, tuple)}
  assert set(raw) == {f"{TRAIN_TSV}:{names.index(n)}" for n in kept}
  for name, (caption, source) in kept.items():
    ex = raw[f"{TRAIN_TSV}:{names.index(name)}"]
    image = manual_dir["cases"][name][1]
    assert ex["caption"].decode() == caption, name
    assert ex["caption_source"].decode() == source, name
    assert ex["image"] == image, name  # JPEG and opaque PNG bytes are kept as delivered.
    width, height = Image.open(io.BytesIO(image)).size
    assert (ex["width"], ex["height"]) == (width, height)
    assert decoded[f"{TRAIN_TSV}:{names.index(name)}"]["image"].shape == (height, width, 3)
    row = manual_dir["rows"][names.index(name)]
    assert ex["url"].decode() == row["image_url"]
    assert ex["page_title"].decode() == row["page_title"]
    assert (ex["original_width"], ex["original_height"]) == (
        int(row["original_width"]), int(row["original_height"]))
    assert ex["source"].decode() == "wit"
    assert all(math.isnan(ex[k]) for k in ("similarity", "pwatermark", "punsafe",
                                           "aesthetic_score"))
  png = decoded[f"{TRAIN_TSV}:{names.index('png_zh')}"]["image"]
  np.testing.assert_array_equal(png, wf.decode(manual_dir["cases"]["png_zh"][1]))  # Lossless.


def test_languages(manual_dir, built):
  _, raw, _ = built
  names = list(manual_dir["cases"])
  lang = lambda name: raw[f"{TRAIN_TSV}:{names.index(name)}"]["language"].decode()
  assert (lang("reference"), lang("png_zh"), lang("simple_english")) == ("en", "zh", "en")


def test_skip_report_and_validation_split(manual_dir, built):
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  builder, raw, _ = built
  expected = {}
  for _, _, outcome in manual_dir["cases"].values():
    if isinstance(outcome, str):
      expected[outcome] = expected.get(outcome, 0) + 1
  report = web_images.read_skip_report(builder.data_dir, "train")
  assert report["skipped"] == expected and report["kept"] == len(raw)
  assert report["kept"] + report["total_skipped"] == len(manual_dir["cases"])
  val = _read(builder, "validation")
  assert sorted(ex["caption"].decode() for ex in val.values()) == ["validation 0", "validation 1"]
  assert {ex["language"].decode() for ex in val.values()} == {""}  # 'ceb' has no ISO 639-1 code.
  assert set(builder.info.splits) == {"train", "validation"}
  assert web_images.read_skip_report(builder.data_dir, "validation")["skipped"] == {}


# Malformed TSV files: one-line errors naming the file and row.


def _tsv(tmp_path, rows, columns=wf.WIT_COLUMNS, name="wit_v1.train.bad.tsv"):
  path = str(tmp_path / name)
  wf.write_wit_tsv(path, rows, columns)
  return path


def _read_all(path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from charred.datasets import wit  # pylint: disable=g-import-not-at-top
  return list(wit.read_tsv(epath.Path(path)))


def test_missing_columns(tmp_path):
  columns = tuple(c for c in wf.WIT_COLUMNS if c != "mime_type")
  path = _tsv(tmp_path, [[wf.wit_row(0)[c] for c in columns]], columns)
  with pytest.raises(ValueError, match=r"bad\.tsv: header lacks column\(s\) mime_type"):
    _read_all(path)


def test_wrong_number_of_fields(tmp_path):
  rows = [wf.wit_row(0), list(wf.wit_row(1).values())[:16], wf.wit_row(2)]
  # Row 0 holds a quoted newline: row 1 spans lines 4-5.
  with pytest.raises(ValueError, match=r"bad\.tsv: row 1 \(ending on line 5\): expected 17 "
                     r"tab-separated fields, got 16") as err:
    _read_all(_tsv(tmp_path, rows))
  assert "\n" not in str(err.value)


def test_truncated_gzip(tmp_path):
  path = _tsv(tmp_path, [wf.wit_row(i) for i in range(200)], name="wit_v1.train.cut.tsv.gz")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"cut\.tsv\.gz: row \d+: unreadable \(EOFError"):
    _read_all(path)
  with gzip.open(path, "rt") as f, pytest.raises(EOFError):
    f.read()  # The reference: gzip itself rejects the file.


def test_non_numeric_size_fails_the_build(tmp_path):
  manual = str(tmp_path / "manual")
  os.makedirs(manual)
  rows = [wf.wit_row(0, caption_reference_description="ok"),
          wf.wit_row(1, caption_reference_description="ok", original_width="wide")]
  wf.write_wit_tsv(os.path.join(manual, TRAIN_TSV), rows)
  with pytest.raises(ValueError, match=rf"{TRAIN_TSV}: row 1: original_width 'wide' is not"):
    _build(manual, str(tmp_path / "tfds"))


def test_strip_language_prefix():
  from charred.datasets import wit  # pylint: disable=g-import-not-at-top
  cases = {"English: A cat": "A cat", "Deutsch: Eine Katze": "Eine Katze",
           "日本語: 猫": "猫", "Norsk bokmål: En katt": "En katt",
           "Note: not a language": "Note: not a language", "A cat: sitting": "A cat: sitting",
           "English:no space": "English:no space", "12: numbers": "12: numbers"}
  for text, expected in cases.items():
    assert wit.strip_language_prefix(text) == expected, text
