"""ByT5 byte-level tokenizer in pure Python + numpy.

The trainer and sampler run on hosts without TensorFlow, so this module mirrors
`seqio.ByteVocabulary` (and `transformers.ByT5Tokenizer`) without importing
either. Ids: 0 = PAD, 1 = EOS, 2 = UNK, byte b -> b + 3. An encoded sequence of
length L holds at most L - 1 bytes followed by EOS, then PAD, which is exactly
seqio's `tokenize` + `append_eos_after_trim` + padding to `sequence_length`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
NUM_SPECIAL_TOKENS = 3
VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS  # 259, as seqio.ByteVocabulary().vocab_size


def _byte_ids(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + NUM_SPECIAL_TOKENS


def num_tokens(text: str) -> int:
  """Tokens `text` needs including EOS; compare against `max_length`."""
  return len(text.encode("utf-8")) + 1


def encode(text: str, max_length: int) -> np.ndarray:
  """Encodes `text` to int32 [max_length]: bytes (trimmed to max_length - 1), EOS, PAD."""
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}.")
  ids = _byte_ids(text)[: max_length - 1]
  out = np.full((max_length,), PAD_ID, dtype=np.int32)
  out[: len(ids)] = ids
  out[len(ids)] = EOS_ID
  return out


def encode_batch(texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Encodes a batch; returns (ids int32 [B, L], mask int32 [B, L]) with mask = ids != PAD."""
  ids = np.zeros((len(texts), max_length), dtype=np.int32)
  for i, text in enumerate(texts):
    ids[i] = encode(text, max_length)
  return ids, (ids != PAD_ID).astype(np.int32)


def token_of_char(text: str) -> np.ndarray:
  """int32 [len(text)]: the token holding each character's first byte (its index in the
  UTF-8 encoding), e.g. to find a rendered glyph's token."""
  return np.cumsum([0] + [len(ch.encode("utf-8")) for ch in text[:-1]]).astype(np.int32)


def decode(ids: Iterable[int] | np.ndarray) -> str:
  """Decodes ids up to the first EOS; PAD/UNK are skipped, invalid UTF-8 is replaced."""
  out = bytearray()
  for i in np.asarray(ids).reshape(-1).tolist():
    if i == EOS_ID:
      break
    if NUM_SPECIAL_TOKENS <= i < VOCAB_SIZE:
      out.append(i - NUM_SPECIAL_TOKENS)
  return out.decode("utf-8", errors="replace")


def check_length(text: str, max_length: int) -> None:
  """Raises a clear ValueError if `text` would be truncated at `max_length`."""
  n = num_tokens(text)
  if n > max_length:
    raise ValueError(
        f"Prompt needs {n} byte tokens (UTF-8 bytes + EOS) but the model's text "
        f"length is {max_length}: {text!r}")
