"""SeqIO tasks over the `typography` TFDS datasets.

The caption is tokenized with ByT5's byte vocabulary (`seqio.ByteVocabulary`),
trimmed to leave room for EOS, and EOS appended, into 'text_tokens'. Padding
to the model's text length happens in `pipeline.py`. `charred.tokenizer`
produces the same ids without TensorFlow, for sampling and evaluation.
"""
from __future__ import annotations

import functools

import seqio

# Importing registers the `typography` builder with TFDS, where seqio looks it up.
from charred.datasets import typography

BYTE_VOCABULARY = seqio.ByteVocabulary()
TOKENS_KEY = "text_tokens"
# Features passed through untouched next to the tokens.
PASSTHROUGH_KEYS = ("image", "caption", "text", "word", "frequency_bucket")

OUTPUT_FEATURES = {TOKENS_KEY: seqio.Feature(BYTE_VOCABULARY, add_eos=True)}


def tfds_name(builder_config: str) -> str:
  return f"typography/{builder_config}:{typography.Typography.VERSION}"


def register_typography_task(name: str = "typography_tiny", builder_config: str = "tiny",
                             data_dir: str | None = None) -> str:
  """Registers (once) a seqio.Task over `typography/<builder_config>`; returns its name.

  `builder_config` may also name a custom TypographyConfig already prepared in
  `data_dir`: TFDS then reads it back with a read-only builder.
  """
  source = seqio.TfdsDataSource(tfds_name=tfds_name(builder_config), tfds_data_dir=data_dir)
  if name in seqio.TaskRegistry.names():
    existing = seqio.TaskRegistry.get(name).source
    if (existing.tfds_dataset.name, existing.tfds_dataset.data_dir) != (
        source.tfds_dataset.name, source.tfds_dataset.data_dir):
      raise ValueError(
          f"SeqIO task {name!r} is already registered for "
          f"{existing.tfds_dataset.name} in {existing.tfds_dataset.data_dir}, "
          f"not {source.tfds_dataset.name} in {source.tfds_dataset.data_dir}.")
    return name
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=caption_preprocessors(PASSTHROUGH_KEYS),
      output_features=OUTPUT_FEATURES,
  )
  return name


def caption_preprocessors(passthrough_keys) -> list:
  """The caption tokenized into `text_tokens` (EOS after trimming), next to
  `passthrough_keys` kept untouched."""
  key_map = {TOKENS_KEY: "caption", **{k: k for k in passthrough_keys}}
  return [
      functools.partial(seqio.preprocessors.rekey, key_map=key_map),
      # The caption is kept as-is, so no '<key>_pretokenized' copy.
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      seqio.preprocessors.append_eos_after_trim,
  ]
