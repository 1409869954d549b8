r"""A character-blind subword tokenizer: the control arm of Liu et al. 2022 (2212.10562).

ByT5 sees every byte of a prompt; a subword model sees ids such as "▁sign" that carry
no direct signal about the letters inside them, which is what Liu et al. found makes
T5-conditioned models misspell. `subword_en_1k` is a SentencePiece vocabulary trained
offline on natural English only (wordfreq's frequency-weighted words plus caption
templates showing real words in lower, Title and UPPER case), never on random letter
strings, so frequent words are single opaque pieces and unseen strings split into
known pieces. It ships as package data; regenerate it with

  python -m charred.subword --output=charred/data/subword_en_1k.model

Ids follow T5 and charred.tokenizer: 0 = PAD, 1 = EOS, 2 = UNK, no BOS. With
byte_fallback, ids 3..258 are the byte pieces <0x00>..<0xFF> (byte b -> b + 3, as in
ByT5), so any string encodes and UNK never appears; byte pieces are rare for a-z words
because every letter seen in training is a piece of its own. Normalisation is the
identity with whitespace kept, so decode(encode(text)) == text for every string and
the two arms differ only in segmentation.

`get_tokenizer('bytes' | 'subword_en_1k')` returns objects with one interface:
vocab_size, encode, encode_batch, decode, num_tokens, check_length.
"""
from __future__ import annotations

import functools
import io
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from charred import tokenizer as byte_tokenizer

PAD_ID = byte_tokenizer.PAD_ID
EOS_ID = byte_tokenizer.EOS_ID
UNK_ID = byte_tokenizer.UNK_ID

BYTES = "bytes"
SUBWORD_EN_1K = "subword_en_1k"
TOKENIZERS = (BYTES, SUBWORD_EN_1K)
DEFAULT_MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                  f"{SUBWORD_EN_1K}.model")

# Training data. wordfreq frequencies are fractions of all English tokens ("the" ~ 0.05),
# scaled to integer counts; every kept word appears at least once.
_LANG = "en"
_COUNT_SCALE = 1e6
# Caption templates show the typography data's words in three cases; each (template,
# case) sentence gets this fraction of the word's own count, so they shape the
# pieces for quotes and capitals without outweighing natural text.
_TEMPLATES = ('A sign that says "{}".', 'A poster that reads "{}".',
              'The word "{}" written in large letters.')
_TEMPLATE_WORDS = 3000
_TEMPLATE_WEIGHT = 0.05
_SEED = 0


# --- Training ---------------------------------------------------------------------------

def _cased_forms(word: str) -> tuple[str, str, str]:
  """lower, Title, UPPER: the three cases the prompts show words in."""
  return word.lower(), word[:1].upper() + word[1:].lower(), word.upper()


def _word_counts(num_words: int) -> list[tuple[str, int]]:
  """wordfreq's top English words (ASCII only) with counts proportional to frequency.

  Non-ASCII words are left out so the small vocabulary is spent on English; their
  characters still encode through byte fallback.
  """
  import wordfreq  # pylint: disable=g-import-not-at-top
  return [(w, max(1, round(wordfreq.word_frequency(w, _LANG) * _COUNT_SCALE)))
          for w in wordfreq.top_n_list(_LANG, num_words) if w.isascii() and "\t" not in w]


def training_sentences(num_words: int = 50000) -> Iterator[str]:
  """Training data as 'sentence<TAB>count' lines (SentencePiece's tsv input).

  Counts weight sentences without repeating them, so training stays a few seconds.
  Real words only: random letter strings would teach the letters of unseen words.
  """
  counts = _word_counts(num_words)
  for word, count in counts:
    yield f"{word}\t{count}"
  alphabetic = [(w, c) for w, c in counts if w.isalpha()][:_TEMPLATE_WORDS]
  for template in _TEMPLATES:
    for word, count in alphabetic:
      weight = max(1, round(count * _TEMPLATE_WEIGHT))
      for form in _cased_forms(word):
        yield f"{template.format(form)}\t{weight}"


def vocabulary_proto(vocab_size: int = 1024, num_words: int = 50000) -> bytes:
  """Trains the SentencePiece model and returns its serialized ModelProto.

  Deterministic: one thread, no sampling or shuffling of the input, a fixed seed, and
  the model goes to a writer instead of `model_prefix`, so no path ends up in the
  proto and retraining gives identical bytes.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if vocab_size <= byte_tokenizer.VOCAB_SIZE:
    raise ValueError(f"vocab_size must exceed the {byte_tokenizer.VOCAB_SIZE} special and "
                     f"byte-fallback pieces, got {vocab_size}.")
  spm.set_random_generator_seed(_SEED)
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=training_sentences(num_words),
      model_writer=writer,
      input_format="tsv",
      vocab_size=vocab_size,
      # Unigram, as T5's SentencePiece vocabulary: it keeps whole frequent words as
      # single pieces and picks the most probable segmentation of rarer ones.
      model_type="unigram",
      character_coverage=1.0,
      byte_fallback=True,
      # Lossless, unlike T5's nmt_nfkc: the arms then differ only in segmentation.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2)
  return writer.getvalue()


def train_vocabulary(output_prefix: str, vocab_size: int = 1024,
                     num_words: int = 50000) -> str:
  """Trains the vocabulary and writes `{output_prefix}.model`; returns that path."""
  path = f"{output_prefix}.model"
  proto = vocabulary_proto(vocab_size, num_words)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(proto)
  return path


# --- Tokenizers -------------------------------------------------------------------------

def _check_max_length(max_length: int) -> None:
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}.")


def _pad(ids: Sequence[int], max_length: int) -> np.ndarray:
  """int32 [max_length]: ids trimmed to max_length - 1, EOS, then PAD."""
  _check_max_length(max_length)
  ids = list(ids)[: max_length - 1]
  out = np.full((max_length,), PAD_ID, dtype=np.int32)
  out[: len(ids)] = ids
  out[len(ids)] = EOS_ID
  return out


class ByteTokenizer:
  """charred.tokenizer (ByT5 bytes) behind the common tokenizer interface."""

  name = BYTES
  vocab_size = byte_tokenizer.VOCAB_SIZE

  def encode(self, text: str, max_length: int) -> np.ndarray:
    return byte_tokenizer.encode(text, max_length)

  def encode_batch(self, texts: Sequence[str],
                   max_length: int) -> tuple[np.ndarray, np.ndarray]:
    return byte_tokenizer.encode_batch(texts, max_length)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    return byte_tokenizer.decode(ids)

  def num_tokens(self, text: str) -> int:
    return byte_tokenizer.num_tokens(text)

  def check_length(self, text: str, max_length: int) -> None:
    byte_tokenizer.check_length(text, max_length)

  def token_of_char(self, text: str) -> np.ndarray:
    return byte_tokenizer.token_of_char(text)


class SubwordTokenizer:
  """A SentencePiece model with charred.tokenizer's interface and PAD/EOS layout."""

  def __init__(self, model_path: str = DEFAULT_MODEL_PATH, name: str | None = None):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"No SentencePiece model at {model_path}; regenerate it with "
                              "`python -m charred.subword --output=PATH`.")
    self.model_path = model_path
    self.name = name or os.path.splitext(os.path.basename(model_path))[0]
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f"{model_path}: (pad, eos, unk) ids are {ids}, expected "
                       f"{(PAD_ID, EOS_ID, UNK_ID)}.")
    self.vocab_size = self._sp.get_piece_size()

  def pieces(self, text: str) -> list[str]:
    """The pieces of `text` (no EOS), e.g. ['▁sign'], for inspection."""
    return self._sp.encode(text, out_type=str)

  def _ids(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode(self, text: str, max_length: int) -> np.ndarray:
    """Encodes `text` to int32 [max_length]: pieces (trimmed to max_length - 1), EOS, PAD."""
    return _pad(self._ids(text), max_length)

  def encode_batch(self, texts: Sequence[str],
                   max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (ids int32 [B, L], mask int32 [B, L]) with mask = ids != PAD."""
    _check_max_length(max_length)
    ids = np.zeros((len(texts), max_length), dtype=np.int32)
    for i, text in enumerate(texts):
      ids[i] = self.encode(text, max_length)
    return ids, (ids != PAD_ID).astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Decodes ids up to the first EOS; PAD, UNK and out-of-range ids are skipped."""
    kept = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if i not in (PAD_ID, UNK_ID) and 0 <= i < self.vocab_size:
        kept.append(i)
    return self._sp.decode(kept)

  def num_tokens(self, text: str) -> int:
    """Tokens `text` needs including EOS; compare against `max_length`."""
    return len(self._ids(text)) + 1

  def token_of_char(self, text: str) -> np.ndarray:
    """int32 [len(text)]: the index of the piece holding each character's first byte
    (pieces carry byte offsets into `text`; the '▁' a word starts with covers none)."""
    starts = byte_tokenizer.token_of_char(text)
    out = np.full(len(text), -1, np.int32)
    proto = self._sp.encode(text, return_type="proto")
    for index, piece in enumerate(proto.pieces):
      if piece.end > piece.begin:
        out[(starts >= piece.begin) & (starts < piece.end)] = index
    return out

  def check_length(self, text: str, max_length: int) -> None:
    """Raises a clear ValueError if `text` would be truncated at `max_length`."""
    n = self.num_tokens(text)
    if n > max_length:
      raise ValueError(
          f"Prompt needs {n} {self.name} tokens (pieces + EOS) but the model's text "
          f"length is {max_length}: {text!r}")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> ByteTokenizer | SubwordTokenizer:
  """The tokenizer called `name`: 'bytes' (ByT5) or 'subword_en_1k' (shipped model)."""
  if name == BYTES:
    return ByteTokenizer()
  if name == SUBWORD_EN_1K:
    return SubwordTokenizer(DEFAULT_MODEL_PATH, name=SUBWORD_EN_1K)
  raise ValueError(f"Unknown tokenizer {name!r}; known tokenizers: {', '.join(TOKENIZERS)}.")


# --- CLI --------------------------------------------------------------------------------

def main(argv) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  output = flags.FLAGS.output
  if not output.endswith(".model"):
    raise app.UsageError(f"--output must end in .model, got {output!r}.")
  path = train_vocabulary(output[: -len(".model")], flags.FLAGS.vocab_size,
                          flags.FLAGS.num_words)
  print(f"Wrote {path} ({os.path.getsize(path)} bytes).")


if __name__ == "__main__":
  from absl import app as _app, flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string("output", DEFAULT_MODEL_PATH, "Model file to write (ends in .model).")
  _flags.DEFINE_integer("vocab_size", 1024, "Pieces, including 3 specials and 256 bytes.")
  _flags.DEFINE_integer("num_words", 50000, "wordfreq's top English words to train on.")
  _app.run(main)
