"""`calligraphy`: a labelled folder of images (labels.csv / labels.json) with exact
survivors and per-reason skip counts, and the synthetic source that writes that layout
with the bundled fonts only."""
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os

import numpy as np
from PIL import Image
import pytest

from conftest import run_cli
import web_fixtures as wf

INVALID = wf.INVALID_UTF8  # Written as the bytes b'\xff\xfe'.
HEADER = ("file", "text", "script", "style", "kind", "language")


def _png(width, height, seed):
  return wf.encode(wf.image_array(width, height, seed), "PNG")


def _cases():
  """name -> (row, image bytes or None for no file, expected caption or skip reason)."""
  row = lambda file, text, script="Latin", style="copperplate calligraphy", kind="", \
      language="": dict(file=file, text=text, script=script, style=style, kind=kind,
                        language=language)
  return {
      "word": (row("images/amor.jpg", "amor", kind="word", language="la"), wf.jpeg(120, 48, 0),
               'The word "amor" in Latin script, copperplate calligraphy.'),
      "character": (row("images/yong.png", "永", "Han", "regular-script (kaishu) brush "
                        "calligraphy", language="zh-TW"), _png(64, 64, 1),
                    'The character "永" in Han script, regular-script (kaishu) brush '
                    'calligraphy.'),
      "no_script_quoted": (row("./images//quote.png", 'say "ah", then', "", "brush lettering"),
                           _png(96, 40, 2),
                           'The word "say "ah", then", brush lettering.'),
      "arabic_upper_kind": (row("images/salam.png", "سلام", "Arabic", "", "WORD"),
                            _png(80, 40, 3), 'The word "سلام" in Arabic script.'),
      "missing_image": (row("images/gone.png", "gone"), None, "image_missing"),
      "no_file": (row("", "nothing"), None, "image_missing"),
      "corrupt_image": (row("images/broken.jpg", "broken"), wf.jpeg(120, 48, 4)[:300],
                        "image_corrupt"),
      "empty_image": (row("images/empty.png", "empty"), b"", "image_empty"),
      "small_image": (row("images/small.png", "small"), _png(100, 20, 5), "image_too_small"),
      "text_not_utf8": (row("images/t.png", f"caf{INVALID}"), _png(64, 64, 6),
                        "text_invalid_utf8"),
      "style_not_utf8": (row("images/s.png", "style", style=f"x{INVALID}"), _png(64, 64, 7),
                         "metadata_invalid_utf8"),
      "empty_text": (row("images/e.png", ""), _png(64, 64, 8), "text_empty"),
      "unknown_kind": (row("images/k.png", "amor", kind="sentence"), _png(64, 64, 9),
                       "kind_unknown"),
      "outside": (row("../outside.png", "out"), None, "file_outside_folder"),
      "absolute": (row("/etc/hostname", "abs"), None, "file_outside_folder"),
      "duplicate": (row("images/amor.jpg", "amor again"), None, "duplicate_file"),
  }


def _write_images(folder, cases):
  for fields, image, _ in cases.values():
    if image is not None:
      path = os.path.join(folder, fields["file"])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(image)


def _bad_bytes(text):
  return text.encode("utf-8").replace(INVALID.encode("utf-8"), b"\xff\xfe")


def _write_csv(path, rows, header=HEADER):
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\r\n")  # As Excel and csv's default write it.
  writer.writerow(header)
  writer.writerows([[r[c] for c in header] for r in rows])
  with open(path, "wb") as f:
    f.write(b"\xef\xbb\xbf" + _bad_bytes(text.getvalue()))  # With a BOM.


def _write_json(path, records):
  with open(path, "wb") as f:
    f.write(_bad_bytes(json.dumps(records, ensure_ascii=False, indent=1)))


def _folder(root, fmt):
  cases = _cases()
  os.makedirs(root)
  _write_images(root, cases)
  rows = [fields for fields, _, _ in cases.values()]
  if fmt == "csv":
    _write_csv(os.path.join(root, "labels.csv"), rows)
  else:  # JSON: the optional keys may be absent, unknown keys are ignored.
    records = [{k: v for k, v in r.items() if v or k not in ("kind", "language")}
               for r in rows]
    records[0]["writer"] = "anonymous"
    _write_json(os.path.join(root, "labels.json"), records)
  return cases


def _build(manual, data_dir, config="default"):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  builder = calligraphy.Calligraphy(config=config, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder


def _read(builder, decode=False):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split="train", shuffle_files=False, decoders=decoders)
  return {ex["key"].decode(): ex for ex in tfds.as_numpy(ds)}


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_exact_survivors_and_skip_counts(fmt, tmp_path):
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  cases = _folder(str(tmp_path / "folder"), fmt)
  builder = _build(str(tmp_path / "folder"), str(tmp_path / "tfds"))
  examples = _read(builder)
  kept = {name: c for name, c in cases.items() if c[2].endswith(".")}
  keys = {"no_script_quoted": "images/quote.png"}  # Paths are normalised.
  assert set(examples) == {keys.get(n, c[0]["file"]) for n, c in kept.items()}
  for name, (fields, image, expected) in kept.items():
    ex = examples[keys.get(name, fields["file"])]
    assert ex["caption"].decode() == expected, name
    assert ex["image"] == image, name  # JPEG and PNG bytes are stored as delivered.
    assert (ex["width"], ex["height"]) == Image.open(io.BytesIO(image)).size
    assert ex["text"].decode() == fields["text"] and ex["source"].decode() == "calligraphy"
    assert math.isnan(ex["aesthetic_score"])
  kinds = {n: examples[keys.get(n, c[0]["file"])]["kind"].decode() for n, c in kept.items()}
  assert kinds == dict(word="word", character="character", no_script_quoted="word",
                       arabic_upper_kind="word")
  assert examples["images/yong.png"]["language"].decode() == "zh"
  assert examples["images/amor.jpg"]["language"].decode() == "la"
  expected = {}
  for _, _, outcome in cases.values():
    if not outcome.endswith("."):
      expected[outcome] = expected.get(outcome, 0) + 1
  report = web_images.read_skip_report(builder.data_dir, "train")
  assert report["skipped"] == expected and report["kept"] == len(kept)
  assert report["kept"] + report["total_skipped"] == len(cases)


# Labels files that cannot be used: one-line errors naming the file (and row).


def _labels_error(tmp_path, name, data):
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / "f", exist_ok=True)
  with open(tmp_path / "f" / name, "wb") as f:
    f.write(data)
  with pytest.raises(ValueError) as err:
    _, rows = calligraphy.read_labels(tmp_path / "f")
    list(rows)
  message = str(err.value)
  assert "\n" not in message and str(tmp_path / "f") in message
  return message


def test_truncated_json_names_the_file(tmp_path):
  records = [dict(file=f"{i}.png", text="a", script="Latin", style="") for i in range(20)]
  data = json.dumps(records).encode()
  message = _labels_error(tmp_path, "labels.json", data[: len(data) // 2])
  assert "labels.json: not valid JSON (truncated or malformed: " in message


@pytest.mark.parametrize("records, match", [
    ({"file": "a.png"}, r"labels\.json: expected a list of objects, got dict"),
    ([dict(file="a.png", text="a", script="", style=""), "b.png"],
     r"labels\.json: row 1: expected an object, got str"),
    ([dict(file="a.png", text="a", script="")], r"labels\.json: row 0: no key\(s\) style"),
    ([dict(file="a.png", text=7, script="", style="")],
     r"labels\.json: row 0: text must be a string, got 7"),
])
def test_malformed_json(tmp_path, records, match):
  import re  # pylint: disable=g-import-not-at-top
  assert re.search(match, _labels_error(tmp_path, "labels.json", json.dumps(records).encode()))


def test_malformed_csv(tmp_path):
  message = _labels_error(tmp_path, "labels.csv",
                          b'file,text,script\n"a.png",a,Latin\n')
  assert "labels.csv: header lacks column(s) style (has file, text, script)" in message
  message = _labels_error(tmp_path, "labels.csv",
                          b'file,text,script,style\na.png,"a\nb",Latin,x\nb.png,b,Latin\n')
  assert ("labels.csv: row 1 (ending on line 4): expected 4 comma-separated fields, got 3"
          in message)


def test_exactly_one_labels_file(tmp_path):
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="expected exactly one of labels.csv or labels.json, "
                     "found 0"):
    calligraphy.read_labels(tmp_path)
  for name in ("labels.csv", "labels.json"):
    (tmp_path / name).write_text("")
  with pytest.raises(ValueError, match="found 2"):
    calligraphy.read_labels(tmp_path)


def test_missing_folder_is_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"none does not exist or is empty: it must hold "
                     r"labels\.csv or labels\.json and the images \(or use a synthetic "
                     r"config\)$"):
    _build(str(tmp_path / "none"), str(tmp_path / "tfds"))


# The synthetic source.


def _files(folder):
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      path = os.path.join(root, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def test_synthetic_folder_is_deterministic_and_uses_bundled_fonts(tmp_path):
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  config = calligraphy.SyntheticConfig(num_examples=12, seed=3)
  a, b, c = (str(tmp_path / n) for n in "abc")
  rows = calligraphy.write_synthetic_folder(a, config)
  calligraphy.write_synthetic_folder(b, config)
  calligraphy.write_synthetic_folder(c, calligraphy.SyntheticConfig(num_examples=12, seed=4))
  assert _files(a) == _files(b) and len(_files(a)) == 13  # 12 images and labels.csv.
  assert _files(a)["labels.csv"] != _files(c)["labels.csv"]
  with open(os.path.join(a, "labels.csv"), newline="", encoding="utf-8") as f:
    assert list(csv.DictReader(f)) == rows
  # Every example is its own pure function: rendering one alone gives the same pixels.
  ex = calligraphy.render_example(3, 5, config)
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(a, rows[5]["file"]))),
                                ex["image"])
  assert {r["script"] for r in rows} == {"Latin", "Devanagari", "Arabic"}
  assert {r["kind"] for r in rows} == {"word", "character"}
  for name in calligraphy.WHEEL_FONTS:
    font = calligraphy.FONTS[name]
    package_dir = importlib.util.find_spec(font.package).submodule_search_locations[0]
    path = calligraphy.font_path(name)
    assert os.path.commonpath([path, package_dir]) == package_dir and os.path.isfile(path)
    with open(os.path.join(package_dir, "metadata.json")) as f:
      assert json.load(f)["license"] in ("OFL-1.1", "Apache-2.0")  # Free to redistribute.


def _ink_distances(ex):
  """(each pixel's distance to the example's ink, the paper's distance to it)."""
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  ink_name, paper_name = ex["style"].rsplit(" in ", 1)[1].split(" on ")
  ink = np.asarray(calligraphy.INKS[ink_name])
  return (np.abs(ex["image"].astype(int) - ink).sum(-1),
          np.abs(np.asarray(calligraphy.PAPERS[paper_name]) - ink).sum())


def test_synthetic_examples_show_ink_of_their_script():
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  config = calligraphy.SyntheticConfig(height=48, word_width=160)
  for i in range(12):
    ex = calligraphy.render_example(0, i, config)
    h, w, _ = ex["image"].shape
    assert (h, w) == (48, 160 if ex["kind"] == "word" else 48)
    to_ink, to_paper = _ink_distances(ex)
    assert (to_ink < 0.25 * to_paper).sum() > 20, ex["caption"]  # Ink strokes were drawn.
    assert np.median(to_ink) > 0.8 * to_paper  # On paper.
    assert ex["caption"] == calligraphy.caption(ex["kind"], ex["text"], ex["script"],
                                                ex["style"])
    assert f'"{ex["text"]}" in {ex["script"]} script, ' in ex["caption"]
  from charred.datasets import words  # pylint: disable=g-import-not-at-top
  latin = calligraphy.script_words("Latin", config.vocabulary_size)
  assert len(latin) == config.vocabulary_size
  assert not set(latin) & set(words.word_splits()["validation"])  # Evaluation's words.


def test_synthetic_config_needs_no_files(tmp_path):
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  builder = _build(None, str(tmp_path / "tfds"), config="synthetic_micro")
  examples = _read(builder, decode=True)
  assert len(examples) == 32
  assert web_images.read_skip_report(builder.data_dir, "train")["skipped"] == {}
  first = examples["images/000000.png"]
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  ex = calligraphy.render_example(0, 0, calligraphy.SyntheticConfig(num_examples=32))
  np.testing.assert_array_equal(first["image"], ex["image"])
  assert first["caption"].decode() == ex["caption"]


def test_bad_synthetic_configs_fail_early():
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"SyntheticConfig.fonts: unknown \['comic'\]"):
    calligraphy.SyntheticConfig(fonts=("comic",))
  with pytest.raises(ValueError, match="word_probability must be in"):
    calligraphy.SyntheticConfig(word_probability=2.0)


# Han: the Debian font AR PL UKai, opt-in only.

UKAI = "/usr/share/fonts/truetype/arphic/ukai.ttc"  # fonts-arphic-ukai installs it here.
needs_ukai = pytest.mark.skipif(not os.path.isfile(UKAI), reason="no fonts-arphic-ukai "
                                "(apt-get install fonts-arphic-ukai)")
HAN_STYLE = "regular-script (kaishu) brush calligraphy"


def test_default_fonts_are_the_wheels_only():
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  wheels = ("great_vibes", "dancing_script", "satisfy", "caveat", "kalam", "amiri")
  assert calligraphy.SyntheticConfig().fonts == calligraphy.WHEEL_FONTS == wheels
  for config in (calligraphy.SYNTHETIC, calligraphy.SYNTHETIC_MICRO):
    assert config.synthetic.fonts == wheels  # Their pixels are the same on every machine.
  assert calligraphy.SYNTHETIC_HAN.synthetic.fonts == ("ukai",)
  assert calligraphy.FONTS["ukai"].file == UKAI and calligraphy.FONTS["ukai"].debian


def test_missing_debian_font_is_one_line_and_fails_a_build_early(tmp_path, monkeypatch):
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  gone = str(tmp_path / "ukai.ttc")
  monkeypatch.setitem(calligraphy.FONTS, "ukai",
                      dataclasses.replace(calligraphy.FONTS["ukai"], file=gone))
  expected = ("calligraphy font 'ukai' needs the Debian package fonts-arphic-ukai "
              f"(apt-get install fonts-arphic-ukai): no {gone}")
  with pytest.raises(FileNotFoundError) as err:
    calligraphy.font_path("ukai")
  assert str(err.value) == expected
  with pytest.raises(FileNotFoundError) as err:
    _build(None, str(tmp_path / "tfds"), config="synthetic_han")
  assert str(err.value) == expected
  assert not list((tmp_path / "tfds").rglob("*.png"))  # Nothing was rendered.


def _glyph_has_outline(font, char):
  glyph = font["glyf"][font.getBestCmap()[ord(char)]]
  return glyph.numberOfContours != 0


@needs_ukai
def test_han_characters_and_words_have_glyphs():
  from fontTools import ttLib  # pylint: disable=g-import-not-at-top
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  font = ttLib.TTFont(UKAI, fontNumber=0)  # The face 'AR PL UKai CN' resvg is asked for.
  cmap = font.getBestCmap()
  characters = calligraphy._CHARACTERS["Han"]
  words = calligraphy.script_words("Han", 3000)
  assert len(set(characters)) == len(characters) >= 50 and "永" in characters
  assert len(words) == 3000 and len(set(words)) == 3000
  assert all(2 <= len(w) <= 4 for w in words) and "中国" in words
  for char in set(characters) | set("".join(words)):
    assert "\u4e00" <= char <= "\u9fff" and ord(char) in cmap, char
    assert _glyph_has_outline(font, char), char


@needs_ukai
def test_han_examples_are_drawn_from_the_font_with_ink():
  from PIL import ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  # resvg draws UKai's glyph, not a missing-glyph box: FreeType (PIL) draws the same shape.
  for char in "永书":
    mask = calligraphy._ink_mask(char, "ukai", 96)
    canvas = Image.new("L", (200, 200))
    ImageDraw.Draw(canvas).text((40, 40), char, font=ImageFont.truetype(UKAI, 96), fill=255)
    reference = canvas.crop(canvas.getbbox()).resize(mask.shape[::-1])
    assert np.corrcoef(mask.ravel(), np.asarray(reference, np.float32).ravel())[0, 1] > 0.9
  config = calligraphy.SyntheticConfig(fonts=("ukai",), height=48, word_width=160, seed=5)
  kinds = set()
  for i in range(10):
    ex = calligraphy.render_example(5, i, config)
    kinds.add(ex["kind"])
    assert ex["script"] == "Han" and ex["font"] == "ukai"
    assert ex["language"] == ("zh" if ex["kind"] == "word" else "")
    assert ex["caption"].startswith(f'The {ex["kind"]} "{ex["text"]}" in Han script, '
                                    f'{HAN_STYLE} in ')
    to_ink, to_paper = _ink_distances(ex)
    assert 0.02 < (to_ink < 0.5 * to_paper).mean() < 0.3, ex["caption"]  # Strokes, on paper.
    again = calligraphy.render_example(5, i, config)  # Deterministic.
    np.testing.assert_array_equal(ex["image"], again["image"])
    assert ex["caption"] == again["caption"]
  assert kinds == {"word", "character"}
  other = calligraphy.render_example(6, 0, config)
  assert not np.array_equal(other["image"], calligraphy.render_example(5, 0, config)["image"])


@needs_ukai
def test_synthetic_han_config(tmp_path):
  from charred.datasets import calligraphy, web_images  # pylint: disable=g-import-not-at-top
  builder = _build(None, str(tmp_path / "tfds"), config="synthetic_han")
  examples = _read(builder, decode=True)
  assert len(examples) == 64
  assert web_images.read_skip_report(builder.data_dir, "train")["skipped"] == {}
  assert {ex["script"].decode() for ex in examples.values()} == {"Han"}
  first = examples["images/000000.png"]
  ex = calligraphy.render_example(0, 0, calligraphy.SYNTHETIC_HAN.synthetic)
  np.testing.assert_array_equal(first["image"], ex["image"])
  assert first["caption"].decode() == ex["caption"] and HAN_STYLE in ex["caption"]


@pytest.mark.slow
def test_prepare_and_train_ten_steps_on_synthetic_calligraphy(tmp_path):
  from charred.datasets import calligraphy  # pylint: disable=g-import-not-at-top
  folder, shards, workdir = (str(tmp_path / n) for n in ("folder", "shards", "run"))
  calligraphy.write_synthetic_folder(folder, calligraphy.SyntheticConfig(num_examples=48))
  proc = run_cli("datasets.prepare", "--builder=calligraphy", f"--manual_dir={folder}",
                 f"--data_dir={tmp_path / 'tfds'}", f"--out={shards}", "--quality=lossless",
                 "--examples_per_shard=20")
  assert "48 records in 3 shards" in proc.stdout and "(skipped: none;" in proc.stdout
  with open(os.path.join(shards, "manifest.json")) as f:
    assert json.load(f)["source"]["builder"] == "calligraphy"
  run_cli("main", "--gin_file=experiments/shards_tiny.gin", "--gin_file=experiments/micro.gin",
          f"--workdir={workdir}", "--gin.TRAIN_STEPS=10", "--gin.CHECKPOINT_EVERY=10",
          "--gin.EVAL_EVERY=0", f"--gin.SHARDS='{shards}'")
  steps = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert steps == ["10"]
