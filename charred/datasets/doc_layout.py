"""`doc_layout` TFDS builder: PubLayNet and DocLayNet pages with captions of their layout.

Nothing is downloaded: `manual_dir` holds a dataset as its publisher unpacks it. Both use
COCO's JSON: `images` [{id, file_name, width, height, ...}], `annotations` [{id,
image_id, category_id, bbox [x, y, w, h] in image pixels, area, iscrowd, segmentation,
...}] and `categories` [{id, name, supercategory}].

- config `publaynet` (PubLayNet, IBM 2019, pages of PubMed Central articles, JPEG):
  `<manual_dir>/train.json` and `val.json`, images in `train/` and `val/` (the test
  images have no annotations and are not read). Categories: 1 text, 2 title, 3 list,
  4 table, 5 figure. The pages carry no text layer: captions state the layout only.
- config `doclaynet` (DocLayNet, IBM 2022, 1025 x 1025 PNG renders of pages of six
  document kinds): DocLayNet_core's `COCO/{train,val,test}.json` with the images in
  `PNG/`; images also carry doc_category, collection, doc_name, page_no and precedence.
  Categories: 1 Caption, 2 Footnote, 3 Formula, 4 List-item, 5 Page-footer,
  6 Page-header, 7 Picture, 8 Section-header, 9 Table, 10 Text, 11 Title.
  DocLayNet_extra's `JSON/<page hash>.json` (the hash is the PNG's file name) holds the
  page's PDF text cells: {"metadata": {page_hash, original_filename, page_no, num_pages,
  original_width, original_height, coco_width, coco_height, collection, doc_category},
  "cells": [{bbox [x, y, w, h] in COCO image pixels, text, font {color, name, size}}]}.
  A cell belongs to the smallest annotation box holding its centre, and a region's text
  is its cells' texts in file order, so captions quote titles, section headers and
  figure captions verbatim. Without a `JSON/` folder (core only), captions state the
  layout as for PubLayNet.
Formats as published by the datasets' READMEs; DocLayNet's fields as its Hugging Face
loading script (ds4sd/DocLayNet, DocLayNet.py) reads the core files and as the
DocLayNet-v1.2 card lists the extras' `pdf_cells` and `metadata`.

Captions name the page's column count (from its text blocks), its document kind, and
every region: quoted text where the region is quotable and short (see
`DocLayoutConfig`), else counted, with where on the page titles, lists, tables and
figures lie, e.g. 'A two-column page of a scientific article with a title at the top,
four text blocks, a table in the middle and a figure at the bottom.' or 'A one-column
page of a financial report with the title "Annual Report 2002", the section header
"Overview", two text blocks and a page footer.'. Splits: train, validation (val.json),
test (DocLayNet only). Keys: '<json file name>:<image id>'.

Bad pages are skipped and counted by reason in
`<data_dir>/doc_layout/<config>/<version>/skipped_<split>.json`, one reason per page, the
first check that fails in this order: 'no_annotations', 'bbox_outside_image' (an
annotation box beyond the image by more than `bbox_tolerance` px), the image reasons of
`web_images` (image_missing, image_corrupt, ...), 'image_size_mismatch' (decoded size is
not the entry's width x height), and for DocLayNet with a `JSON/` folder 'text_missing'
(no page file), 'text_unreadable' (not JSON, or cells without bbox and text) and
'text_invalid_utf8' (bytes that are not UTF-8, or an escaped lone surrogate). Annotations whose image_id names no image are counted as
'annotation_unknown_image' (so kept + skipped = images + such annotations). A COCO
file that is not UTF-8 JSON (e.g. truncated), lacks the three lists, has an unknown or
repeated category, or has a malformed images/annotations row (missing or non-numeric
field, repeated image id, unknown category id) raises ValueError naming the file and
row (rows count from 0). COCO files are read whole (PubLayNet's train.json takes GBs
of memory).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any, Iterator, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from charred.datasets import web_images

PUBLAYNET, DOCLAYNET = "publaynet", "doclaynet"

IMAGE_SIZE_MISMATCH = "image_size_mismatch"
NO_ANNOTATIONS = "no_annotations"
BBOX_OUTSIDE_IMAGE = "bbox_outside_image"
TEXT_MISSING = "text_missing"
TEXT_UNREADABLE = "text_unreadable"
TEXT_INVALID_UTF8 = "text_invalid_utf8"
ANNOTATION_UNKNOWN_IMAGE = "annotation_unknown_image"


@dataclasses.dataclass(frozen=True)
class Category:
  """A layout category as its COCO file names it and as captions phrase it.

  Attributes:
    name: the category's `name` in the COCO file.
    noun, plural: how captions call one region, several.
    quoted: captions quote the region's text (when known and short).
    placed: captions say where on the page such regions lie.
    body: running text, which decides the page's column count.
  """
  name: str
  noun: str
  plural: str
  quoted: bool = False
  placed: bool = False
  body: bool = False


@dataclasses.dataclass(frozen=True)
class LayoutFormat:
  """Where a dataset keeps its files, and its categories in caption order."""
  source: str
  categories: tuple[Category, ...]
  annotation_files: tuple[tuple[str, str], ...]  # (path under manual_dir, split)
  images_dir: str | None  # None: the folder named as the JSON file's stem.
  text_dir: str | None  # Folder of per-page text cells, if the dataset has one.
  language: str
  homepage: str


FORMATS = {
    PUBLAYNET: LayoutFormat(
        source=PUBLAYNET,
        categories=(
            Category("title", "title", "titles", placed=True),
            Category("text", "text block", "text blocks", body=True),
            Category("list", "list", "lists", placed=True, body=True),
            Category("table", "table", "tables", placed=True),
            Category("figure", "figure", "figures", placed=True),
        ),
        annotation_files=(("train.json", "train"), ("val.json", "validation")),
        images_dir=None, text_dir=None, language="en",
        homepage="https://github.com/ibm-aur-nlp/PubLayNet"),
    DOCLAYNET: LayoutFormat(
        source=DOCLAYNET,
        categories=(
            Category("Title", "title", "titles", quoted=True, placed=True),
            Category("Section-header", "section header", "section headers", quoted=True),
            Category("Caption", "caption", "captions", quoted=True),
            Category("Text", "text block", "text blocks", body=True),
            Category("List-item", "list item", "list items", body=True),
            Category("Table", "table", "tables", placed=True),
            Category("Picture", "picture", "pictures", placed=True),
            Category("Formula", "formula", "formulas", placed=True),
            Category("Footnote", "footnote", "footnotes"),
            Category("Page-header", "page header", "page headers"),
            Category("Page-footer", "page footer", "page footers"),
        ),
        annotation_files=(("COCO/train.json", "train"), ("COCO/val.json", "validation"),
                          ("COCO/test.json", "test")),
        images_dir="PNG", text_dir="JSON", language="",
        homepage="https://github.com/DS4SD/DocLayNet"),
}

# DocLayNet's doc_category values; PubLayNet's pages are all scientific articles.
DOCUMENT_KINDS = {
    "financial_reports": "a financial report", "scientific_articles": "a scientific article",
    "laws_and_regulations": "a law or regulation", "government_tenders": "a government tender",
    "manuals": "a manual", "patents": "a patent",
}
_PUBLAYNET_KIND = "scientific_articles"

_NUMBERS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_THIRDS = ("at the top", "in the middle", "at the bottom")

_DESCRIPTION = """\
Document pages (PubLayNet, DocLayNet) from local files in their COCO-JSON layout format,
captioned with their layout and, for DocLayNet, the text of titles, section headers and
captions.
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
PubLayNet (config publaynet): unpack publaynet.tar.gz from
https://github.com/ibm-aur-nlp/PubLayNet so that <manual_dir> holds train.json, val.json,
train/ and val/.
DocLayNet (config doclaynet): unpack DocLayNet_core.zip (COCO/, PNG/) and, for captions
that quote the pages' text, DocLayNet_extra.zip (JSON/; its PDF/ is not read) from
https://github.com/DS4SD/DocLayNet into <manual_dir>.
Then pass `download_config=tfds.download.DownloadConfig(manual_dir=<manual_dir>)`.
"""


@dataclasses.dataclass(eq=False)
class DocLayoutConfig(tfds.core.BuilderConfig):
  """BuilderConfig for `DocLayout`.

  Attributes:
    layout_format: PUBLAYNET or DOCLAYNET (see FORMATS).
    bbox_tolerance: how far (px) a box may reach beyond the image before its page is
      skipped; boxes within it are clipped (annotations round to the pixel grid).
    max_quote_chars: quotable regions with longer text are counted, not quoted.
    max_quotes: at most this many regions are quoted per caption, the first in reading
      order (top to bottom); the rest are counted.
  """
  layout_format: str = PUBLAYNET
  bbox_tolerance: float = 1.0
  max_quote_chars: int = 60
  max_quotes: int = 4

  def __post_init__(self):
    if self.layout_format not in FORMATS:
      raise ValueError(f"DocLayoutConfig {self.name!r}: layout_format "
                       f"{self.layout_format!r} is not one of {sorted(FORMATS)}.")
    if self.bbox_tolerance < 0 or self.max_quote_chars < 1 or self.max_quotes < 0:
      raise ValueError(f"DocLayoutConfig {self.name!r}: bbox_tolerance must be >= 0, "
                       f"max_quote_chars >= 1 and max_quotes >= 0.")


PUBLAYNET_CONFIG = DocLayoutConfig(
    name=PUBLAYNET, layout_format=PUBLAYNET,
    description="PubLayNet: PubMed Central pages; captions state the layout.")
DOCLAYNET_CONFIG = DocLayoutConfig(
    name=DOCLAYNET, layout_format=DOCLAYNET,
    description="DocLayNet: pages of six document kinds; captions quote titles, section "
                "headers and captions from the PDF text cells.")


# Reading the COCO file: malformed structure is an error naming the file and row.


@dataclasses.dataclass(frozen=True)
class Page:
  """One `images` row."""
  image_id: int
  file_name: str
  width: int
  height: int
  doc_category: str


@dataclasses.dataclass(frozen=True)
class Region:
  """One annotation: its category and box [x0, y0, x1, y1] in image pixels."""
  category: Category
  box: tuple[float, float, float, float]


@dataclasses.dataclass
class CocoFile:
  pages: list[Page]
  regions: dict[int, list[Region]]  # By image id, in file order.
  unknown_image: int  # Annotations whose image_id names no image.


def load_json(path: epath.Path) -> Any:
  """A whole JSON file; ValueError naming it if it is not UTF-8 JSON."""
  data = path.read_bytes()
  try:
    return json.loads(data)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 (byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON, truncated or malformed (line {e.lineno} "
                     f"column {e.colno}: {e.msg})") from None


def _as_number(value: Any, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{what} {value!r} is not a number")
  return float(value)


def _number(row: dict[str, Any], field: str) -> float:
  return _as_number(row.get(field), field)


def _integer(row: dict[str, Any], field: str) -> int:
  value = _number(row, field)
  if value != int(value):
    raise ValueError(f"{field} {row[field]!r} is not an integer")
  return int(value)


def _text(row: dict[str, Any], field: str, required: bool = True) -> str:
  value = row.get(field, None if required else "")
  if not isinstance(value, str) or not web_images.is_valid_utf8(value):
    raise ValueError(f"{field} {value!r} is not a string")
  return value


def _rows(coco: dict[str, Any], name: str, path: epath.Path) -> Iterator[tuple[int, dict]]:
  for row, entry in enumerate(coco[name]):
    if not isinstance(entry, dict):
      raise ValueError(f"{path}: {name}[{row}]: not an object")
    yield row, entry


def _categories(coco: dict[str, Any], path: epath.Path,
                layout: LayoutFormat) -> dict[int, Category]:
  known = {c.name: c for c in layout.categories}
  by_id: dict[int, Category] = {}
  for row, entry in _rows(coco, "categories", path):
    try:
      cid, name = _integer(entry, "id"), _text(entry, "name")
    except ValueError as e:
      raise ValueError(f"{path}: categories[{row}]: {e}") from None
    if name not in known:
      raise ValueError(f"{path}: categories[{row}]: unknown category {name!r} for "
                       f"{layout.source} (expected {', '.join(sorted(known))})")
    if cid in by_id:
      raise ValueError(f"{path}: categories[{row}]: repeated id {cid}")
    by_id[cid] = known[name]
  return by_id


def _page(entry: dict[str, Any]) -> Page:
  page = Page(image_id=_integer(entry, "id"), file_name=_text(entry, "file_name"),
              width=_integer(entry, "width"), height=_integer(entry, "height"),
              doc_category=_text(entry, "doc_category", required=False))
  if page.width <= 0 or page.height <= 0 or not page.file_name:
    raise ValueError(f"empty image ({page.width} x {page.height}, {page.file_name!r})")
  return page


def _region(entry: dict[str, Any], categories: dict[int, Category]) -> tuple[int, Region]:
  image_id, category_id = _integer(entry, "image_id"), _integer(entry, "category_id")
  if category_id not in categories:
    raise ValueError(f"category_id {category_id} is not in categories")
  bbox = entry.get("bbox")
  if not isinstance(bbox, list) or len(bbox) != 4:
    raise ValueError(f"bbox {bbox!r} is not [x, y, width, height]")
  x, y, w, h = (_as_number(v, "bbox value") for v in bbox)
  if w < 0 or h < 0:
    raise ValueError(f"bbox {bbox!r} has a negative size")
  return image_id, Region(categories[category_id], (x, y, x + w, y + h))


def read_coco(path: epath.Path, layout: LayoutFormat) -> CocoFile:
  """The pages and regions of a COCO file; ValueError naming file and row if malformed."""
  coco = load_json(path)
  if not isinstance(coco, dict) or not all(
      isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")):
    raise ValueError(f"{path}: not a COCO file (expected an object with 'images', "
                     "'annotations' and 'categories' lists)")
  categories = _categories(coco, path, layout)
  pages: list[Page] = []
  regions: dict[int, list[Region]] = {}
  for row, entry in _rows(coco, "images", path):
    try:
      page = _page(entry)
    except ValueError as e:
      raise ValueError(f"{path}: images[{row}]: {e}") from None
    if page.image_id in regions:
      raise ValueError(f"{path}: images[{row}]: repeated id {page.image_id}")
    pages.append(page)
    regions[page.image_id] = []
  unknown_image = 0
  for row, entry in _rows(coco, "annotations", path):
    try:
      image_id, region = _region(entry, categories)
    except ValueError as e:
      raise ValueError(f"{path}: annotations[{row}]: {e}") from None
    if image_id in regions:
      regions[image_id].append(region)
    else:
      unknown_image += 1
  return CocoFile(pages, regions, unknown_image)


# Per page: boxes, text cells and the caption.


def fit_boxes(regions: Sequence[Region], width: int, height: int,
              tolerance: float) -> list[Region] | None:
  """`regions` clipped to the image, or None if a box reaches beyond it by > tolerance."""
  fitted = []
  for r in regions:
    x0, y0, x1, y1 = r.box
    if min(x0, y0) < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
      return None
    fitted.append(Region(r.category, (max(0., x0), max(0., y0), min(float(width), x1),
                                      min(float(height), y1))))
  return fitted


@dataclasses.dataclass(frozen=True)
class Cell:
  """A PDF text cell of a DocLayNet page: its centre in image pixels and its text."""
  x: float
  y: float
  text: str


def read_cells(path: epath.Path, width: int, height: int
               ) -> tuple[list[Cell] | None, str | None]:
  """The text cells of a DocLayNet `JSON/<hash>.json`, scaled to a width x height
  image (cells are in `metadata`'s coco_width x coco_height), or (None, skip reason)."""
  try:
    data = path.read_bytes()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    return None, TEXT_MISSING
  try:
    page = json.loads(data)
  except UnicodeDecodeError:
    return None, TEXT_INVALID_UTF8
  except json.JSONDecodeError:
    return None, TEXT_UNREADABLE
  if not isinstance(page, dict) or not isinstance(page.get("cells"), list):
    return None, TEXT_UNREADABLE
  metadata = page.get("metadata") if isinstance(page.get("metadata"), dict) else {}
  try:
    sx = width / _number(metadata, "coco_width") if "coco_width" in metadata else 1.0
    sy = height / _number(metadata, "coco_height") if "coco_height" in metadata else 1.0
    cells = []
    for entry in page["cells"]:
      bbox = entry["bbox"]
      x, y, w, h = (_as_number(v, "bbox value") for v in bbox)
      text = entry["text"]
      if not isinstance(text, str):
        return None, TEXT_UNREADABLE
      if not web_images.is_valid_utf8(text):  # An escaped lone surrogate.
        return None, TEXT_INVALID_UTF8
      cells.append(Cell((x + w / 2) * sx, (y + h / 2) * sy, text))
  except (ValueError, TypeError, KeyError, ZeroDivisionError):
    return None, TEXT_UNREADABLE
  return cells, None


def region_texts(regions: Sequence[Region], cells: Sequence[Cell]) -> list[str]:
  """Each region's text: the cells whose centre lies in it (in the smallest region that
  holds it), in file order, joined by spaces."""
  parts: list[list[str]] = [[] for _ in regions]
  areas = [(r.box[2] - r.box[0]) * (r.box[3] - r.box[1]) for r in regions]
  for cell in cells:
    holders = [i for i, r in enumerate(regions)
               if r.box[0] <= cell.x <= r.box[2] and r.box[1] <= cell.y <= r.box[3]]
    if holders:
      parts[min(holders, key=lambda i: areas[i])].append(cell.text)
  return [re.sub(r"\s+", " ", " ".join(p)).strip() for p in parts]


def _count(n: int, category: Category, other: bool = False) -> str:
  if other:
    return ("another " + category.noun if n == 1
            else f"{_NUMBERS[n] if n < len(_NUMBERS) else n} other {category.plural}")
  return (f"{_NUMBERS[n]} {category.noun}" if n == 1
          else f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {category.plural}")


def _and(items: Sequence[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _where(regions: Sequence[Region], height: int) -> str:
  """' at the top and in the middle': the thirds of the page holding the regions' centres."""
  thirds = sorted({min(2, int(3 * (r.box[1] + r.box[3]) / 2 / height)) for r in regions})
  return " " + _and([_THIRDS[t] for t in thirds])


def column_count(regions: Sequence[Region], width: int) -> int | None:
  """2 if narrow body text lies on both halves of the page, 1 if any body text, else None."""
  body = [r for r in regions if r.category.body]
  if not body:
    return None
  narrow = [(r.box[0] + r.box[2]) / 2 for r in body if r.box[2] - r.box[0] <= 0.5 * width]
  return 2 if any(c < width / 2 for c in narrow) and any(c >= width / 2 for c in narrow) else 1


def reading_order(regions: Sequence[Region]) -> list[Region]:
  """Top to bottom, then left to right (by the boxes' top-left corners)."""
  return sorted(regions, key=lambda r: (r.box[1], r.box[0]))


def layout_caption(layout: LayoutFormat, regions: Sequence[Region], texts: Sequence[str],
                   width: int, height: int, doc_category: str,
                   config: DocLayoutConfig) -> str:
  """The caption of a page's layout: quoted texts, counted and placed regions, which
  come in reading order with their texts."""
  quotes_left = config.max_quotes
  parts = []
  for category in layout.categories:
    mine = [i for i, r in enumerate(regions) if r.category == category]
    if not mine:
      continue
    quoted = []
    if category.quoted:
      for i in mine:
        if quotes_left and texts[i] and len(texts[i]) <= config.max_quote_chars:
          quoted.append(i)
          quotes_left -= 1
    rest = [regions[i] for i in mine if i not in quoted]
    if quoted:
      noun = category.noun if len(quoted) == 1 else category.plural
      parts.append(f"the {noun} " + _and([f'"{texts[i]}"' for i in quoted]))
    if rest:
      where = _where(rest, height) if category.placed else ""
      parts.append(_count(len(rest), category, other=bool(quoted)) + where)
  columns = column_count(regions, width)
  page = f"{'one' if columns == 1 else 'two'}-column page" if columns else "page"
  kind = DOCUMENT_KINDS.get(doc_category, "a document")
  return f"A {page} of {kind} with {_and(parts)}."


class DocLayout(web_images.BeamWhenAsked, tfds.core.GeneratorBasedBuilder):
  """PubLayNet or DocLayNet pages from local files, captioned with their layout (through
  Beam when a build is given a runner; see `web_images.BeamWhenAsked`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [PUBLAYNET_CONFIG, DOCLAYNET_CONFIG]
  DEFAULT_CONFIG_NAME = PUBLAYNET
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  @property
  def layout(self) -> LayoutFormat:
    return FORMATS[self.builder_config.layout_format]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=web_images.example_features(
            # In reading order (top to bottom); boxes [x0, y0, x1, y1] in image pixels;
            # text '' where unknown (PubLayNet, DocLayNet without its extras).
            regions=tfds.features.Sequence({
                "category": tfds.features.Text(),
                "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "text": tfds.features.Text(),
            }),
            doc_category=tfds.features.Text(),
            image_id=np.int64,
            file_name=tfds.features.Text(),
        ),
        homepage=self.layout.homepage,
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    files = {split: manual_dir / name for name, split in self.layout.annotation_files
             if (manual_dir / name).exists()}
    if not files:
      expected = ", ".join(name for name, _ in self.layout.annotation_files)
      raise ValueError(f"{manual_dir}: no {self.layout.source} annotation files ({expected}).")
    return {split: self._generate_examples(split, path, manual_dir)
            for split, path in files.items()}

  def _generate_examples(self, split: str, path: epath.Path, manual_dir: epath.Path):
    # The COCO file is parsed here, in the driver; workers decode the pages' images.
    coco = read_coco(path, self.layout)
    images_dir = manual_dir / (self.layout.images_dir or path.name[:-len(path.suffix)])
    text_dir = manual_dir / self.layout.text_dir if self.layout.text_dir else None
    if text_dir is not None and not text_dir.is_dir():
      text_dir = None  # DocLayNet core without its extras: layout-only captions.
    skipped = web_images.SkipCounter()
    skipped.skip(ANNOTATION_UNKNOWN_IMAGE, coco.unknown_image)
    pages = [(f"{path.name}:{page.image_id}", (page, coco.regions[page.image_id]))
             for page in coco.pages]
    example = functools.partial(page_example, config=self.builder_config,
                                images_dir=str(images_dir),
                                text_dir=str(text_dir) if text_dir else None)
    return self.generate_records(split, pages, example, skipped)


def page_example(key: str, record: tuple[Page, list[Region]], config: DocLayoutConfig,
                 images_dir: str, text_dir: str | None) -> tuple[dict | None, str | None]:
  """The feature dict of one page (`record`: its row and regions), or (None, skip reason)."""
  page, regions = record
  layout = FORMATS[config.layout_format]
  if not regions:
    return None, NO_ANNOTATIONS
  regions = fit_boxes(regions, page.width, page.height, config.bbox_tolerance)
  if regions is None:
    return None, BBOX_OUTSIDE_IMAGE
  regions = reading_order(regions)
  image, reason = web_images.load_image(epath.Path(images_dir) / page.file_name)
  if reason:
    return None, reason
  if (image.width, image.height) != (page.width, page.height):
    return None, IMAGE_SIZE_MISMATCH
  texts = [""] * len(regions)
  if text_dir is not None:
    stem = page.file_name.rsplit(".", 1)[0]
    cells, reason = read_cells(epath.Path(text_dir) / f"{stem}.json", page.width, page.height)
    if reason:
      return None, reason
    texts = region_texts(regions, cells)
  doc_category = page.doc_category or (_PUBLAYNET_KIND if layout.source == PUBLAYNET else "")
  caption = layout_caption(layout, regions, texts, page.width, page.height, doc_category,
                           config)
  nan = float("nan")
  return dict(
      image=image.data, caption=caption, language=layout.language,
      key=key, width=image.width, height=image.height,
      source=layout.source, similarity=nan, pwatermark=nan, punsafe=nan,
      aesthetic_score=nan,
      regions=dict(category=[r.category.name for r in regions],
                   bbox=np.array([r.box for r in regions], np.float32).reshape(-1, 4),
                   text=texts),
      doc_category=doc_category, image_id=page.image_id, file_name=page.file_name,
  ), None
