"""`typography` TFDS builder: synthetic signs, SVG scenes and HTML/CSS layouts.

Nothing is downloaded: example i of a split is rendered from
(config.seed, split offset + i) with matplotlib's DejaVu fonts, so a dataset is
a pure function of its BuilderConfig. Train and validation draw from disjoint
word lists (see `words.py`), so validation measures spelling of unseen words.
Configs with a `scene` render SVG scenes (`svg_scenes`, resvg) or HTML/CSS layouts
(`html_layouts`, headless Chromium) instead of plain signs.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from charred.datasets import html_layouts
from charred.datasets import render as render_lib
from charred.datasets import signs
from charred.datasets import svg_scenes
from charred.datasets import web_images
from charred.datasets import words as words_lib

_DESCRIPTION = """\
Synthetic typography: words and short phrases rendered on plain backgrounds in
varied DejaVu fonts, sizes, colours, positions and lower/Title/UPPER case, with
captions such as 'A sign that says "Hello".'. Training and validation words
are disjoint (case-insensitively); words are English words from wordfreq plus
random letter strings, tagged with a DrawText-style frequency bucket.
"""

TRAIN, VALIDATION = signs.TRAIN, signs.VALIDATION
_SPLIT_OFFSETS = signs.SPLIT_OFFSETS
example_words = signs.example_words
phrase_bucket = signs.phrase_bucket


@dataclasses.dataclass(eq=False)
class TypographyConfig(tfds.core.BuilderConfig):
  """BuilderConfig for `Typography`.

  Attributes:
    render: image geometry and style ranges.
    words: how the train/validation word lists are drawn.
    seed: seeds the word order, phrases and every rendered style.
    num_train_examples: size of the train split (words are cycled).
    num_validation_examples: size of the validation split; None renders each
      validation word once.
    phrase_probability: probability that an example shows two words of its
      split (a short phrase) rather than one.
    scene: if set, examples are SVG scenes (resvg) or HTML/CSS layouts
      (headless Chromium) about the example's word(s), with further strings
      drawn from the same split; `render` is then unused.
  """
  render: render_lib.RenderConfig = render_lib.RenderConfig()
  words: words_lib.WordSplitConfig = words_lib.WordSplitConfig()
  seed: int = 0
  num_train_examples: int = 60000
  num_validation_examples: int | None = None
  phrase_probability: float = 0.0
  scene: svg_scenes.SceneConfig | html_layouts.LayoutConfig | None = None


def _from_signs(config: signs.SignsConfig, **kwargs) -> TypographyConfig:
  """The TFDS config storing a plain-signs config (`signs.py` renders the same on the fly).
  The realism ladder's fields (test split, held-out faces, templates) are signs-only:
  a config that sets one is refused rather than stored without it."""
  known = {f.name for f in dataclasses.fields(TypographyConfig)}
  extra = [f.name for f in dataclasses.fields(config)
           if f.name not in known and getattr(config, f.name) != f.default]
  if extra:
    raise ValueError(f"The TFDS builder cannot store signs fields {extra}; render it with "
                     "signs.py (DataConfig.source='render').")
  return TypographyConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                             if f.name in known}, **kwargs)


# Plain signs: see signs.py for what each varies.
TINY = _from_signs(signs.TINY, name="tiny", description=(
    "32x128, monospace DejaVu at 18 px, single words (60k train examples)."))
TINY_BW = _from_signs(signs.TINY_BW, name="tiny_bw", description=(
    "32x128 like tiny, black text on white (60k train examples)."))
TINY_GRID = _from_signs(signs.TINY_GRID, name="tiny_grid", description=(
    "32x128, black on white, 20 px glyphs on a fixed 12 px grid (60k train examples)."))
TINY16 = _from_signs(signs.TINY16, name="tiny16", description=(
    "16x64, monospace DejaVu at 9 px, single words (60k train examples)."))
MICRO = _from_signs(signs.MICRO, name="micro", description=(
    "32x128 like tiny, 256 train and 32 validation examples (tests)."))
BASE = _from_signs(signs.BASE, name="base", description=(
    "64x256, all DejaVu faces, words and two-word phrases (500k train)."))

# Graphic scenes and page layouts. Their captions' template words are kept out of
# validation, like "sign", "that" and "says" above.
SVG_TINY = TypographyConfig(
    name="svg_tiny",
    description="128x128 SVG scenes (signs, badges, posters, arched and rotated text) "
                "rasterised by resvg (20k train examples).",
    scene=svg_scenes.SceneConfig(),
    words=words_lib.WordSplitConfig(train_only=tuple(sorted(
        set(words_lib.WordSplitConfig.train_only) | set(svg_scenes.CAPTION_WORDS)))),
    num_train_examples=20000,
    phrase_probability=0.2,
)

LAYOUT_TINY = TypographyConfig(
    name="layout_tiny",
    description="256x256 HTML/CSS layouts (web banner, menu card, two-column page, table) "
                "screenshot by headless Chromium (10k train examples).",
    scene=html_layouts.LayoutConfig(),
    words=words_lib.WordSplitConfig(train_only=tuple(sorted(
        set(words_lib.WordSplitConfig.train_only) | set(html_layouts.CAPTION_WORDS)))),
    num_train_examples=10000,
    phrase_probability=0.2,
)


def generate_example(config: TypographyConfig, split: str, index: int,
                     split_words: list[str]) -> dict[str, object]:
  """The TFDS feature dict of example `index` of `split` (image as PNG bytes)."""
  words = example_words(config, split, index, split_words)
  if isinstance(config.scene, svg_scenes.SceneConfig):
    ex = svg_scenes.render_example(" ".join(words), split_words, config.seed,
                                   _SPLIT_OFFSETS[split] + index, config.scene)
  elif isinstance(config.scene, html_layouts.LayoutConfig):
    ex = html_layouts.render_example(" ".join(words), split_words, config.seed,
                                     _SPLIT_OFFSETS[split] + index, config.scene)
  else:
    ex = render_lib.render_example(" ".join(words), config.seed,
                                   _SPLIT_OFFSETS[split] + index, config.render)
  # Encoding with PIL is ~10x faster than TFDS's per-image TF graph run.
  buf = io.BytesIO()
  Image.fromarray(ex["image"]).save(buf, format="png")
  return dict(image=buf.getvalue(), caption=ex["caption"], text=ex["text"],
              word=ex["word"], font=ex["font"], frequency_bucket=phrase_bucket(words))


class Typography(tfds.core.GeneratorBasedBuilder):
  """Synthetic signs showing words, captioned 'A sign that says "<word>".'."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [TINY, TINY_BW, TINY_GRID, TINY16, MICRO, BASE, SVG_TINY, LAYOUT_TINY]
  DEFAULT_CONFIG_NAME = "tiny"

  code_path = web_images.ModuleFile()

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.scene or self.builder_config.render  # Both have height, width.
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(r.height, r.width, 3), dtype=np.uint8, encoding_format="png"),
            "caption": tfds.features.Text(),
            "text": tfds.features.Text(),  # As rendered (cased).
            "word": tfds.features.Text(),  # Lowercase source word(s).
            "font": tfds.features.Text(),
            "frequency_bucket": tfds.features.Text(),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is rendered locally.
    config = self.builder_config
    splits = words_lib.word_splits(config.words)
    num_val = config.num_validation_examples
    if num_val is None:
      num_val = len(splits[VALIDATION])
    return {
        TRAIN: self._generate_examples(TRAIN, config.num_train_examples, splits[TRAIN]),
        VALIDATION: self._generate_examples(VALIDATION, num_val, splits[VALIDATION]),
    }

  def _generate_examples(self, split: str, num_examples: int, split_words: list[str]):
    config = self.builder_config
    for i in range(num_examples):
      yield i, generate_example(config, split, i, split_words)
