"""`calligraphy` TFDS builder: a folder of images with labels, and a synthetic source.

The folder layout (`manual_dir`), as calligraphy and handwritten-character data sets
(CASIA-HWDB-style character images, word crops) are commonly shared:

  <manual_dir>/labels.csv  or  <manual_dir>/labels.json   (exactly one of them)
  <manual_dir>/<file>      each image, at the path its row names

`labels.csv`: UTF-8 (a BOM is allowed), comma-separated with a header row and
double-quoted fields where needed. `labels.json`: a list of objects with the same
keys and string values. Columns (keys):

- `file` (required): the image's path relative to `manual_dir`, '/'-separated;
  any format PIL decodes (JPEG and PNG are stored as given, others re-encoded).
- `text` (required): the character(s) or word the image shows, exactly.
- `script` (required, may be empty): the script's name as a caption says it,
  e.g. 'Latin', 'Arabic', 'Devanagari', 'Han'.
- `style` (required, may be empty): a noun phrase for the hand, e.g.
  'copperplate calligraphy', 'regular-script (kaishu) brush calligraphy'.
- `kind` (optional): 'character' or 'word'; empty or absent means 'character'
  for a one-code-point text and 'word' otherwise.
- `language` (optional): a language tag ('zh', 'ar-EG'), stored as ISO 639-1.
Other columns are ignored. The key of an example is its `file`.

Captions: 'The word "amor" in Latin script, copperplate calligraphy.' (`caption`;
without a script: 'The character "永", brush calligraphy.').

Bad rows are skipped and counted by reason in
`<data_dir>/calligraphy/<config>/<version>/skipped_train.json`: the image reasons of
`web_images` ('image_missing', 'image_empty', 'image_corrupt', 'image_too_large',
'image_too_small' below the config's `min_side`), 'text_empty', 'text_invalid_utf8',
'metadata_invalid_utf8' (file, script, style, kind or language), 'kind_unknown',
'file_outside_folder' (absolute paths, '..') and 'duplicate_file' (the first row of a
file wins). A labels file that cannot be used as a whole (both or neither file, a
missing column, a CSV row with the wrong number of fields, JSON that does not parse,
is not a list of objects or has a non-string value) raises a one-line ValueError
naming the file and row (rows count from 0, header excluded).

The synthetic source (`render_example`, `write_synthetic_folder`) renders words and
characters of Latin, Devanagari, Arabic and Han script in script, handwriting and brush
fonts on paper-like backgrounds, as a pure function of (seed, index), and writes them in
the layout above, so synthetic and real data share one reader. The `synthetic*` builder
configs render it into the download dir: `prepare --builder=calligraphy/synthetic`
needs no files. Fonts are only those of `packaged_fonts` (the pinned `fontpkg-*` wheels
and one Debian package, each found at its package's path; their licenses are listed
there). Text is shaped by resvg (rustybuzz), so Arabic joins and Devanagari conjuncts are
drawn as written. Han regular script (kaishu) is AR PL UKai from the Debian package
fonts-arphic-ukai (`apt-get install fonts-arphic-ukai`), opt-in only (`synthetic_han`,
`SyntheticConfig(fonts=("ukai",))`): the default fonts and the other synthetic configs
are the wheels' alone, so their pixels do not depend on which Debian packages a machine
has.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import posixpath
from typing import Any, Iterator
from xml.sax import saxutils

from etils import epath
import numpy as np
from PIL import Image, ImageFont
import resvg_py
import tensorflow_datasets as tfds
import wordfreq

from charred.datasets import packaged_fonts
from charred.datasets import render
from charred.datasets import web_images
from charred.datasets import words as words_lib

SOURCE = "calligraphy"
LABELS_CSV, LABELS_JSON = "labels.csv", "labels.json"
CHARACTER, WORD = "character", "word"
KINDS = (CHARACTER, WORD)
REQUIRED_COLUMNS = ("file", "text", "script", "style")
OPTIONAL_COLUMNS = ("kind", "language")

TEXT_EMPTY = "text_empty"
TEXT_INVALID_UTF8 = "text_invalid_utf8"
KIND_UNKNOWN = "kind_unknown"
FILE_OUTSIDE_FOLDER = "file_outside_folder"
DUPLICATE_FILE = "duplicate_file"

# Synthetic source.

# The fonts, shared with the TF-free renderers.
LATIN, DEVANAGARI, ARABIC, HAN = (packaged_fonts.LATIN, packaged_fonts.DEVANAGARI,
                                  packaged_fonts.ARABIC, packaged_fonts.HAN)
FONTS = packaged_fonts.FONTS
WHEEL_FONTS = packaged_fonts.WHEEL_FONTS
font_path = packaged_fonts.font_path

# Script -> (wordfreq language, the script's Unicode letters as a (first, last) range,
# the longest word); words with other code points, e.g. Arabic diacritics or Latin in a
# Hindi list, are left out. Han: the CJK Unified Ideographs block, words of at most 4
# characters (longer ones are phrases, too small at a word image's 3:1).
_SCRIPT_WORDS = {DEVANAGARI: ("hi", ("\u0900", "\u097f"), 8),
                 ARABIC: ("ar", ("\u0621", "\u064a"), 8),
                 HAN: ("zh", ("\u4e00", "\u9fff"), 4)}
# Single characters: letters every font of the script draws.
_CHARACTERS = {
    LATIN: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    DEVANAGARI: "अआइईउऊऋएऐओऔकखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह",
    ARABIC: "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    # 永 (its strokes are kaishu's eight principles) and common characters.
    HAN: "永一二三四五六七八九十人大天地日月山水火木金土中上下心手口目田雨风云龙虎鸟花草竹石"
         "书字文道德和福寿春夏秋冬东南西北明光爱美家国学生长安平正气门马",
}
_TATWEEL = "\u0640"  # Arabic's elongation mark: in the letters' range, but no letter.
_LANGUAGES = {LATIN: "en", DEVANAGARI: "hi", ARABIC: "ar", HAN: "zh"}
# Named papers and inks, so that captions can say what the picture shows.
PAPERS = {"ivory paper": (250, 244, 228), "cream paper": (242, 232, 208),
          "rice paper": (236, 233, 222), "parchment": (228, 210, 170),
          "white paper": (250, 250, 247)}
INKS = {"black ink": (22, 20, 20), "sepia ink": (96, 60, 34), "indigo ink": (36, 46, 98),
        "vermilion ink": (178, 40, 28)}
# Glyphs are drawn at this many pixels per output pixel, then downsampled (antialiasing).
_SUPERSAMPLE = 3


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What the synthetic source draws.

  Attributes:
    seed: seeds every choice; example i is a pure function of (seed, i).
    num_examples: how many examples a folder or builder config holds.
    height: image height in pixels; a character image is height x height.
    word_width: width in pixels of a word image.
    fonts: keys of FONTS, drawn uniformly; by default WHEEL_FONTS.
    word_probability: probability that an example shows a word, not a character.
    vocabulary_size: words per script drawn from (most frequent first).
    min_margin: smallest margin, as a fraction of the height, around the writing.
  """
  seed: int = 0
  num_examples: int = 2000
  height: int = 64
  word_width: int = 192
  fonts: tuple[str, ...] = WHEEL_FONTS
  word_probability: float = 0.75
  vocabulary_size: int = 3000
  min_margin: float = 0.08

  def __post_init__(self):
    unknown = [f for f in self.fonts if f not in FONTS]
    if unknown or not self.fonts:
      raise ValueError(f"SyntheticConfig.fonts: unknown {unknown or 'none given'}; "
                       f"known: {sorted(FONTS)}")
    if not 0.0 <= self.word_probability <= 1.0:
      raise ValueError(f"SyntheticConfig.word_probability must be in [0, 1], got "
                       f"{self.word_probability}")
    if self.height < 16 or self.word_width < self.height or self.num_examples < 0:
      raise ValueError(f"SyntheticConfig: need height >= 16, word_width >= height and "
                       f"num_examples >= 0, got {self.height}, {self.word_width}, "
                       f"{self.num_examples}")


@functools.lru_cache(maxsize=None)
def _family(name: str) -> str:
  # resvg selects fonts by family name: read it from the file, as font_faces does.
  return ImageFont.truetype(font_path(name), 16).getname()[0]


@functools.lru_cache(maxsize=None)
def script_words(script: str, vocabulary_size: int) -> tuple[str, ...]:
  """Frequent words of `script`, most frequent first: words.py's English words for
  Latin, wordfreq's Hindi, Arabic and Chinese lists for Devanagari, Arabic and Han."""
  if script == LATIN:
    # Never the typography validation words: text-rendering evaluation stays on unseen
    # words when calligraphy is trained on.
    held_out = set(words_lib.word_splits()["validation"])
    candidates = words_lib.real_words(words_lib.WordSplitConfig.vocabulary_size, 3, 8)
    return tuple(w for w in candidates if w not in held_out)[:vocabulary_size]
  language, (first, last), longest = _SCRIPT_WORDS[script]
  out = []
  for w in wordfreq.top_n_list(language, vocabulary_size * 2):
    if (2 <= len(w) <= longest and all(first <= c <= last and c != _TATWEEL for c in w)
        and w not in out):
      out.append(w)
  return tuple(out[:vocabulary_size])


def caption(kind: str, text: str, script: str = "", style: str = "") -> str:
  """'The word "amor" in Latin script, copperplate calligraphy.'"""
  out = f'The {kind} "{text}"'
  if script:
    out += f" in {script} script"
  if style:
    out += f", {style}"
  return out + "."


def _ink_mask(text: str, font: str, size: int) -> np.ndarray:
  """float32 coverage in [0, 1] of `text` drawn at `size` px, cropped to its ink."""
  width, height = int(size * (len(text) + 2)), int(size * 2.5)
  svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
         f'<text x="{width / 2:.1f}" y="{1.6 * size:.1f}" font-family="{_family(font)}" '
         f'font-size="{size}" text-anchor="middle" fill="#000">{saxutils.escape(text)}'
         f'</text></svg>')
  png = resvg_py.svg_to_bytes(svg_string=svg, skip_system_fonts=True,
                              font_files=[font_path(font)])
  with Image.open(io.BytesIO(bytes(png))) as image:
    alpha = np.asarray(image.getchannel("A"))
  ys, xs = np.nonzero(alpha)
  if not len(ys):
    raise RuntimeError(f"font {font!r} drew no ink for {text!r}")
  return alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32) / 255.0


def _paper(rng: np.random.Generator, colour, height: int, width: int) -> np.ndarray:
  """float32 [H, W, 3] paper: its colour with soft blotches and fine grain."""
  coarse = rng.normal(size=(height // 16 + 2, width // 16 + 2)).astype(np.float32)
  blotches = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                                  Image.BICUBIC))
  grain = rng.normal(size=(height, width)).astype(np.float32)
  shade = 1.0 + 0.025 * blotches + 0.012 * grain
  return np.asarray(colour, np.float32)[None, None, :] * shade[..., None]


def render_example(seed: int, index: int,
                   config: SyntheticConfig = SyntheticConfig()) -> dict[str, Any]:
  """Synthetic example `index`; a pure function of its arguments.

  Returns a dict with image (uint8 [H, W, 3]), caption, text, script, style (the font's
  hand, its ink and paper), kind, language ('' for characters) and font (FONTS key).
  """
  rng = np.random.default_rng([seed, index])
  font_name = config.fonts[int(rng.integers(len(config.fonts)))]
  font = FONTS[font_name]
  kind = WORD if rng.random() < config.word_probability else CHARACTER
  if kind == WORD:
    vocabulary = script_words(font.script, config.vocabulary_size)
    text = vocabulary[int(rng.integers(len(vocabulary)))]
    if font.script == LATIN:
      text = render.cased(text, (render.LOWER, render.TITLE)[int(rng.integers(2))])
  else:
    letters = _CHARACTERS[font.script]
    text = letters[int(rng.integers(len(letters)))]
  paper = list(PAPERS)[int(rng.integers(len(PAPERS)))]
  ink = list(INKS)[int(rng.integers(len(INKS)))]
  height = config.height
  width = config.word_width if kind == WORD else height

  # Ink: drawn large, scaled into the box left by the margins, placed at random.
  mask = _ink_mask(text, font_name, height * _SUPERSAMPLE)
  margin = config.min_margin * height
  fit = min((width - 2 * margin) / mask.shape[1], (height - 2 * margin) / mask.shape[0])
  scale = fit * rng.uniform(0.8, 1.0)
  w, h = (max(1, int(round(s * scale))) for s in (mask.shape[1], mask.shape[0]))
  mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.LANCZOS))
  x = int(rng.integers(int(margin), max(int(margin), width - w - int(margin)) + 1))
  y = int(rng.integers(int(margin), max(int(margin), height - h - int(margin)) + 1))
  coverage = np.zeros((height, width), np.float32)
  coverage[y:y + h, x:x + w] = np.clip(mask, 0.0, 1.0)[:height - y, :width - x]
  coverage *= rng.uniform(0.85, 1.0)  # Ink density.

  background = _paper(rng, PAPERS[paper], height, width)
  ink_rgb = np.asarray(INKS[ink], np.float32)
  image = background * (1.0 - coverage[..., None]) + ink_rgb * coverage[..., None]
  style = f"{font.style} in {ink} on {paper}"
  return dict(image=np.clip(np.round(image), 0, 255).astype(np.uint8),
              caption=caption(kind, text, font.script, style), text=text,
              script=font.script, style=style, kind=kind,
              language=_LANGUAGES[font.script] if kind == WORD else "", font=font_name)


def write_synthetic_folder(out: str | os.PathLike[str],
                           config: SyntheticConfig = SyntheticConfig()) -> list[dict[str, str]]:
  """Writes config.num_examples synthetic examples to `out` in the folder layout
  (images/NNNNNN.png and labels.csv); returns the label rows. Same config, same bytes."""
  for name in config.fonts:  # A missing font fails before anything is written.
    font_path(name)
  out = epath.Path(out)
  (out / "images").mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(config.num_examples):
    ex = render_example(config.seed, i, config)
    file = f"images/{i:06d}.png"
    buf = io.BytesIO()
    Image.fromarray(ex["image"]).save(buf, format="PNG")
    (out / file).write_bytes(buf.getvalue())
    rows.append(dict(file=file, **{k: ex[k] for k in ("text", "script", "style", "kind",
                                                       "language")}))
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=(*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS),
                          lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  (out / LABELS_CSV).write_text(text.getvalue(), encoding="utf-8")
  return rows


# Reading labels.


def _read_csv(path: epath.Path) -> Iterator[tuple[int, dict[str, str]]]:
  """(row, {column: value}) of labels.csv; invalid UTF-8 survives as lone surrogates."""
  row = -1
  with path.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig",
                                                errors="surrogateescape", newline="") as f:
    reader = csv.reader(f)
    try:
      header = next(reader, None)
      if header is None:
        raise ValueError(f"{path}: empty file, expected a header row")
      header = [h.strip() for h in header]
      missing = [c for c in REQUIRED_COLUMNS if c not in header]
      if missing:
        raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)} (has "
                         f"{', '.join(header)})")
      for row, fields in enumerate(reader):
        if len(fields) != len(header):
          raise ValueError(f"{path}: row {row} (ending on line {reader.line_num}): expected "
                           f"{len(header)} comma-separated fields, got {len(fields)}")
        yield row, dict(zip(header, fields))
    except csv.Error as e:
      raise ValueError(f"{path}: row {row + 1}: unreadable ({e})") from None


def _read_json(path: epath.Path) -> Iterator[tuple[int, dict[str, str]]]:
  """(row, object) of labels.json, a list of objects with string values."""
  text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON (truncated or malformed: {e})") from None
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a list of objects, got {type(records).__name__}")
  for row, record in enumerate(records):
    if not isinstance(record, dict):
      raise ValueError(f"{path}: row {row}: expected an object, got {type(record).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in record]
    if missing:
      raise ValueError(f"{path}: row {row}: no key(s) {', '.join(missing)}")
    for key in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
      if key in record and not isinstance(record[key], str):
        raise ValueError(f"{path}: row {row}: {key} must be a string, got "
                         f"{json.dumps(record[key])[:40]}")
    yield row, record


def read_labels(manual_dir: str | os.PathLike[str]) -> tuple[epath.Path,
                                                             Iterator[tuple[int, dict]]]:
  """(labels file, its (row, fields) iterator); ValueError unless exactly one exists."""
  manual_dir = epath.Path(manual_dir)
  found = [manual_dir / n for n in (LABELS_CSV, LABELS_JSON) if (manual_dir / n).exists()]
  if len(found) != 1:
    raise ValueError(f"{manual_dir}: expected exactly one of {LABELS_CSV} or {LABELS_JSON}, "
                     f"found {len(found)}")
  (path,) = found
  return path, (_read_csv(path) if path.name == LABELS_CSV else _read_json(path))


def _relative_file(file: str) -> str | None:
  """`file` normalised ('./a//b.png' -> 'a/b.png'); None if it leaves the folder."""
  if file.startswith(("/", "\\")) or (len(file) > 1 and file[1] == ":"):
    return None
  norm = posixpath.normpath(file.replace("\\", "/"))
  return None if norm == ".." or norm.startswith("../") else norm


# The builder.

_DESCRIPTION = """\
Calligraphy and handwriting: images of characters and words from a local folder with
labels.csv or labels.json (file, text, script, style[, kind, language]), or rendered
synthetically with bundled script and handwriting fonts. Captions name the text, its
script and its style.
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the images under <manual_dir> and a labels.csv (header: file,text,script,style and
optionally kind,language) or labels.json (a list of such objects) in <manual_dir>; see
charred/datasets/calligraphy.py. The synthetic configs need no manual_dir.
"""


@dataclasses.dataclass(eq=False)
class CalligraphyConfig(tfds.core.BuilderConfig):
  """BuilderConfig for `Calligraphy`.

  Attributes:
    min_side: drops images with a side shorter than this.
    synthetic: render this source into the download dir instead of reading manual_dir.
  """
  min_side: int = 32
  synthetic: SyntheticConfig | None = None


DEFAULT = CalligraphyConfig(name="default", description="A labelled folder (manual_dir).")
SYNTHETIC = CalligraphyConfig(name="synthetic", description="2000 rendered examples.",
                              synthetic=SyntheticConfig())
SYNTHETIC_MICRO = CalligraphyConfig(name="synthetic_micro", description="For smoke tests.",
                                    synthetic=SyntheticConfig(num_examples=32))
SYNTHETIC_HAN = CalligraphyConfig(
    name="synthetic_han", description="64 rendered Han examples (needs fonts-arphic-ukai).",
    synthetic=SyntheticConfig(num_examples=64, fonts=("ukai",)))


class Calligraphy(web_images.BeamWhenAsked, tfds.core.GeneratorBasedBuilder):
  """Calligraphy images captioned with their text, script and style (through Beam when a
  build is given a runner; see `web_images.BeamWhenAsked`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [DEFAULT, SYNTHETIC, SYNTHETIC_MICRO, SYNTHETIC_HAN]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=web_images.example_features(
            text=tfds.features.Text(),
            script=tfds.features.Text(),
            style=tfds.features.Text(),
            kind=tfds.features.Text(),
        ),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    synthetic = self.builder_config.synthetic
    if synthetic is None:
      try:
        folder = epath.Path(dl_manager.manual_dir)
      except AssertionError as e:  # TFDS's multi-line one: no manual_dir, or an empty one.
        raise ValueError(f"{str(e).splitlines()[0].split('. Create it')[0]}: it must hold "
                         f"{LABELS_CSV} or {LABELS_JSON} and the images (or use a "
                         "synthetic config)") from None
    else:
      folder = epath.Path(dl_manager.download_dir) / f"calligraphy_{self.builder_config.name}"
      write_synthetic_folder(folder, synthetic)
    return {"train": self._generate_examples(folder)}

  def _generate_examples(self, folder: epath.Path):
    # The labels are read and checked here, in the driver (the first row of a file
    # wins); workers decode the images.
    _, rows = read_labels(folder)
    skipped = web_images.SkipCounter()
    labels: dict[str, dict[str, str]] = {}
    for _, fields in rows:
      label, reason = parse_label(fields)
      if label is None:
        skipped.skip(reason)
      elif label[0] in labels:
        skipped.skip(DUPLICATE_FILE)
      else:
        labels[label[0]] = label[1]
    example = functools.partial(label_example, folder=str(folder),
                                min_side=self.builder_config.min_side)
    return self.generate_records("train", list(labels.items()), example, skipped)


def parse_label(fields: dict[str, str]
                ) -> tuple[tuple[str, dict[str, str]] | None, str | None]:
  """(file, {text, kind, script, style, language}) of one labels row, its file
  normalised, or (None, skip reason)."""
  if not fields["text"]:
    return None, TEXT_EMPTY
  if not web_images.is_valid_utf8(fields["text"]):
    return None, TEXT_INVALID_UTF8
  text = fields["text"]
  meta = {k: fields.get(k, "").strip() for k in ("file", "script", "style", "kind",
                                                   "language")}
  if not all(web_images.is_valid_utf8(v) for v in meta.values()):
    return None, web_images.METADATA_INVALID_UTF8
  kind = meta["kind"].lower() or (CHARACTER if len(text) == 1 else WORD)
  if kind not in KINDS:
    return None, KIND_UNKNOWN
  if not meta["file"]:
    return None, web_images.IMAGE_MISSING
  file = _relative_file(meta["file"])
  if file is None:
    return None, FILE_OUTSIDE_FOLDER
  return (file, dict(text=text, kind=kind, script=meta["script"], style=meta["style"],
                     language=meta["language"])), None


def label_example(file: str, label: dict[str, str], folder: str,
                  min_side: int) -> tuple[dict | None, str | None]:
  """The feature dict of the image `file` (under `folder`) with its parsed `label`, or
  (None, skip reason)."""
  image, reason = web_images.load_image(epath.Path(folder) / file, min_side)
  if reason:
    return None, reason
  nan = float("nan")
  return dict(
      image=image.data,
      caption=caption(label["kind"], label["text"], label["script"], label["style"]),
      language=web_images.normalize_language(label["language"]), key=file,
      width=image.width, height=image.height, source=SOURCE,
      similarity=nan, pwatermark=nan, punsafe=nan, aesthetic_score=nan,
      text=label["text"], script=label["script"], style=label["style"], kind=label["kind"],
  ), None
