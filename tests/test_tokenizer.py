"""charred.tokenizer must match seqio.ByteVocabulary and transformers' ByT5Tokenizer."""
import numpy as np
import pytest

from charred import tokenizer

TEXTS = [
    'A sign that says "Hello".',
    "Grüße aus Köln, Straße",
    "你好，世界",
    "مرحبا بالعالم",
    "emoji 🎉👍🏽 ok",
    "",
    "x",
]
LENGTHS = [1, 2, 5, 16, 64]


def _seqio_encode(text: str, max_length: int) -> np.ndarray:
  """seqio's tokenize + append_eos_after_trim + pad, written out."""
  import seqio  # pylint: disable=g-import-not-at-top
  ids = seqio.ByteVocabulary().encode(text)[: max_length - 1] + [1]
  return np.array(ids + [0] * (max_length - len(ids)), dtype=np.int32)


def test_constants_match_seqio():
  import seqio  # pylint: disable=g-import-not-at-top
  vocab = seqio.ByteVocabulary()
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (
      tokenizer.PAD_ID, tokenizer.EOS_ID, tokenizer.UNK_ID)
  assert vocab.vocab_size == tokenizer.VOCAB_SIZE == 259


@pytest.mark.parametrize("text", TEXTS)
def test_matches_seqio_byte_vocabulary(text):
  import seqio  # pylint: disable=g-import-not-at-top
  vocab = seqio.ByteVocabulary()
  full = tokenizer.encode(text, tokenizer.num_tokens(text))
  np.testing.assert_array_equal(full[:-1], vocab.encode(text))
  assert full[-1] == tokenizer.EOS_ID
  # The TF op path must agree with the Python path too.
  np.testing.assert_array_equal(full[:-1], vocab.encode_tf(text).numpy())
  for n in LENGTHS:
    np.testing.assert_array_equal(tokenizer.encode(text, n), _seqio_encode(text, n))


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers_byt5(text):
  transformers = pytest.importorskip("transformers")
  hf = transformers.ByT5Tokenizer()  # Byte vocabulary: no download needed.
  for n in LENGTHS:
    expected = hf(text, truncation=True, max_length=n, padding="max_length")
    ids, mask = tokenizer.encode_batch([text], n)
    np.testing.assert_array_equal(ids[0], expected["input_ids"], err_msg=f"{text!r} L={n}")
    np.testing.assert_array_equal(mask[0], expected["attention_mask"])


def test_truncation_keeps_eos_and_shapes():
  ids = tokenizer.encode("abcdef", 4)
  assert ids.dtype == np.int32 and ids.shape == (4,)
  np.testing.assert_array_equal(ids, [ord("a") + 3, ord("b") + 3, ord("c") + 3, 1])
  np.testing.assert_array_equal(tokenizer.encode("", 3), [1, 0, 0])
  ids, mask = tokenizer.encode_batch(["ab", "abcdef", ""], 5)
  assert ids.shape == mask.shape == (3, 5) and mask.dtype == np.int32
  np.testing.assert_array_equal(mask.sum(-1), [3, 5, 1])
  with pytest.raises(ValueError):
    tokenizer.encode("a", 0)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(text):
  n = tokenizer.num_tokens(text)
  assert n == len(text.encode("utf-8")) + 1
  assert tokenizer.decode(tokenizer.encode(text, n + 3)) == text
  # Cutting a multi-byte character in half must not raise.
  tokenizer.decode(tokenizer.encode(text, max(1, n - 2)))


def test_decode_stops_at_eos_and_skips_specials():
  assert tokenizer.decode([ord("h") + 3, 2, ord("i") + 3, 1, ord("x") + 3, 0]) == "hi"
  assert tokenizer.decode(np.array([[0, ord("a") + 3]])) == "a"


def test_check_length():
  tokenizer.check_length("abc", 4)
  with pytest.raises(ValueError, match="4 byte tokens"):
    tokenizer.check_length("abc", 3)


def test_no_tensorflow_import():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys, charred.tokenizer, charred.datasets, charred.datasets.words, "
          "charred.datasets.render; "
          "assert not {'tensorflow', 'seqio', 'tensorflow_datasets'} & set(sys.modules), "
          "sorted(m for m in sys.modules if 'tensorflow' in m or 'seqio' in m)")
  subprocess.run([sys.executable, "-c", code], check=True)
