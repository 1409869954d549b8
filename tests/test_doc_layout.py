"""`doc_layout` builder over PubLayNet- and DocLayNet-format fixtures written here.

The fixtures follow the published layouts (see charred/datasets/doc_layout.py): COCO
JSON with PubLayNet's five and DocLayNet's eleven categories, PubLayNet's JPEG pages in
train/ and val/, DocLayNet's PNG pages in PNG/ and its text cells in JSON/<hash>.json.
Pages are drawn with PIL: a grey box per region and its text in black.
"""
import hashlib
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import pytest

from conftest import run_cli

PUBLAYNET_CATEGORIES = ("text", "title", "list", "table", "figure")
DOCLAYNET_CATEGORIES = ("Caption", "Footnote", "Formula", "List-item", "Page-footer",
                        "Page-header", "Picture", "Section-header", "Table", "Text", "Title")
PW, PH = 96, 128  # PubLayNet fixture pages (portrait, as its 612 x 792 pages)
DW = DH = 128  # DocLayNet fixture pages (square, as its 1025 x 1025 renders)
MISSING = "missing"


# Writers.


def draw_page(width, height, regions, fmt):
  """A white page with each region's box, and its cell texts, drawn."""
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  for _, (x, y, w, h), texts in regions:
    draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(160, 160, 160), fill=(235, 235, 235))
    for i, text in enumerate(texts):
      draw.text((x + 1, y + 1 + 10 * i), text, fill="black", font=font)
  buf = io.BytesIO()
  image.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
  return buf.getvalue()


def _rect(x, y, w, h):
  return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def coco_annotations(pages, extra=()):
  """COCO `annotations` rows of `pages` (each region one row), then `extra` (image_id,
  category_id, bbox) rows."""
  rows = []
  for page in pages:
    for category_id, bbox, _ in page["coco_regions"]:
      rows.append((page["id"], category_id, bbox))
  rows.extend(extra)
  return [dict(id=n + 1, image_id=image_id, category_id=category_id, bbox=bbox,
               area=bbox[2] * bbox[3], iscrowd=0, segmentation=_rect(*bbox))
          for n, (image_id, category_id, bbox) in enumerate(rows)]


def _with_ids(page, categories):
  page["coco_regions"] = [(categories.index(c) + 1, b, t) for c, b, t in page["regions"]]
  return page


def write_publaynet(root, split, pages, extra_annotations=()):
  """`<root>/<split>.json` and the pages' JPEGs in `<root>/<split>/`."""
  pages = [_with_ids(dict(p), PUBLAYNET_CATEGORIES) for p in pages]
  os.makedirs(os.path.join(root, split), exist_ok=True)
  for page in pages:
    image = page.get("image", "draw")
    if image == "draw":
      image = draw_page(PW, PH, page["regions"], "JPEG")
    if image != MISSING:
      with open(os.path.join(root, split, page["file_name"]), "wb") as f:
        f.write(image)
  coco = dict(
      images=[dict(file_name=p["file_name"], width=PW, height=PH, id=p["id"]) for p in pages],
      annotations=coco_annotations(pages, extra_annotations),
      categories=[dict(supercategory="", id=i + 1, name=n)
                  for i, n in enumerate(PUBLAYNET_CATEGORIES)])
  with open(os.path.join(root, f"{split}.json"), "w") as f:
    json.dump(coco, f)


def page_hash(n):
  return hashlib.sha256(f"page {n}".encode()).hexdigest()


def cells_json(page):
  """DocLayNet_extra's JSON/<hash>.json of a page: one cell per text line of a region."""
  cells = []
  for _, (x, y, w, h), texts in page["regions"]:
    for i, text in enumerate(texts):
      cells.append(dict(bbox=[x + 1, y + 1 + 10 * i, w - 2, 8], text=text,
                        font=dict(color=[0, 0, 0, 255], name="Helvetica", size=9.0)))
  for text, bbox in page.get("stray_cells", ()):
    cells.append(dict(bbox=bbox, text=text,
                      font=dict(color=[0, 0, 0, 255], name="Helvetica", size=6.0)))
  hash_ = page["file_name"][:-4]
  return dict(
      metadata=dict(page_hash=hash_, original_filename=f"{page['doc_category']}.pdf",
                    page_no=page["id"] + 1, num_pages=20, original_width=612.0,
                    original_height=792.0, coco_width=DW, coco_height=DH,
                    collection="fixture", doc_category=page["doc_category"]),
      cells=cells)


def write_doclaynet(root, split, pages, extra_annotations=(), with_text=True):
  """`<root>/COCO/<split>.json`, PNGs in `<root>/PNG/`, text cells in `<root>/JSON/`."""
  pages = [_with_ids(dict(p), DOCLAYNET_CATEGORIES) for p in pages]
  for folder in ("COCO", "PNG") + (("JSON",) if with_text else ()):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  for page in pages:
    image = page.get("image", "draw")
    if image == "draw":
      image = draw_page(DW, DH, page["regions"], "PNG")
    if image != MISSING:
      with open(os.path.join(root, "PNG", page["file_name"]), "wb") as f:
        f.write(image)
    text = page.get("text", "ok")
    if with_text and text != MISSING:
      if text == "ok":
        text = json.dumps(cells_json(page), ensure_ascii=False).encode()
      with open(os.path.join(root, "JSON", page["file_name"][:-4] + ".json"), "wb") as f:
        f.write(text)
  coco = dict(
      images=[dict(id=p["id"], width=DW, height=DH, file_name=p["file_name"],
                   doc_category=p["doc_category"], collection="fixture",
                   doc_name=f"{p['doc_category']}.pdf", page_no=p["id"] + 1, precedence=0)
              for p in pages],
      annotations=[dict(a, precedence=0) for a in coco_annotations(pages, extra_annotations)],
      categories=[dict(supercategory=n, id=i + 1, name=n)
                  for i, n in enumerate(DOCLAYNET_CATEGORIES)])
  with open(os.path.join(root, "COCO", f"{split}.json"), "w") as f:
    json.dump(coco, f)


# The fixtures: name -> (page, expected caption or skip reason).


def publaynet_cases():
  page = lambda n, regions, **kw: dict(id=100 + n, file_name=f"PMC100000{n}_0000{n}.jpg",
                                       regions=regions, **kw)
  one_column = [("title", [8, 4, 80, 10], []), ("text", [8, 18, 80, 24], []),
                ("text", [8, 46, 80, 16], []), ("table", [8, 66, 80, 14], []),
                ("figure", [8, 94, 80, 28], [])]
  two_columns = [("title", [8, 4, 80, 10], []),
                 ("text", [4, 18, 42, 30], []), ("text", [50, 18, 42, 30], []),
                 ("text", [4, 52, 42, 30], []), ("text", [50, 52, 42, 30], []),
                 ("list", [4, 90, 42, 30], []), ("figure", [50, 90, 42, 14], []),
                 ("figure", [50, 106, 42, 18], [])]
  bad_jpeg = draw_page(PW, PH, one_column, "JPEG")
  return {
      "one_column": (page(1, one_column),
                     "A one-column page of a scientific article with a title at the top, two "
                     "text blocks, a table in the middle and a figure at the bottom."),
      "two_columns": (page(2, two_columns),
                      "A two-column page of a scientific article with a title at the top, four "
                      "text blocks, a list at the bottom and two figures at the bottom."),
      # Half a pixel beyond the right edge: within the tolerance, clipped.
      "figure_only": (page(3, [("figure", [10, 30, 86.5, 60], [])]),
                      "A page of a scientific article with a figure in the middle."),
      "bbox_outside": (page(4, [("text", [-5, 10, 50, 20], [])]), "bbox_outside_image"),
      "missing_image": (page(5, one_column, image=MISSING), "image_missing"),
      "no_annotations": (page(6, []), "no_annotations"),
      "corrupt_image": (page(7, one_column, image=bad_jpeg[:len(bad_jpeg) // 2]),
                        "image_corrupt"),
      "wrong_size": (page(8, one_column, image=draw_page(PW, PH - 8, one_column, "JPEG")),
                     "image_size_mismatch"),
  }


LONG_TITLE = "Installing, configuring and servicing the water pump model X200"


def doclaynet_cases():
  page = lambda n, kind, regions, **kw: dict(id=n, file_name=page_hash(n) + ".png",
                                             doc_category=kind, regions=regions, **kw)
  report = [("Title", [10, 4, 108, 12], ["Annual Report"]),
            ("Section-header", [10, 22, 60, 10], ["Overview"]),
            ("Text", [10, 36, 108, 20], ["Revenue grew", "in 2002."]),
            ("Text", [10, 60, 108, 20], ["Costs fell."]),
            ("Page-footer", [50, 116, 28, 8], ["Page 3"])]
  article = [("Title", [10, 4, 108, 12], ["Deep Layouts"]),
             ("Text", [6, 22, 54, 40], ["Pages have", "regions."]),
             ("Text", [68, 22, 54, 40], ["We label", "them."]),
             ("Section-header", [6, 66, 54, 10], ["Methods"]),
             ("Picture", [68, 66, 54, 30], ["x"]),
             ("Caption", [68, 98, 54, 10], ["Fig. 1: Pages"])]
  manual = [("Title", [4, 4, 120, 12], [LONG_TITLE]),
            ("Section-header", [4, 20, 60, 10], []),  # no text cells: counted
            ("List-item", [8, 34, 112, 10], ["Open the lid."]),
            ("List-item", [8, 46, 112, 10], ["Fill the tank."]),
            ("List-item", [8, 58, 112, 10], ["Close the lid."])]
  law = [("Section-header", [4, 4 + 12 * i, 40, 10], [f"§ {i + 1}"]) for i in range(5)]
  law.append(("Text", [4, 70, 120, 40], ["Unless stated", "otherwise."]))
  good = json.dumps(cells_json(page(5, "patents", report)))
  return {
      "report": (page(0, "financial_reports", report),
                 'A one-column page of a financial report with the title "Annual Report", the '
                 'section header "Overview", two text blocks and a page footer.'),
      "article": (page(1, "scientific_articles", article,
                       stray_cells=[("©", [1, 120, 4, 6])]),  # in no region: ignored
                  'A two-column page of a scientific article with the title "Deep Layouts", '
                  'the section header "Methods", the caption "Fig. 1: Pages", two text blocks '
                  'and a picture in the middle.'),
      "manual": (page(2, "manuals", manual),
                 "A one-column page of a manual with a title at the top, a section header and "
                 "three list items."),
      "law": (page(3, "laws_and_regulations", law),
              'A one-column page of a law or regulation with the section headers "§ 1", "§ 2", '
              '"§ 3" and "§ 4", another section header and a text block.'),
      "text_missing": (page(4, "patents", report, text=MISSING), "text_missing"),
      "text_latin1": (page(5, "patents", report,
                           text=good.replace("Overview", "Aper\xe7u").encode("latin-1")),
                      "text_invalid_utf8"),
      "text_surrogate": (page(6, "patents", report,
                              text=good.replace("Overview", "Aper\\udce7u").encode()),
                         "text_invalid_utf8"),
      "text_truncated": (page(7, "patents", report, text=good.encode()[:300]),
                         "text_unreadable"),
      "bbox_outside": (page(8, "patents", [("Text", [10, 100, 100, 40], ["Low."])]),
                       "bbox_outside_image"),
      "missing_image": (page(9, "patents", report, image=MISSING), "image_missing"),
  }


def _small_doclaynet_page(n, kind, title):
  return dict(id=n, file_name=page_hash(n) + ".png", doc_category=kind,
              regions=[("Title", [10, 4, 108, 12], [title]),
                       ("Text", [10, 30, 108, 40], ["Some text", "on the page."])])


@pytest.fixture(scope="module")
def manual_dirs(tmp_path_factory):
  return write_manual_dirs(tmp_path_factory.mktemp("doc_layout"))


def write_manual_dirs(root):
  """The PubLayNet, DocLayNet and DocLayNet-core fixtures under `root` (a pathlib.Path)."""
  publaynet, doclaynet = str(root / "publaynet"), str(root / "doclaynet")
  pub, doc = publaynet_cases(), doclaynet_cases()
  write_publaynet(publaynet, "train", [p for p, _ in pub.values()],
                  extra_annotations=[(999, 1, [1, 1, 5, 5])])
  write_publaynet(publaynet, "val", [dict(id=201, file_name="PMC2000001_00001.jpg", regions=[
      ("title", [8, 4, 80, 10], []), ("text", [8, 18, 80, 60], [])])])
  write_doclaynet(doclaynet, "train", [p for p, _ in doc.values()],
                  extra_annotations=[(77, 10, [1, 1, 5, 5])])
  write_doclaynet(doclaynet, "val", [_small_doclaynet_page(100, "patents", "Pump")])
  write_doclaynet(doclaynet, "test", [_small_doclaynet_page(200, "government_tenders",
                                                            "Tender 7")])
  core = str(root / "doclaynet_core")  # DocLayNet_core without its extras
  write_doclaynet(core, "val", [_small_doclaynet_page(100, "patents", "Pump")], with_text=False)
  return dict(publaynet=publaynet, doclaynet=doclaynet, core=core, pub=pub, doc=doc)


def _build(config, manual, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from charred.datasets import doc_layout  # pylint: disable=g-import-not-at-top
  builder = doc_layout.DocLayout(config=config, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder


def _read(builder, split, decode=False):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  return {ex["key"].decode(): ex for ex in tfds.as_numpy(ds)}


def _expected_skips(cases, extra):
  counts = dict(extra)
  for _, outcome in cases.values():
    if not outcome.startswith("A "):
      counts[outcome] = counts.get(outcome, 0) + 1
  return counts


@pytest.fixture(scope="module")
def publaynet_built(manual_dirs, tmp_path_factory):
  return _build("publaynet", manual_dirs["publaynet"], str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def doclaynet_built(manual_dirs, tmp_path_factory):
  return _build("doclaynet", manual_dirs["doclaynet"], str(tmp_path_factory.mktemp("tfds")))


def test_publaynet_survivors_captions_and_skips(manual_dirs, publaynet_built):
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  builder, cases = publaynet_built, manual_dirs["pub"]
  train = _read(builder, "train")
  kept = {f"train.json:{p['id']}": caption for p, caption in cases.values()
          if caption.startswith("A ")}
  assert {k: ex["caption"].decode() for k, ex in train.items()} == kept
  report = web_images.read_skip_report(builder.data_dir, "train")
  assert report["skipped"] == _expected_skips(cases, {"annotation_unknown_image": 1})
  assert report["kept"] == 3
  ex = train["train.json:102"]
  assert ex["source"].decode() == "publaynet" and ex["language"].decode() == "en"
  assert ex["doc_category"].decode() == "scientific_articles"
  assert ex["file_name"].decode() == "PMC1000002_00002.jpg" and ex["image_id"] == 102
  assert (ex["width"], ex["height"]) == (PW, PH)
  with open(os.path.join(manual_dirs["publaynet"], "train", "PMC1000002_00002.jpg"), "rb") as f:
    assert ex["image"] == f.read()  # JPEG kept as delivered.
  # Regions in reading order, boxes as [x0, y0, x1, y1].
  assert [c.decode() for c in ex["regions"]["category"]] == [
      "title", "text", "text", "text", "text", "list", "figure", "figure"]
  np.testing.assert_array_equal(ex["regions"]["bbox"][0], [8, 4, 88, 14])
  assert all(t == b"" for t in ex["regions"]["text"])
  clipped = train["train.json:103"]["regions"]["bbox"]
  np.testing.assert_allclose(clipped, [[10, 30, PW, 90]])
  val = _read(builder, "validation", decode=True)
  assert [ex["caption"].decode() for ex in val.values()] == [
      "A one-column page of a scientific article with a title at the top and a text block."]
  assert next(iter(val.values()))["image"].shape == (PH, PW, 3)
  assert set(builder.info.splits) == {"train", "validation"}


def test_doclaynet_quotes_the_text_cells(manual_dirs, doclaynet_built):
  from charred.datasets import web_images  # pylint: disable=g-import-not-at-top
  builder, cases = doclaynet_built, manual_dirs["doc"]
  train = _read(builder, "train")
  kept = {f"train.json:{p['id']}": caption for p, caption in cases.values()
          if caption.startswith("A ")}
  assert {k: ex["caption"].decode() for k, ex in train.items()} == kept
  report = web_images.read_skip_report(builder.data_dir, "train")
  assert report["skipped"] == _expected_skips(cases, {"annotation_unknown_image": 1})
  assert report["kept"] == 4 and report["total_skipped"] == 7
  ex = train["train.json:1"]
  assert [t.decode() for t in ex["regions"]["text"]] == [
      "Deep Layouts", "Pages have regions.", "We label them.", "Methods", "x",
      "Fig. 1: Pages"]
  assert ex["regions"]["category"][-1] == b"Caption"
  assert ex["doc_category"].decode() == "scientific_articles"
  assert ex["source"].decode() == "doclaynet" and ex["language"].decode() == ""
  with open(os.path.join(manual_dirs["doclaynet"], "PNG", page_hash(1) + ".png"), "rb") as f:
    assert ex["image"] == f.read()  # RGB PNG kept as delivered.
  manual = train["train.json:2"]["regions"]["text"]
  assert manual[0].decode() == LONG_TITLE and len(LONG_TITLE) > 60  # stored, not quoted
  assert [ex["caption"].decode() for ex in _read(builder, "validation").values()] == [
      'A one-column page of a patent with the title "Pump" and a text block.']
  assert [ex["caption"].decode() for ex in _read(builder, "test").values()] == [
      'A one-column page of a government tender with the title "Tender 7" and a text block.']


def test_doclaynet_core_alone_captions_the_layout(manual_dirs, tmp_path):
  builder = _build("doclaynet", manual_dirs["core"], str(tmp_path))
  assert [ex["caption"].decode() for ex in _read(builder, "validation").values()] == [
      "A one-column page of a patent with a title at the top and a text block."]
  assert set(builder.info.splits) == {"validation"}


def test_read_cells_scales_and_assigns_to_the_smallest_region(tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from charred.datasets import doc_layout  # pylint: disable=g-import-not-at-top
  path = tmp_path / "page.json"
  path.write_text(json.dumps(dict(
      metadata=dict(coco_width=200, coco_height=100),
      cells=[dict(bbox=[20, 20, 20, 10], text="Table 2 "), dict(bbox=[100, 20, 20, 10],
                                                                text="  cell\n"),
             dict(bbox=[20, 60, 20, 10], text="body")])))
  cells, reason = doc_layout.read_cells(epath.Path(path), 100, 100)
  assert reason is None
  assert [(c.x, c.y, c.text) for c in cells] == [
      (15, 25, "Table 2 "), (55, 25, "  cell\n"), (15, 65, "body")]
  table = doc_layout.FORMATS["doclaynet"].categories[5]
  region = lambda box: doc_layout.Region(table, box)
  # The page-wide region holds every centre; the smaller ones win theirs.
  texts = doc_layout.region_texts(
      [region((0, 0, 100, 100)), region((10, 20, 60, 30)), region((0, 90, 10, 100))], cells)
  assert texts == ["body", "Table 2 cell", ""]


def test_config_is_validated_early():
  from charred.datasets import doc_layout  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"layout_format 'pdf' is not one of"):
    doc_layout.DocLayoutConfig(name="x", layout_format="pdf")
  with pytest.raises(ValueError, match=r"max_quote_chars >= 1"):
    doc_layout.DocLayoutConfig(name="x", max_quote_chars=0)


# Malformed COCO files: one-line errors naming the file and row.


def _coco_error(tmp_path, coco, name="train.json", fmt="publaynet"):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from charred.datasets import doc_layout  # pylint: disable=g-import-not-at-top
  path = tmp_path / name
  path.write_bytes(coco if isinstance(coco, bytes) else json.dumps(coco).encode())
  with pytest.raises(ValueError) as err:
    doc_layout.read_coco(epath.Path(path), doc_layout.FORMATS[fmt])
  assert "\n" not in str(err.value) and str(path) in str(err.value)
  return str(err.value)


def _coco(images=None, annotations=None):
  categories = [dict(supercategory="", id=i + 1, name=n)
                for i, n in enumerate(PUBLAYNET_CATEGORIES)]
  images = images if images is not None else [
      dict(file_name="a.jpg", width=PW, height=PH, id=1)]
  annotations = annotations if annotations is not None else [
      dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5], area=25, iscrowd=0,
           segmentation=_rect(1, 1, 5, 5))]
  return dict(images=images, annotations=annotations, categories=categories)


def test_malformed_coco_files(tmp_path):
  good = json.dumps(_coco()).encode()
  assert "not valid JSON, truncated or malformed (line 1 column" in _coco_error(
      tmp_path, good[:len(good) // 2])
  assert "not UTF-8 (byte" in _coco_error(tmp_path, good.replace(b"a.jpg", b"\xe9.jpg"))
  assert "not a COCO file" in _coco_error(tmp_path, dict(images=[]))
  bad_image = _coco(images=[dict(file_name="a.jpg", height=PH, id=1)])
  assert "images[0]: width None is not a number" in _coco_error(tmp_path, bad_image)
  repeated = _coco(images=[dict(file_name=f"{n}.jpg", width=PW, height=PH, id=1)
                           for n in "ab"])
  assert "images[1]: repeated id 1" in _coco_error(tmp_path, repeated)
  ann = lambda **kw: dict(dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5]), **kw)
  assert "annotations[1]: category_id 9 is not in categories" in _coco_error(
      tmp_path, _coco(annotations=[ann(), ann(category_id=9)]))
  assert "annotations[0]: bbox [1, 1, 5] is not [x, y, width, height]" in _coco_error(
      tmp_path, _coco(annotations=[ann(bbox=[1, 1, 5])]))
  assert "annotations[0]: bbox value 'x' is not a number" in _coco_error(
      tmp_path, _coco(annotations=[ann(bbox=[1, "x", 5, 5])]))
  # PubLayNet's names in a DocLayNet file.
  assert "categories[0]: unknown category 'text' for doclaynet" in _coco_error(
      tmp_path, _coco(), fmt="doclaynet")


def test_truncated_annotation_file_fails_the_build(tmp_path):
  manual = str(tmp_path / "manual")
  write_publaynet(manual, "train", [dict(id=1, file_name="p.jpg",
                                         regions=[("text", [8, 8, 80, 80], [])])])
  path = os.path.join(manual, "train.json")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-40])
  with pytest.raises(ValueError, match=r"train\.json: not valid JSON, truncated or malformed"):
    _build("publaynet", manual, str(tmp_path / "tfds"))


# Prepared as JPEG XL shards and trained on by charred.main.


@pytest.mark.slow
def test_prepare_and_train_ten_steps(tmp_path):
  manual = str(tmp_path / "doclaynet")
  kinds = ("financial_reports", "manuals", "patents", "laws_and_regulations")
  pages = [_small_doclaynet_page(n, kinds[n % 4], f"Title {n}") for n in range(12)]
  write_doclaynet(manual, "train", pages)
  shards = str(tmp_path / "shards")
  proc = run_cli("datasets.prepare", "--builder=doc_layout/doclaynet",
                 f"--manual_dir={manual}", f"--data_dir={tmp_path / 'tfds'}",
                 f"--out={shards}", "--quality=lossless", "--examples_per_shard=5")
  assert proc.stdout.strip().splitlines()[-1].startswith("12 records in 3 shards"), proc.stdout
  with open(os.path.join(shards, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["num_records"] == 12 and manifest["source"]["builder"] == (
      "doc_layout/doclaynet")
  from charred.datasets import doc_layout, jxl_shards  # pylint: disable=g-import-not-at-top
  captions = {r["key"]: r["caption"] for r in jxl_shards.JxlShards(shards)}
  assert captions == {
      f"train.json:{n}": f"A one-column page of {doc_layout.DOCUMENT_KINDS[kinds[n % 4]]} "
                         f'with the title "Title {n}" and a text block.' for n in range(12)}
  workdir = str(tmp_path / "run")
  run_cli("main", "--gin_file=experiments/shards_tiny.gin", "--gin_file=experiments/micro.gin",
          f"--workdir={workdir}", "--gin.TRAIN_STEPS=10", "--gin.CHECKPOINT_EVERY=10",
          "--gin.EVAL_EVERY=0", f"--gin.SHARDS='{shards}'")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]
