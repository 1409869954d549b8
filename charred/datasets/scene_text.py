"""`scene_text` TFDS builder: photos with word-box annotations, captions quoting the text.

Nothing is downloaded: `manual_dir` holds one of these published layouts (one config
each), and every caption quotes the legible text the image shows, in reading order,
words on one line joined into a phrase: 'A photo with the text "OPEN" and "24 HOURS".'

- `icdar2015` (ICDAR 2015 Robust Reading, Challenge 4 "Incidental Scene Text"): the
  unzipped archives, e.g. `ch4_training_images/img_1.jpg` and
  `ch4_training_localization_transcription_gt/gt_img_1.txt`, one gt file per image:
  lines `x1,y1,x2,y2,x3,y3,x4,y4,transcription` (a quadrilateral in pixels, clockwise
  from the top left; the transcription may itself hold commas; `###` marks text too
  hard to read, a "don't care" region), UTF-8, usually with a byte order mark. Image
  `<stem>.jpg|.png` pairs with `gt_<stem>.txt` among folders of the same split: a folder
  whose name contains 'test' feeds `test` (`ch4_test_images`, `Challenge4_Test_Task1_GT`),
  any other `train`. Key: the image's path under `manual_dir`.
- `coco_text` (COCO-Text v2, https://bgshih.github.io/cocotext/): `cocotext.v2.json`
  {"anns": {id: {mask, class, bbox [x, y, w, h], image_id, id, language, area,
  utf8_string, legibility}}, "imgs": {id: {id, set, width, file_name, height}},
  "imgToAnns": {image id: [ann ids]}} (as COCO-Text's coco_text.py API reads it) with
  the MS-COCO images in `train2014/<file_name>`.
  `set` 'train' feeds `train`, 'val' feeds `validation`. Legible annotations are quoted;
  illegible ones (which have no `utf8_string`) are not. Key: the image id.
- `anyword` (AnyWord-3M, AnyText's training set; the shape its loader reads,
  github.com/tyxsspa/AnyText `t3_dataset.py`): `data.json` files anywhere under `manual_dir` (one per part, e.g.
  ArT, COCO-Text, LAION, Wukong), {"data_root": ..., "data_list": [{img_name, caption,
  annotations: [{polygon [[x, y], ...], text, language, valid}], ...}]}. Images are at
  `<data_root>/<img_name>`, or when `data_root` (an absolute path on the authors' machines)
  does not exist, in the folder named as its last component next to the `data.json`. The
  caption (BLIP-2's, with AnyText's `*` text placeholders removed) is kept and followed
  by ' with the text "..."', quoting the annotations not marked `valid: false`. Key:
  '<data.json path under manual_dir>:<row>' (rows count from 0). All feed `train`.

Besides `web_images`' features (`source` is the config's name), `words` holds the
quoted phrases and `boxes` their axis-aligned boxes (x_min, y_min, x_max, y_max) in
decoded-image pixels.

Bad examples are skipped and counted by reason in
`<data_dir>/scene_text/<config>/<version>/skipped_<split>.json`: those of `web_images`
plus 'no_legible_text' (every word "don't care", illegible or invalid, or none),
'bbox_outside_image' (a word box reaching further than `box_tolerance` of a side
outside the decoded image: the annotation is not of this file, e.g. a resized copy;
boxes within the tolerance are clipped), 'annotation_missing' (an ICDAR image without
its gt file) and 'annotation_invalid_utf8' (a gt file or a word that is not UTF-8).
A file that cannot be read as a whole (truncated JSON, a gt line without 8 numeric
coordinates, a reference to an unknown annotation) raises ValueError naming the file
and row (ICDAR lines count from 1, JSON rows from 0 or by id).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Iterable, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from charred.datasets import web_images

NO_LEGIBLE_TEXT = "no_legible_text"
BBOX_OUTSIDE_IMAGE = "bbox_outside_image"
ANNOTATION_MISSING = "annotation_missing"
ANNOTATION_INVALID_UTF8 = "annotation_invalid_utf8"

ICDAR_DONT_CARE = "###"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
COCO_TEXT_JSON = "cocotext.v2.json"
COCO_IMAGES_DIR = "train2014"
COCO_SPLITS = {"train": "train", "val": "validation"}
ANYWORD_JSON = "data.json"
ANYWORD_PLACEHOLDER = "*"  # AnyText's `place_holder`: where its glyph embeddings go.

# Captions are English templates, whatever the language of the quoted text.
CAPTION_LANGUAGE = "en"

_DESCRIPTION = """\
Scene-text photos with word-level annotations (ICDAR 2015, COCO-Text v2, AnyWord-3M)
from local files, captioned by quoting the legible text each image shows.
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
icdar2015: unzip ch4_training_images.zip, ch4_training_localization_transcription_gt.zip
  (and ch4_test_images.zip, Challenge4_Test_Task1_GT.zip) from https://rrc.cvc.uab.es/?ch=4
  each into a folder of its name under <manual_dir>.
coco_text: put cocotext.v2.json (https://bgshih.github.io/cocotext/) in <manual_dir> and
  the MS-COCO train2014 images in <manual_dir>/train2014/.
anyword: put AnyWord-3M's parts (their data.json and image folders) under <manual_dir>.
Then pass `download_config=tfds.download.DownloadConfig(manual_dir=<manual_dir>)`.
"""


_LAYOUTS = ("icdar2015", "coco_text", "anyword")


@dataclasses.dataclass(eq=False)
class SceneTextConfig(tfds.core.BuilderConfig):
  """BuilderConfig for `SceneText`.

  Attributes:
    layout: which published layout `manual_dir` holds: 'icdar2015', 'coco_text' or
      'anyword'.
    box_tolerance: how far, as a fraction of the image side, a word box may reach
      outside the image before the example is skipped (annotators' polygons overshoot
      the border by a few pixels; more means the boxes are not of this image).
    min_side: drops examples whose decoded image has a side shorter than this.
  """
  layout: str = "icdar2015"
  box_tolerance: float = 0.02
  min_side: int = 0

  def __post_init__(self):
    if self.layout not in _LAYOUTS:
      raise ValueError(f"SceneTextConfig {self.name!r}: layout {self.layout!r} is none of "
                       f"{sorted(_LAYOUTS)}.")
    if not 0 <= self.box_tolerance < 1:
      raise ValueError(f"SceneTextConfig {self.name!r}: box_tolerance {self.box_tolerance} "
                       "is not in [0, 1).")


# Words, boxes and captions (shared with `textcaps`).


@dataclasses.dataclass(frozen=True)
class Word:
  """One annotated word: its text and axis-aligned box in image pixels."""
  text: str
  box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max


def box_of_points(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float, float]:
  return (min(xs), min(ys), max(xs), max(ys))


def clip_boxes(words: Sequence[Word], width: int, height: int,
               tolerance: float) -> list[Word] | None:
  """`words` with boxes clipped to the image, or None if one reaches further out than
  `tolerance` of a side."""
  dx, dy = tolerance * width, tolerance * height
  clipped = []
  for word in words:
    x0, y0, x1, y1 = word.box
    if not all(map(math.isfinite, word.box)):
      return None
    if x0 < -dx or y0 < -dy or x1 > width + dx or y1 > height + dy:
      return None
    clipped.append(Word(word.text, (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)),
                                    min(y1, float(height)))))
  return clipped


def _union(a, b):
  return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def reading_order_phrases(words: Sequence[Word]) -> list[Word]:
  """Words grouped into lines (vertical centres within half a word height), each line
  read left to right, neighbours closer than a word height joined by a space; lines
  top to bottom. Repeated phrases are quoted once."""
  lines: list[list[Word]] = []
  for word in sorted(words, key=lambda w: (w.box[1] + w.box[3]) / 2):
    centre, size = (word.box[1] + word.box[3]) / 2, word.box[3] - word.box[1]
    if lines:
      last = lines[-1][-1]
      last_centre, last_size = (last.box[1] + last.box[3]) / 2, last.box[3] - last.box[1]
      if abs(centre - last_centre) < 0.5 * min(size, last_size):
        lines[-1].append(word)
        continue
    lines.append([word])
  phrases: list[Word] = []
  for line in lines:
    line.sort(key=lambda w: w.box[0])
    run = line[0]
    for word in line[1:]:
      height = max(run.box[3] - run.box[1], word.box[3] - word.box[1])
      if word.box[0] - run.box[2] <= height:
        run = Word(f"{run.text} {word.text}", _union(run.box, word.box))
      else:
        phrases.append(run)
        run = word
    phrases.append(run)
  seen, unique = set(), []
  for phrase in phrases:
    if phrase.text not in seen:
      seen.add(phrase.text)
      unique.append(phrase)
  return unique


def quote_list(texts: Sequence[str]) -> str:
  """'"A"', '"A" and "B"', '"A", "B" and "C"'."""
  quoted = [f'"{t}"' for t in texts]
  return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def text_caption(texts: Sequence[str], lead: str = "A photo") -> str:
  """'A photo with the text "OPEN" and "24 HOURS".' (`lead` without a final period)."""
  return f"{lead} with the text {quote_list(texts)}."


def word_features(words: Sequence[Word]) -> dict[str, Any]:
  boxes = np.array([w.box for w in words], np.float32).reshape(-1, 4)
  return dict(words=[w.text for w in words], boxes=boxes)


def text_features(**extra):
  """`web_images.example_features` plus the quoted phrases and their pixel boxes."""
  return web_images.example_features(
      words=tfds.features.Sequence(tfds.features.Text()),
      boxes=tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      **extra)


def read_json(path: epath.Path) -> Any:
  """A JSON file; invalid UTF-8 survives as lone surrogates for the per-field checks.
  ValueError naming the file if it is not JSON (e.g. truncated)."""
  text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                     f"{e.colno}; truncated?)") from None


def number(value: Any, where: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{where}: {value!r} is not a number")
  return float(value)


# ICDAR 2015.


def parse_icdar_gt(text: str, path: epath.Path) -> list[tuple[Word, bool]]:
  """(word, legible) of an ICDAR 2015 gt file's lines; ValueError names a malformed line."""
  out = []
  for line_number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split(",", 8)
    if len(fields) < 9:
      raise ValueError(f"{path}: line {line_number}: expected x1,y1,...,x4,y4,transcription, "
                       f"got {len(fields)} comma-separated fields")
    try:
      coords = [float(f) for f in fields[:8]]
    except ValueError:
      raise ValueError(f"{path}: line {line_number}: non-numeric coordinate in "
                       f"{','.join(fields[:8])!r}") from None
    transcription = fields[8].strip()
    word = Word(transcription, box_of_points(coords[0::2], coords[1::2]))
    out.append((word, bool(transcription) and transcription != ICDAR_DONT_CARE))
  return out


def _icdar_split(folder: str) -> str:
  return "test" if "test" in folder.lower() else "train"


def icdar_files(manual_dir: epath.Path) -> dict[str, dict[str, dict[str, epath.Path]]]:
  """{split: {stem: {'image': path, 'gt': path}}}; ValueError on a stem found twice."""
  found: dict[str, dict[str, dict[str, epath.Path]]] = {}
  for root, _, names in os.walk(manual_dir):
    split = _icdar_split(os.path.relpath(root, manual_dir))
    for name in sorted(names):
      stem, ext = os.path.splitext(name)
      if ext.lower() == ".txt" and stem.startswith("gt_"):
        kind, stem = "gt", stem[3:]
      elif ext.lower() in IMAGE_EXTENSIONS:
        kind = "image"
      else:
        continue
      entry = found.setdefault(split, {}).setdefault(stem, {})
      path = epath.Path(root) / name
      if kind in entry:
        raise ValueError(f"{path}: {split} {kind} {stem!r} also at {entry[kind]}")
      entry[kind] = path
  return found


def _icdar_records(manual_dir: epath.Path, entries: dict[str, dict[str, epath.Path]]):
  """(key, record) of one split's images and gt files, sorted by stem."""
  for _, entry in sorted(entries.items()):
    image = entry.get("image")
    key = os.path.relpath(image or entry["gt"], manual_dir)
    if "gt" not in entry:
      yield key, ANNOTATION_MISSING
      continue
    if image is None:
      yield key, web_images.IMAGE_MISSING
      continue
    try:
      text = entry["gt"].read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
      yield key, ANNOTATION_INVALID_UTF8
      continue
    yield key, (image, "A photo", parse_icdar_gt(text, entry["gt"]))


# The builder.


class SceneText(web_images.BeamWhenAsked, tfds.core.GeneratorBasedBuilder):
  """Scene-text photos with captions quoting their annotated words (through Beam when a
  build is given a runner; see `web_images.BeamWhenAsked`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SceneTextConfig(name="icdar2015", layout="icdar2015",
                      description="ICDAR 2015 incidental scene text (img_N + gt_img_N.txt)."),
      SceneTextConfig(name="coco_text", layout="coco_text",
                      description="COCO-Text v2 over MS-COCO train2014."),
      SceneTextConfig(name="anyword", layout="anyword",
                      description="AnyWord-3M data.json parts."),
  ]
  DEFAULT_CONFIG_NAME = "icdar2015"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=text_features(),
        homepage="https://rrc.cvc.uab.es/?ch=4",
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    layout = self.builder_config.layout
    if layout == "icdar2015":
      files = icdar_files(manual_dir)
      if not any("gt" in e for split in files.values() for e in split.values()):
        raise ValueError(f"{manual_dir}: no ICDAR 2015 gt files (gt_<image stem>.txt).")
      return {split: self._generate_examples(split, _icdar_records(manual_dir, entries))
              for split, entries in sorted(files.items())}
    if layout == "coco_text":
      path = manual_dir / COCO_TEXT_JSON
      if not path.exists():
        raise ValueError(f"{manual_dir}: no {COCO_TEXT_JSON}.")
      by_split = _coco_text_records(path, manual_dir / COCO_IMAGES_DIR)
      return {split: self._generate_examples(split, records)
              for split, records in by_split.items()}
    paths = sorted(epath.Path(root) / ANYWORD_JSON for root, _, names in os.walk(manual_dir)
                   if ANYWORD_JSON in names)
    if not paths:
      raise ValueError(f"{manual_dir}: no AnyWord-3M {ANYWORD_JSON} files.")
    return {"train": self._generate_examples("train", _anyword_records(manual_dir, paths))}

  def _generate_examples(self, split: str, records: Iterable[tuple[str, Any]]):
    """Examples of (key, record) pairs, a record being (image path, lead, [(word,
    legible)]) or a skip reason (counted here, in the driver)."""
    skipped = web_images.SkipCounter()
    photos = []
    for key, record in records:
      if isinstance(record, str):
        skipped.skip(record)
      else:
        image_path, lead, words = record
        photos.append((key, (str(image_path), lead, words)))
    return self.generate_records(
        split, photos, functools.partial(photo_example, config=self.builder_config), skipped)


def photo_example(key: str, record: tuple[str, str, list[tuple[Word, bool]]],
                  config: SceneTextConfig) -> tuple[dict | None, str | None]:
  """The feature dict of one image (`record`: its path, caption lead and words), or
  (None, skip reason)."""
  image_path, lead, words = record
  legible = [w for w, ok in words if ok]
  if any(not web_images.is_valid_utf8(w.text) for w in legible):
    return None, ANNOTATION_INVALID_UTF8
  if not legible:
    return None, NO_LEGIBLE_TEXT
  image, reason = web_images.load_image(image_path, config.min_side)
  if reason:
    return None, reason
  # Every box is checked, illegible ones too: any one outside betrays a wrong image.
  if clip_boxes([w for w, _ in words], image.width, image.height,
                config.box_tolerance) is None:
    return None, BBOX_OUTSIDE_IMAGE
  phrases = reading_order_phrases(
      clip_boxes(legible, image.width, image.height, config.box_tolerance))
  nan = float("nan")
  return dict(
      image=image.data, caption=text_caption([p.text for p in phrases], lead),
      language=CAPTION_LANGUAGE, key=key, width=image.width, height=image.height,
      source=config.name,
      similarity=nan, pwatermark=nan, punsafe=nan, aesthetic_score=nan,
      **word_features(phrases),
  ), None


# COCO-Text v2.


def _coco_text_records(path: epath.Path, images_dir: epath.Path
                       ) -> dict[str, list[tuple[str, Any]]]:
  """{split: [(image id, record)]} of cocotext.v2.json; ValueError names a bad entry."""
  data = read_json(path)
  if not isinstance(data, dict) or not all(
      isinstance(data.get(k), dict) for k in ("anns", "imgs", "imgToAnns")):
    raise ValueError(f"{path}: expected an object with 'anns', 'imgs' and 'imgToAnns' "
                     "objects (COCO-Text v2)")
  anns, img_to_anns = data["anns"], data["imgToAnns"]
  by_split: dict[str, list[tuple[str, Any]]] = {}
  for image_id, img in data["imgs"].items():
    where = f"{path}: imgs[{image_id!r}]"
    if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
      raise ValueError(f"{where}: no file_name")
    split = COCO_SPLITS.get(img.get("set"))
    if split is None:
      raise ValueError(f"{where}: set {img.get('set')!r} is none of {sorted(COCO_SPLITS)}")
    words = []
    ann_ids = img_to_anns.get(str(image_id), [])
    if not isinstance(ann_ids, list):
      raise ValueError(f"{path}: imgToAnns[{image_id!r}]: not a list")
    for ann_id in ann_ids:
      ann = anns.get(str(ann_id))
      where = f"{path}: anns[{str(ann_id)!r}]"
      if not isinstance(ann, dict):
        raise ValueError(f"{path}: imgToAnns[{image_id!r}]: unknown annotation {ann_id!r}")
      bbox = ann.get("bbox")
      if not isinstance(bbox, list) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
      x, y, w, h = (number(v, f"{where}: bbox") for v in bbox)
      text = ann.get("utf8_string")
      text = text.strip() if isinstance(text, str) else ""
      legible = ann.get("legibility") == "legible" and bool(text)
      words.append((Word(text, (x, y, x + w, y + h)), legible))
    by_split.setdefault(split, []).append(
        (str(image_id), (images_dir / img["file_name"], "A photo", words)))
  return by_split


# AnyWord-3M.


def _anyword_images_dir(json_path: epath.Path, data_root: Any) -> epath.Path:
  if isinstance(data_root, str) and data_root and os.path.isdir(data_root):
    return epath.Path(data_root)
  name = os.path.basename(os.path.normpath(data_root)) if isinstance(data_root, str) else ""
  return json_path.parent / name if name and name != "." else json_path.parent


def anyword_lead(caption: str) -> str:
  """A BLIP-2 caption without AnyText's placeholders and final period."""
  return re.sub(r"\s+", " ", caption.replace(ANYWORD_PLACEHOLDER, " ")).strip().rstrip(". ")


def _anyword_records(manual_dir: epath.Path, paths: list[epath.Path]):
  for path in paths:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data_list"), list):
      raise ValueError(f"{path}: expected an object with a 'data_list' list (AnyWord-3M)")
    images_dir = _anyword_images_dir(path, data.get("data_root"))
    name = os.path.relpath(path, manual_dir)
    for row, item in enumerate(data["data_list"]):
      where = f"{path}: data_list[{row}]"
      if not isinstance(item, dict) or not isinstance(item.get("img_name"), str):
        raise ValueError(f"{where}: no img_name")
      key = f"{name}:{row}"
      caption, reason = web_images.decode_caption(item.get("caption"))
      if reason == web_images.CAPTION_INVALID_UTF8:
        yield key, reason
        continue
      lead = anyword_lead(caption or "") or "A photo"
      words = []
      for i, ann in enumerate(item.get("annotations") or []):
        polygon = ann.get("polygon") if isinstance(ann, dict) else None
        if (not isinstance(polygon, list) or not polygon
            or not all(isinstance(p, list) and len(p) == 2 for p in polygon)):
          raise ValueError(f"{where}: annotations[{i}]: polygon {polygon!r} is not "
                           "[[x, y], ...]")
        xs = [number(p[0], f"{where}: annotations[{i}]") for p in polygon]
        ys = [number(p[1], f"{where}: annotations[{i}]") for p in polygon]
        text = ann.get("text")
        text = text.strip() if isinstance(text, str) else ""
        words.append((Word(text, box_of_points(xs, ys)),
                      ann.get("valid", True) is not False and bool(text)))
      yield key, (images_dir / item["img_name"], lead, words)

