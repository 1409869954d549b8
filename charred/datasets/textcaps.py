"""`textcaps` TFDS builder: TextCaps' human captions of photos with text, local images.

Nothing is downloaded: `manual_dir` holds TextCaps' published files
(https://textvqa.org/textcaps/dataset/, Sidorov et al. 2020):

- `TextCaps_0.1_train.json`, `TextCaps_0.1_val.json` (train and validation splits):
  {"dataset_type", "dataset_name", "dataset_version", "data": [{image_id, image_classes,
  flickr_original_url, flickr_300k_url, image_width, image_height, set_name, image_name,
  image_path, caption_id, caption_str, caption_tokens, reference_strs,
  reference_tokens}]}, one row per caption (about five per image). The test file has
  no captions and is not read.
- the images, `train_images/<image_id>.jpg` (TextVQA's train_val_images.zip; the
  validation images are there too);
- optionally TextVQA's Rosetta OCR of the same images, `TextVQA_Rosetta_OCR_v0.2_train.json`
  and `..._val.json`: {"data": [{image_id, ocr_tokens, ocr_info: [{word, bounding_box:
  {top_left_x, top_left_y, width, height, rotation, roll, pitch, yaw}}]}]}, coordinates
  as fractions of the image side.

Field names as in the files themselves and in loaders of them (MMF's TextCaps dataset,
HuggingFaceM4/TextCaps). The caption is `caption_str`; with the `default` config the
caption's words that the OCR read in the image are quoted, a run of them as one phrase
('Five "Listerine Zero" mouthwash bottles on a store shelf'), so the model learns which
words to spell; captions already holding a double quote, or with no OCR, stay as
written (`plain` never quotes). `words` holds the quoted phrases and `boxes` their
OCR boxes (x_min, y_min, x_max, y_max) in decoded-image pixels. Key: the caption_id.

Bad rows are skipped and counted by reason in
`<data_dir>/textcaps/<config>/<version>/skipped_<split>.json`: those of `web_images`,
'duplicate_key' (a repeated caption_id), 'bbox_outside_image' (an OCR box further
than `box_tolerance` outside the unit square: OCR of another image) and
'annotation_invalid_utf8' (an OCR word that is not UTF-8). A file that is not
JSON (e.g. truncated), lacks the `data` list, or has a row without image_id,
caption_id or caption_str, or an OCR box without numeric coordinates, raises
ValueError naming the file and row (rows count from 0).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from charred.datasets import scene_text
from charred.datasets import web_images

SOURCE = "textcaps"
DUPLICATE_KEY = "duplicate_key"
IMAGES_DIR = "train_images"
CAPTION_FILES = {"train": "TextCaps_0.1_train.json", "validation": "TextCaps_0.1_val.json"}
OCR_FILES = {"train": "TextVQA_Rosetta_OCR_v0.2_train.json",
             "validation": "TextVQA_Rosetta_OCR_v0.2_val.json"}
_REQUIRED = ("image_id", "caption_id", "caption_str")
_BOX_FIELDS = ("top_left_x", "top_left_y", "width", "height")

_DESCRIPTION = """\
TextCaps (145 k human captions of 28 k OpenImages photos that show text) with local
images; captions quote the words TextVQA's Rosetta OCR read in the image.
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put TextCaps_0.1_train.json and TextCaps_0.1_val.json (https://textvqa.org/textcaps/dataset/)
and optionally TextVQA_Rosetta_OCR_v0.2_train.json / _val.json (https://textvqa.org/dataset/)
in <manual_dir>, and unzip TextVQA's train_val_images.zip there (<manual_dir>/train_images/).
Then pass `download_config=tfds.download.DownloadConfig(manual_dir=<manual_dir>)`.
"""


@dataclasses.dataclass(eq=False)
class TextCapsConfig(tfds.core.BuilderConfig):
  """BuilderConfig for `TextCaps`.

  Attributes:
    quote_ocr: quote the caption's words that the OCR read in the image.
    box_tolerance: how far outside the unit square an OCR box may reach (see
      `scene_text.SceneTextConfig`).
    min_side: drops examples whose decoded image has a side shorter than this.
  """
  quote_ocr: bool = True
  box_tolerance: float = 0.02
  min_side: int = 0

  def __post_init__(self):
    if not 0 <= self.box_tolerance < 1:
      raise ValueError(f"TextCapsConfig {self.name!r}: box_tolerance {self.box_tolerance} "
                       "is not in [0, 1).")


DEFAULT = TextCapsConfig(name="default", description="Captions quote the OCR'd words.")
PLAIN = TextCapsConfig(name="plain", description="Captions as written.", quote_ocr=False)


def _data_rows(path: epath.Path) -> list[Any]:
  data = scene_text.read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise ValueError(f"{path}: expected an object with a 'data' list")
  return data["data"]


def read_ocr(path: epath.Path) -> dict[str, list[scene_text.Word]]:
  """{image_id: words with boxes as fractions of the image} of a Rosetta OCR file."""
  ocr: dict[str, list[scene_text.Word]] = {}
  for row, item in enumerate(_data_rows(path)):
    where = f"{path}: row {row}"
    if not isinstance(item, dict) or not isinstance(item.get("image_id"), str):
      raise ValueError(f"{where}: no image_id")
    words = []
    for i, info in enumerate(item.get("ocr_info") or []):
      box = info.get("bounding_box") if isinstance(info, dict) else None
      if not isinstance(box, dict):
        raise ValueError(f"{where}: ocr_info[{i}]: no bounding_box")
      x, y, w, h = (scene_text.number(box.get(k), f"{where}: ocr_info[{i}]: {k}")
                    for k in _BOX_FIELDS)
      word = info.get("word")
      words.append(scene_text.Word(word.strip() if isinstance(word, str) else "",
                                   (x, y, x + w, y + h)))
    ocr[item["image_id"]] = words
  return ocr


def _core(token: str) -> tuple[int, int]:
  """Span of `token` without leading and trailing punctuation."""
  match = re.search(r"\w(.*\w)?", token)
  return match.span() if match else (0, 0)


def _core_text(token: str) -> str:
  """`token` without surrounding punctuation, case-folded: how caption and OCR words match."""
  return token[slice(*_core(token))].casefold()


def quote_ocr_words(caption: str, ocr_words: set[str]) -> tuple[str, list[str]]:
  """`caption` with runs of words that the OCR read (`ocr_words`, as `_core_text` gives
  them; single letters only as digits) in double quotes, and the quoted phrases."""
  tokens = [(m.start() + a, m.start() + b)
            for m in re.finditer(r"\S+", caption) for a, b in [_core(m.group())] if b > a]
  hits = [(len(caption[a:b]) > 1 or caption[a:b].isdigit())
          and _core_text(caption[a:b]) in ocr_words for a, b in tokens]
  runs: list[tuple[int, int]] = []
  for (a, b), hit, prev in zip(tokens, hits, [False] + hits[:-1]):
    if hit and prev and caption[runs[-1][1]:a].isspace():
      runs[-1] = (runs[-1][0], b)
    elif hit:
      runs.append((a, b))
  out, end = [], 0
  for a, b in runs:
    out += [caption[end:a], '"', caption[a:b], '"']
    end = b
  return "".join(out) + caption[end:], [caption[a:b] for a, b in runs]


def _phrase_boxes(phrases: list[str], words: list[scene_text.Word]
                  ) -> list[scene_text.Word]:
  """Each phrase with the union of the boxes of the OCR words it contains."""
  out = []
  for phrase in phrases:
    parts = {_core_text(p) for p in phrase.split()}
    boxes = [w.box for w in words if _core_text(w.text) in parts]
    box = scene_text.box_of_points([b[0] for b in boxes] + [b[2] for b in boxes],
                                   [b[1] for b in boxes] + [b[3] for b in boxes])
    out.append(scene_text.Word(phrase, box))
  return out


class TextCaps(web_images.BeamWhenAsked, tfds.core.GeneratorBasedBuilder):
  """TextCaps captions with local images and TextVQA's OCR (through Beam when a build is
  given a runner; see `web_images.BeamWhenAsked`)."""

  name = "textcaps"  # Not TFDS's default snake case of the class name, 'text_caps'.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [DEFAULT, PLAIN]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=scene_text.text_features(image_id=tfds.features.Text()),
        homepage="https://textvqa.org/textcaps/",
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    splits = {s: manual_dir / f for s, f in CAPTION_FILES.items() if (manual_dir / f).exists()}
    if not splits:
      raise ValueError(f"{manual_dir}: no TextCaps caption files "
                       f"({', '.join(CAPTION_FILES.values())}).")
    return {split: self._generate_examples(split, path, manual_dir)
            for split, path in splits.items()}

  def _generate_examples(self, split: str, path: epath.Path, manual_dir: epath.Path):
    # The JSON files are parsed here, in the driver; workers decode the images.
    ocr_path = manual_dir / OCR_FILES[split]
    ocr = read_ocr(ocr_path) if ocr_path.exists() else {}
    skipped = web_images.SkipCounter()
    captions: dict[str, tuple[Any, str, list[scene_text.Word]]] = {}
    for row, item in enumerate(_data_rows(path)):
      if not isinstance(item, dict) or any(k not in item for k in _REQUIRED):
        raise ValueError(f"{path}: row {row}: lacks {', '.join(_REQUIRED)} (TextCaps rows "
                         "with captions)")
      key, image_id = str(item["caption_id"]), str(item["image_id"])
      if key in captions:
        skipped.skip(DUPLICATE_KEY)
        continue
      captions[key] = (item["caption_str"], image_id, ocr.get(image_id, []))
    example = functools.partial(caption_example, config=self.builder_config,
                                images_dir=str(manual_dir / IMAGES_DIR))
    return self.generate_records(split, list(captions.items()), example, skipped)


def caption_example(key: str, record: tuple[Any, str, list[scene_text.Word]],
                    config: TextCapsConfig, images_dir: str) -> tuple[dict | None, str | None]:
  """The feature dict of one caption row (`record`: its caption_str, image_id and the
  image's OCR words), or (None, skip reason)."""
  caption_str, image_id, words = record
  caption, reason = web_images.decode_caption(caption_str)
  if reason:
    return None, reason
  if not web_images.is_valid_utf8(image_id):
    return None, web_images.METADATA_INVALID_UTF8
  if any(not web_images.is_valid_utf8(w.text) for w in words):
    return None, scene_text.ANNOTATION_INVALID_UTF8
  image, reason = web_images.load_image(epath.Path(images_dir) / f"{image_id}.jpg", config.min_side)
  if reason:
    return None, reason
  if scene_text.clip_boxes(words, 1, 1, config.box_tolerance) is None:
    return None, scene_text.BBOX_OUTSIDE_IMAGE
  phrases: list[scene_text.Word] = []
  if config.quote_ocr and words and '"' not in caption:
    pixels = [scene_text.Word(w.text, (x0 * image.width, y0 * image.height,
                                       x1 * image.width, y1 * image.height))
              for w in scene_text.clip_boxes(words, 1, 1, config.box_tolerance)
              for x0, y0, x1, y1 in [w.box]]
    caption, quoted = quote_ocr_words(caption, {_core_text(w.text) for w in pixels})
    phrases = _phrase_boxes(quoted, pixels)
  nan = float("nan")
  return dict(
      image=image.data, caption=caption, language="en", key=key,
      width=image.width, height=image.height, source=SOURCE,
      similarity=nan, pwatermark=nan, punsafe=nan, aesthetic_score=nan,
      image_id=image_id, **scene_text.word_features(phrases),
  ), None
