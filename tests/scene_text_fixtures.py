"""Writers of tiny scene-text fixtures in their published formats.

- ICDAR 2015 Challenge 4 (`write_icdar_gt`): `gt_img_N.txt` lines
  `x1,y1,x2,y2,x3,y3,x4,y4,transcription`, UTF-8 with a byte order mark, CRLF line ends,
  as in ch4_training_localization_transcription_gt.zip.
- COCO-Text v2 (`coco_text_ann`, `coco_text_img`): the entries of `cocotext.v2.json`.
- AnyWord-3M (`anyword_item`): the rows of a part's `data.json` (AnyText's t3_dataset.py).
- TextCaps 0.1 (`textcaps_row`) and TextVQA's Rosetta OCR v0.2 (`rosetta_row`).

Text that stands for bytes that are not UTF-8 is `INVALID_UTF8`; `write_json` writes it
raw (b'\\xff\\xfe'), as a broken export would.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import photo_fixtures

INVALID_UTF8 = "\u2603INVALID\u2603"


def photo_with_text(width: int, height: int, words: list[tuple[str, tuple[int, int]]],
                    seed: int = 0) -> bytes:
  """A JPEG photo with `words` drawn in white boxes at their (x, y) top left corners."""
  image = Image.fromarray(photo_fixtures.photo(height, width, seed=seed))
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  for text, (x, y) in words:
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(250, 250, 250))
    draw.text((x, y), text, fill=(10, 10, 10), font=font)
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def write_json(path: str, obj, truncate: bool = False) -> None:
  data = json.dumps(obj, indent=1).encode("utf-8")
  data = data.replace(json.dumps(INVALID_UTF8)[1:-1].encode("utf-8"), b"\xff\xfe")
  write(path, data[:len(data) // 2] if truncate else data)


# ICDAR 2015.


def quad(x0, y0, x1, y1) -> list[int]:
  """A clockwise quadrilateral from the top left, as ICDAR 2015 writes boxes."""
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_icdar_gt(path: str, lines: list[tuple[list[float], str]],
                   encoding: str = "utf-8-sig") -> None:
  text = "".join(",".join([*(str(c) for c in coords), t]) + "\r\n" for coords, t in lines)
  write(path, text.encode(encoding))


# COCO-Text v2.


def coco_text_img(image_id: int, width: int, height: int, split: str = "train") -> dict:
  return {"id": image_id, "set": split, "width": width,
          "file_name": f"COCO_train2014_{image_id:012d}.jpg", "height": height}


def coco_text_ann(ann_id: int, image_id: int, bbox: list[float], text: str | None,
                  legible: bool = True) -> dict:
  x, y, w, h = bbox
  ann = {"mask": [x, y, x + w, y, x + w, y + h, x, y + h], "class": "machine printed",
         "bbox": bbox, "image_id": image_id, "id": ann_id,
         "language": "english" if legible else "na", "area": float(w * h),
         "legibility": "legible" if legible else "illegible"}
  if text is not None:  # Illegible annotations come without a transcription.
    ann["utf8_string"] = text
  return ann


def coco_text_json(imgs: list[dict], anns: list[dict]) -> dict:
  img_to_anns = {str(i["id"]): [a["id"] for a in anns if a["image_id"] == i["id"]]
                 for i in imgs}
  return {"cats": {}, "anns": {str(a["id"]): a for a in anns},
          "imgs": {str(i["id"]): i for i in imgs}, "imgToAnns": img_to_anns,
          "info": {"version": "2.0", "description": "COCO-Text v2 (fixture)"}}


# AnyWord-3M.


def anyword_item(img_name: str, caption: str, annotations: list[tuple[list, str, bool]]) -> dict:
  return {"img_name": img_name, "caption": caption,
          "annotations": [{"polygon": polygon, "text": text, "language": "Latin",
                           "valid": valid} for polygon, text, valid in annotations]}


# TextCaps and TextVQA's Rosetta OCR.


def textcaps_row(image_id: str, caption_id: int, caption: str, width: int, height: int,
                 split: str = "train") -> dict:
  tokens = ["<s>", *caption.lower().replace(".", "").split(), "</s>"]
  return {"image_id": image_id, "image_classes": ["Poster"],
          "flickr_original_url": f"https://farm1.staticflickr.com/1/{image_id}_o.jpg",
          "flickr_300k_url": f"https://c1.staticflickr.com/1/{image_id}_z.jpg",
          "image_width": width, "image_height": height, "set_name": split,
          "image_name": image_id, "image_path": f"train/{image_id}.jpg",
          "caption_id": caption_id, "caption_str": caption, "caption_tokens": tokens,
          "reference_strs": [caption], "reference_tokens": [tokens]}


def textcaps_json(rows: list[dict], split: str = "train") -> dict:
  return {"dataset_type": split, "dataset_name": "textcaps", "dataset_version": 0.1,
          "data": rows}


def rosetta_row(image_id: str, words: list[tuple[str, tuple[float, float, float, float]]]
                ) -> dict:
  """OCR of one image; boxes (top_left_x, top_left_y, width, height) as fractions."""
  info = [{"word": w, "bounding_box": {"top_left_x": x, "top_left_y": y, "width": bw,
                                       "height": bh, "rotation": 0, "roll": 0, "pitch": 0,
                                       "yaw": 0}} for w, (x, y, bw, bh) in words]
  return {"image_id": image_id, "ocr_tokens": [w for w, _ in words], "ocr_info": info,
          "set_name": "train"}


def decode_size(data: bytes) -> tuple[int, int]:
  with Image.open(io.BytesIO(data)) as im:
    return im.size


def as_array(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))
