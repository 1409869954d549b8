"""The typography signs without TensorFlow: random access by index, and batches.

Example i of a split is a pure function of (config, split, i) (see `render.py`), so the
plain-sign configs need no prepared files: this module renders them on the fly, for hosts
that have jax but no TensorFlow (GPU hosts often do not), and is what the TFDS builder
(`typography.py`) stores. `make_iterator` yields the batches `pipeline.make_iterator`
yields, with the same keys; unshuffled, the very same batches. Shuffled, each epoch is a
numpy permutation of the indices (`epoch_order`) instead of tf.data's shuffle buffer, so
the stream is a pure function of (seed, position) and resuming at batch k costs nothing.

It also gives what only a renderer knows: `glyph_tokens`, for every pixel, the caption
token whose glyph covers it, and `glyph_chars`, that glyph's character (-1 elsewhere), for
training-only losses (each letter's cross-attention pulled into its box; a per-cell
character head). Nothing at sampling time sees them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import numpy as np

from charred import tokenizer as bytes_tokenizer
from charred.datasets import ladder
from charred.datasets import render as render_lib
from charred.datasets import streams
from charred.datasets import words as words_lib

TRAIN, VALIDATION, TEST = "train", "validation", "test"
# Examples of different splits are rendered from disjoint (seed, index) streams.
SPLIT_OFFSETS = {TRAIN: 0, VALIDATION: 1 << 32, TEST: 2 << 32}
_WORD_ORDER, _PHRASE, _CURRICULUM = 0, 1, 2
_BUCKET_RANK = {b: i for i, b in enumerate(words_lib.BUCKETS)}
STRING_KEYS = ("caption", "text", "word", "frequency_bucket")


@dataclasses.dataclass(frozen=True)
class SignsConfig:
  """Plain signs: what a `typography` builder config holds, minus TFDS.

  Attributes:
    render: image geometry and style ranges.
    words: how the train/validation word lists are drawn.
    seed: seeds the word order, phrases and every rendered style.
    num_train_examples: size of the train split (words are cycled).
    num_validation_examples: size of the validation split; None renders each
      validation word once.
    phrase_probability: probability that an example shows two words of its
      split (a short phrase) rather than one.
    num_test_examples: size of the test split (words.num_test > 0); None renders each
      test word once.
    validation_fonts: faces only the validation split draws (with the render
      config's held_out_probability, else a training face); never in `render.fonts`.
    test_fonts: the same for the test split.
    language: R4's templates, several words, digits and punctuation (ladder.py);
      None: one word of the split in `render.template`.
  """
  render: render_lib.RenderConfig = render_lib.RenderConfig()
  words: words_lib.WordSplitConfig = words_lib.WordSplitConfig()
  seed: int = 0
  num_train_examples: int = 60000
  num_validation_examples: int | None = None
  phrase_probability: float = 0.0
  num_test_examples: int | None = None
  validation_fonts: tuple[str, ...] = ()
  test_fonts: tuple[str, ...] = ()
  language: ladder.LanguageConfig | None = None


# Glyph placement is kept nearly fixed (one font size, 3-5 px left margin), so that the
# column of character i depends on i alone: what a CPU-sized model can learn in minutes.
# Colours, background, weight, case and vertical position still vary; `base` varies all.
TINY = SignsConfig(
    render=render_lib.RenderConfig(font_size=(18, 18), x_offset=(3, 5), y_jitter=1))
# Tiny in black on white: the same words, cases, weights and placement, without random
# colours. Random colours, which no caption names, dominate a pixel loss (the background
# is ~90 % of the pixels); without them the loss is about the glyphs.
TINY_BW = SignsConfig(render=dataclasses.replace(TINY.render, colors=((0, 0, 0),
                                                                      (255, 255, 255))))
# Tiny on the patch grid: black on white, one placement, glyph k exactly in pixel columns
# [4 + 12k, 16 + 12k) (DejaVu Sans Mono advances 12 px at 20 px), i.e. three whole 4-px
# patches. Every patch then shows part of one glyph at a fixed phase, so what a cell
# draws is a function of its letter, case, weight and phase in the cell.
TINY_GRID = SignsConfig(render=dataclasses.replace(
    TINY_BW.render, font_size=(20, 20), x_offset=(4, 4), y_jitter=0))
# Tiny at half the resolution: 16x64 signs, the same glyph layout at 9 px (advance 5.4 px,
# ~12 cells across). A 2x2-patch U-Net then sees the same 8x32 grid as tiny's 4x4 one
# but writes 12 values per cell instead of 48; OCR still reads 98.7 % of ground-truth
# renders (case-insensitive, 300 validation words).
TINY16 = SignsConfig(
    render=render_lib.RenderConfig(height=16, width=64, font_size=(9, 9), x_offset=(1, 3),
                                   y_jitter=1))
# For end-to-end tests of the whole job: the tiny geometry, seconds to generate.
MICRO = SignsConfig(render=TINY.render, words=words_lib.WordSplitConfig(num_validation=32),
                    num_train_examples=256)
BASE = SignsConfig(
    render=render_lib.RenderConfig(
        height=64, width=256, fonts=render_lib.ALL_FONTS, font_size=(18, 44),
        x_offset=(4, 40), y_jitter=8),
    num_train_examples=500000,
    phrase_probability=0.25,
)
# The realism ladder (issue 23; ladder.py): each rung adds one factor to the one below,
# all with tiny_grid's validation words and a test split of 300 more (taken out of its
# training words); faces are split from R2 on. R0 is tiny_grid itself.
LADDER_WORDS = words_lib.WordSplitConfig(num_test=300)
# R1: free placement: the word anywhere it fits (2 px from the sides, its line inside),
# same font, size, colours, template and words as tiny_grid. Text boxes span the font's
# line (ascent to descent), so a box's top is one distance above the baseline whatever the
# letters (`RenderConfig.line_boxes`; 'r1_ink' boxes the ink instead: docs/text_rendering.md).
R1 = SignsConfig(render=dataclasses.replace(TINY_GRID.render, placement=render_lib.ANYWHERE,
                                            line_boxes=True),
                 words=LADDER_WORDS)
# R2: + fonts and sizes: proportional DejaVu Sans and Serif, Sans Mono, in regular, bold
# and oblique/italic, and a handwriting face (Caveat, from its fontpkg wheel), at 10-22 px
# (glyph heights vary > 2x). One face is held out for validation and another for test
# (each drawn for half of its split's examples, a training face for the other half).
R2_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
            "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-BoldItalic.ttf",
            "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
            "caveat")
R2 = dataclasses.replace(
    R1, render=dataclasses.replace(R1.render, fonts=R2_FONTS, font_size=(10, 22)),
    validation_fonts=("DejaVuSerif-Italic.ttf",), test_fonts=("DejaVuSans-BoldOblique.ttf",))
# R3: + colour and background: random text and background colours at least 0.5 apart in
# luma, linear gradients, 0-3 rectangles or ellipses and noise behind the text (every
# background colour on the same side of the text's luma, >= 0.4 from it), and the text
# layer rotated by up to +/- 5 degrees (glyph boxes: the rotated cells' bounds).
R3 = dataclasses.replace(R2, render=dataclasses.replace(
    R2.render, colors=None, min_contrast=0.5, background=render_lib.SCENE, rotation=5.0))
# R4: + language, at 64x256 (20-44 px): 10 training caption templates (some naming the
# text's palette colour or its font family, which the image then shows), 2 more for
# validation and 2 for test; texts of 1-3 tokens (the split's word, further words,
# numbers), joined by spaces, hyphens or ' & ', maybe with closing punctuation, 1-12
# characters; captions of at most 95 bytes (text_length 96 with EOS).
R4 = dataclasses.replace(R3, render=dataclasses.replace(
    R3.render, height=64, width=256, font_size=(20, 44)), language=ladder.LanguageConfig())
# Ablations of the ladder: R1 and R2 with boxes over the text's ink (which move with its
# ascenders and descenders), and R1 at R2's sizes (10-22 px) in R1's faces.
R1_INK = dataclasses.replace(R1, render=dataclasses.replace(R1.render, line_boxes=False))
R2_INK = dataclasses.replace(R2, render=dataclasses.replace(R2.render, line_boxes=False))
R1_SIZES = dataclasses.replace(R1, render=dataclasses.replace(
    R1.render, font_size=R2.render.font_size))
CONFIGS = {"tiny": TINY, "tiny_bw": TINY_BW, "tiny_grid": TINY_GRID, "tiny16": TINY16,
           "micro": MICRO, "base": BASE, "r0": TINY_GRID, "r1": R1, "r2": R2, "r3": R3,
           "r4": R4, "r1_ink": R1_INK, "r2_ink": R2_INK, "r1_sizes": R1_SIZES}


def get_config(name: str) -> SignsConfig:
  if name not in CONFIGS:
    raise ValueError(f"No TF-free signs config {name!r}; known: {sorted(CONFIGS)} (SVG "
                     "scenes and HTML layouts need the TFDS builder).")
  return CONFIGS[name]


def example_words(config, split: str, index: int, split_words: list[str]) -> list[str]:
  """Lowercase source words of example `index` of `split` (one, or two for a phrase).
  `config` is a SignsConfig or a typography builder config (seed, phrase_probability)."""
  if split == TRAIN:
    # One seeded permutation, cycled: each word appears ~num_train/len times.
    order = _permutation(config.seed, len(split_words))
    first = split_words[order[index % len(split_words)]]
  else:
    first = split_words[index % len(split_words)]  # Already shuffled per seed.
  if config.phrase_probability <= 0:
    return [first]
  rng = np.random.default_rng([config.seed, SPLIT_OFFSETS[split] + index, _PHRASE])
  if rng.random() >= config.phrase_probability:
    return [first]
  return [first, split_words[int(rng.integers(len(split_words)))]]


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, _WORD_ORDER]).permutation(n)


def phrase_bucket(words: list[str]) -> str:
  """Frequency bucket of a phrase: that of its rarest word."""
  return max((words_lib.frequency_bucket(w) for w in words), key=_BUCKET_RANK.__getitem__)


def glyph_index_map(example: dict[str, Any]) -> np.ndarray:
  """int32 [H, W]: the index in the caption of the character whose glyph box covers each
  pixel, -1 elsewhere. Boxes are the glyphs' advance cells over the text line's height."""
  out = np.full(example["image"].shape[:2], -1, np.int32)
  start = example["caption"].index(example["text"])
  for k, (x0, y0, x1, y1) in enumerate(render_lib.glyph_boxes(example["text"], example)):
    if not example["text"][k].isspace():
      out[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = start + k
  return out


def text_box(example: dict[str, Any]) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1): the drawn text's ink box, the union of its non-space glyph boxes."""
  if "text_box" in example:
    return tuple(example["text_box"])
  return ladder.union_box(example["text"], render_lib.glyph_boxes(example["text"], example))


def _per_character(index_map: np.ndarray, values: np.ndarray) -> np.ndarray:
  """`values` of the caption character at each pixel of `index_map`, -1 where none."""
  return np.where(index_map >= 0, values[np.maximum(index_map, 0)], -1).astype(np.int32)


def _first_bytes(caption: str) -> np.ndarray:
  return np.array([ch.encode("utf-8")[0] for ch in caption], np.int32)


class SignsSource:
  """Random access to one split of a signs config: `source[i]` is example i, exactly as
  the TFDS builder stores it (image as a uint8 array rather than PNG bytes)."""

  def __init__(self, config: SignsConfig | str, split: str):
    self.config = get_config(config) if isinstance(config, str) else config
    if split not in SPLIT_OFFSETS:
      raise ValueError(f"Unknown split {split!r}; expected one of {tuple(SPLIT_OFFSETS)}.")
    self.split = split
    self.words = words_lib.word_splits(self.config.words).get(split, [])
    if not self.words:
      raise ValueError(f"This signs config has no {split} words (words.num_test=0).")
    self._pools: dict[int, list[str]] = {}  # max_length -> the words that short
    if split == TRAIN:
      self.num_examples = self.config.num_train_examples
    elif split == VALIDATION:
      self.num_examples = self.config.num_validation_examples or len(self.words)
    else:
      self.num_examples = self.config.num_test_examples or len(self.words)
    self.render = split_render_config(self.config, split)
    alphabet = split_alphabet(self.words)
    if self.config.language is not None:
      self.config.language.check()
      alphabet += self.config.language.alphabet
    # Bad fonts fail here, when the config is first used, in one line.
    ladder.check_fonts(self.render.fonts + self.render.held_out_fonts, alphabet,
                       f"the {split} words and templates")

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.example(index)

  def example(self, index: int, max_length: int | None = None) -> dict[str, Any]:
    """Example `index`; with `max_length`, a first word longer than that is replaced by
    one of at most `max_length` letters from the same split, drawn from (seed, index)."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"{self.split} has {self.num_examples} examples, not index {index}.")
    words = example_words(self.config, self.split, index, self.words)
    if max_length is not None and len(words[0]) > max_length:
      pool = self._words_up_to(max_length)
      rng = np.random.default_rng(
          [self.config.seed, SPLIT_OFFSETS[self.split] + index, _CURRICULUM])
      words = [pool[int(rng.integers(len(pool)))]] + words[1:]
    if self.config.language is not None:
      ex = ladder.example(self.config.language, self.render, self.config.seed,
                          SPLIT_OFFSETS[self.split] + index, self.split, words[0], self.words)
      words = ex["words"] or [ex["text"]]  # a number alone: its own bucket
    else:
      ex = render_lib.render_example(" ".join(words), self.config.seed,
                                     SPLIT_OFFSETS[self.split] + index, self.render,
                                     draw=ladder.draw)
    ex["frequency_bucket"] = phrase_bucket(words)
    ex["text_box"] = text_box(ex)
    return ex

  def _words_up_to(self, max_length: int) -> list[str]:
    if max_length not in self._pools:
      pool = [w for w in self.words if len(w) <= max_length]
      if not pool:
        raise ValueError(f"No {self.split} word has at most {max_length} letters.")
      self._pools[max_length] = pool
    return self._pools[max_length]


def split_render_config(config: SignsConfig, split: str) -> render_lib.RenderConfig:
  """The render config of `split`: an evaluation split's held-out faces added."""
  held_out = {VALIDATION: config.validation_fonts, TEST: config.test_fonts}.get(split, ())
  if not held_out:
    return config.render
  return dataclasses.replace(config.render, held_out_fonts=tuple(held_out))


def split_alphabet(split_words) -> str:
  """Every character the words of a split can be drawn with (any case)."""
  chars = set("".join(split_words))
  return "".join(sorted(chars | {c.upper() for c in chars}))


def curriculum_max_length(position: int, ramp: int, min_length: int, max_length: int) -> int:
  """The longest word at training image `position` of a length curriculum that lets in
  one more letter per equal share of the first `ramp` images (min_length at 0, every
  length from `ramp` on); `ramp` 0: no curriculum."""
  if ramp <= 0 or position >= ramp:
    return max_length
  return min_length + (max_length - min_length + 1) * position // ramp


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  """The example indices of one epoch, in stream order."""
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def encode_captions(captions, text_length: int, tokenizer=None):
  """(tokens, mask, token_of_char per caption) with `tokenizer` (charred.subword's
  objects; None: ByT5's bytes, charred.tokenizer)."""
  tokenizer = tokenizer or bytes_tokenizer
  tokens, mask = tokenizer.encode_batch(captions, text_length)
  return tokens, mask, [tokenizer.token_of_char(c) for c in captions]


def make_batch(examples: list[dict[str, Any]], text_length: int, tokenizer=None,
               glyph_tokens: bool = True) -> dict[str, np.ndarray]:
  """Model inputs of `examples`: image float32 [B,H,W,3] in [-1, 1], text_tokens and
  text_mask int32 [B,L], the string features, text_box int32 [B, 4] (the text's
  (x0, y0, x1, y1) box), and int32 [B,H,W] per-pixel targets from
  `glyph_index_map`: glyph_tokens, the caption token of the glyph there (-1 also for
  tokens cut off by truncation), and glyph_chars, its character's first UTF-8 byte (a
  character head's target, the same for any tokenizer); and int32 [B] blank_tokens, the
  token right after the drawn text (-1 if cut off)."""
  captions = [ex["caption"] for ex in examples]
  tokens, mask, token_of_char = encode_captions(captions, text_length, tokenizer)
  batch = {
      "image": np.stack([ex["image"] for ex in examples]).astype(np.float32) / 127.5 - 1.0,
      "text_tokens": tokens, "text_mask": mask,
      **{k: np.array([ex[k] for ex in examples]) for k in STRING_KEYS},
      # The drawn text's ink box, (x0, y0, x1, y1) pixels.
      "text_box": np.array([text_box(ex) for ex in examples], np.int32).reshape(-1, 4),
  }
  if glyph_tokens:
    index_maps = [glyph_index_map(ex) for ex in examples]  # the boxes, once per example
    maps = np.stack([_per_character(m, t) for m, t in zip(index_maps, token_of_char)])
    # Only tokens the model sees (bytes before EOS) are targets.
    batch["glyph_tokens"] = np.where(maps < text_length - 1, maps, -1).astype(np.int32)
    batch["glyph_chars"] = np.stack([_per_character(m, _first_bytes(c))
                                     for m, c in zip(index_maps, captions)])
    # The token right after the drawn text (the closing quote): the key that cells showing
    # no glyph may attend to (TrainConfig.attention_loss_blank).
    after = [t[c.index(ex["text"]) + len(ex["text"])] if c.index(ex["text"]) + len(
        ex["text"]) < len(c) else -1 for t, c, ex in zip(token_of_char, captions, examples)]
    batch["blank_tokens"] = np.array([a if 0 <= a < text_length - 1 else -1 for a in after],
                                     np.int32)
  return batch


def make_dataset(config: SignsConfig | str, split: str, batch_size: int, text_length: int,
                 seed: int = 0, shuffle: bool = True, repeat: bool = True,
                 shard_index: int = 0, shard_count: int = 1, tokenizer=None,
                 glyph_tokens: bool = True, length_curriculum: int = 0):
  """This shard's batches of one split as a random-access `grain.MapDataset`
  (`streams.epoch_batches` over `epoch_order`): element k is this shard's rows of global
  batch k, rendered when read. `length_curriculum` > 0: stream position p shows words of
  at most `curriculum_max_length(p, length_curriculum, ...)` letters (short words first).
  """
  source = SignsSource(config, split)
  n = len(source)
  words = source.config.words

  def read(positions, indices) -> dict[str, np.ndarray]:
    return make_batch([source.example(i, curriculum_max_length(
        int(p), length_curriculum, words.min_length, words.max_length)
                                      if length_curriculum else None)
                       for p, i in zip(positions, indices)], text_length, tokenizer,
                      glyph_tokens)

  return streams.epoch_batches(n, lambda epoch: epoch_order(n, seed, epoch, shuffle),
                               batch_size, read, repeat=repeat, shard_index=shard_index,
                               shard_count=shard_count, name=f"signs {split}")


def make_iterator(config: SignsConfig | str, split: str, batch_size: int, text_length: int,
                  seed: int = 0, start_batch: int = 0, prefetch: int = 4,
                  **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """Batches of one split, rendered on the fly; `pipeline.make_iterator`'s contract.

  Grain's iterator over `make_dataset` (kwargs as there) from batch `start_batch` on
  (`streams.iterate`): batch k of the stream from 0 is batch 0 of the stream from
  `start_batch=k`; `prefetch` batches are rendered ahead on a background thread; it
  checkpoints with `get_state()` / `set_state()`.
  """
  return streams.iterate(make_dataset(config, split, batch_size, text_length, seed, **kwargs),
                         start_batch, prefetch)


def rendering_targets(config: SignsConfig | str, split: str = VALIDATION) -> list[dict[str, str]]:
  """Held-out prompts in split order, as `pipeline.rendering_targets` gives them, with
  the box each text was drawn in (what a box-conditioned model is told)."""
  source = SignsSource(config, split)
  return [{"prompt": ex["caption"], "text": ex["text"], "bucket": ex["frequency_bucket"],
           "box": tuple(int(v) for v in ex["text_box"])}
          for ex in (source[i] for i in range(len(source)))]


def ground_truth_config(builder_config: str, height: int, width: int):
  """The `RenderConfig` of the run's typography config, at the sampled images' size.

  Looked up in `CONFIGS` (TF-free, the same configs the TFDS builder stores); the
  scene configs do not render plain signs, so they get `RenderConfig()`, which is also
  what their TFDS configs hold.
  """
  config = CONFIGS[builder_config].render if builder_config in CONFIGS else (
      render_lib.RenderConfig())
  return dataclasses.replace(config, height=height, width=width)


def render_ground_truth(texts, config, seed: int = 0):
  """uint8 [N, H, W, 3] signs showing each of `texts` as written (no case change).

  Styles are drawn as training draws them (`ladder.draw`), image i from the rng seeded
  with (seed, i), so the result is a pure function of the arguments.
  """
  return np.stack([image for image, _ in _drawn(texts, config, seed)])


def ground_truth_boxes(texts, config, seed: int = 0) -> np.ndarray:
  """int32 [N, 4]: the box (x0, y0, x1, y1) of each of `texts` in `render_ground_truth`'s
  image of it (same arguments): where the data would draw that text. What a
  box-conditioned model is told for a prompt that comes without a box."""
  return np.array([text_box(dict(style, text=text))
                   for text, (_, style) in zip(texts, _drawn(texts, config, seed))], np.int32)


def _drawn(texts, config, seed: int):
  """(image, style) of each of `texts`, drawn with the rng seeded with (seed, i)."""
  if not texts:
    raise ValueError('No texts to render.')
  return [ladder.draw(text, np.random.default_rng([seed, i]), config)
          for i, text in enumerate(texts)]
