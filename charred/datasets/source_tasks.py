"""SeqIO tasks over the web image-text builders (`laion_hr`, `wit_images`).

Same model inputs as the typography tasks (`tasks.py`): the caption tokenized
with ByT5's `seqio.ByteVocabulary`, trimmed to leave room for EOS and
EOS-terminated, as 'text_tokens'; the common-schema features next to it.
Padding to the model's text length is left to the input pipeline.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import seqio
import tensorflow_datasets as tfds

# Importing registers the builders with TFDS, where seqio looks them up.
from charred.datasets import laion_hr  # pylint: disable=unused-import
from charred.datasets import tasks
from charred.datasets import wit  # pylint: disable=unused-import

# Features passed through untouched next to the tokens.
PASSTHROUGH_KEYS = ("image", "caption", "language", "width", "height", "key")
# The arguments of the tasks registered here, by name.
_REGISTERED: dict[str, tuple[Any, ...]] = {}


def register_source_task(name: str, tfds_name: str, data_dir: str | None = None,
                         decode_image: bool = True,
                         source_preprocessors: Sequence[Callable[..., Any]] = ()) -> str:
  """Registers (once) a seqio.Task over a prepared web dataset; returns its name.

  Args:
    name: the task name, e.g. 'laion_hr'.
    tfds_name: 'laion_hr/default:1.0.0', 'wit_images/default', ...
    data_dir: where the dataset was prepared (TFDS's default when None).
    decode_image: False keeps 'image' as the stored JPEG/PNG bytes (a scalar
      tf.string), for decoding later in the pipeline.
    source_preprocessors: seqio preprocessors run on the full TFDS examples
      (every feature, float metadata included) before tokenization, e.g.
      quality filters.
  """
  args = (tfds_name, data_dir, decode_image, tuple(source_preprocessors))
  if name in seqio.TaskRegistry.names():
    if _REGISTERED.get(name) != args:
      raise ValueError(f"SeqIO task {name!r} is already registered with "
                       f"{_REGISTERED.get(name, 'other arguments')}, not {args} "
                       "(tfds_name, data_dir, decode_image, source_preprocessors).")
    return name
  decoders = None if decode_image else {"image": tfds.decode.SkipDecoding()}
  source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir,
                                decoders=decoders)
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[*source_preprocessors, *tasks.caption_preprocessors(PASSTHROUGH_KEYS)],
      output_features=tasks.OUTPUT_FEATURES,
  )
  _REGISTERED[name] = args
  return name
