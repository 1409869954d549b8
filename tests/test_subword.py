"""charred.subword: the character-blind SentencePiece arm and the common tokenizer interface."""
import os
import string

import numpy as np
import pytest

from charred import subword
from charred import tokenizer as byte_tokenizer
from conftest import run_cli

CAPTIONS = [
    'A sign that says "hello".',
    'A sign that says "Hello".',
    'A sign that says "HELLO".',
    'A poster that reads "Xylophone" in RED letters.',
    "qzxv wqnhib",
    "Grüße aus Köln, 你好 🎉",
    "  two  spaces\tand a tab\n",
    "",
]


@pytest.fixture(scope="module")
def sub():
  return subword.get_tokenizer(subword.SUBWORD_EN_1K)


def test_shipped_model(sub):
  assert os.path.getsize(subword.DEFAULT_MODEL_PATH) < 1 << 20
  assert sub.vocab_size == 1024
  assert sub.name == "subword_en_1k"


@pytest.mark.parametrize("text", CAPTIONS)
def test_round_trip(sub, text):
  ids = sub.encode(text, sub.num_tokens(text))
  assert ids[-1] == subword.EOS_ID
  assert sub.decode(ids) == text
  # Padding after EOS does not change the text.
  assert sub.decode(sub.encode(text, sub.num_tokens(text) + 5)) == text


@pytest.mark.parametrize("text", ["qzxv", "qzxvbk", "xylophone", "antidisestablishment",
                                  "QZXV", "Zyzzyva", "café"])
def test_unseen_and_rare_words_split_into_known_pieces(sub, text):
  ids = sub.encode(text, 64)
  pieces = ids[: sub.num_tokens(text) - 1]
  assert len(pieces) > 1
  assert subword.UNK_ID not in ids
  assert ((0 <= ids) & (ids < sub.vocab_size)).all()
  assert subword.PAD_ID not in pieces and subword.EOS_ID not in pieces


def test_random_six_letter_strings_take_several_pieces(sub):
  rng = np.random.default_rng(0)
  letters = list(string.ascii_lowercase)
  for _ in range(50):
    text = "".join(rng.choice(letters, 6))
    ids = sub.encode(text, 16)
    assert sub.num_tokens(text) - 1 >= 3, (text, sub.pieces(text))
    assert subword.UNK_ID not in ids
    # Letters are pieces of their own, so a-z strings never need byte fallback.
    assert not any(p.startswith("<0x") for p in sub.pieces(text)), sub.pieces(text)


def test_common_words_are_single_opaque_pieces(sub):
  for word in ("the", "sign", "that", "says", "of", "and"):
    assert sub.pieces(word) == ["▁" + word]
    assert sub.num_tokens(word) == 2  # the piece and EOS
  # In the prompt template each of ' sign', ' that', ' says' is one piece: its id says
  # nothing about the letters s-i-g-n.
  assert sub.pieces('A sign that says "hi".') == [
      "▁", "A", "▁sign", "▁that", "▁says", '▁"', "hi", '"', "."]
  sign_id = sub.encode(" sign", 3)[1]
  assert sign_id >= byte_tokenizer.VOCAB_SIZE  # a learned piece, not a byte


def test_byte_fallback_ids_are_byt5_ids(sub):
  pieces = sub.pieces("é")
  assert pieces == ["▁", "<0xC3>", "<0xA9>"]
  ids = sub.encode("é", 4)
  np.testing.assert_array_equal(ids[1:3], byte_tokenizer.encode("é", 3)[:2])


def test_encode_batch_layout(sub):
  # ▁the = 276; ▁ A ▁sign ▁that ▁says = 259 263 268 264 270; ▁ q z x v = 259 1002 527 437 325.
  ids, mask = sub.encode_batch(["the", 'A sign that says "hi".', "", "qzxv"], 6)
  expected = np.array([
      [276, 1, 0, 0, 0, 0],
      [259, 263, 268, 264, 270, 1],  # 9 pieces trimmed to 5, then EOS
      [1, 0, 0, 0, 0, 0],
      [259, 1002, 527, 437, 325, 1],
  ], dtype=np.int32)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  np.testing.assert_array_equal(ids, expected)
  np.testing.assert_array_equal(mask, (expected != 0).astype(np.int32))
  assert sub.pieces("the") == ["▁the"] and sub.pieces("qzxv") == ["▁", "q", "z", "x", "v"]


def test_encode_edge_lengths(sub):
  np.testing.assert_array_equal(sub.encode("the", 1), [subword.EOS_ID])
  with pytest.raises(ValueError, match="max_length must be >= 1"):
    sub.encode("the", 0)


def test_decode_stops_at_eos_and_skips_specials(sub):
  the, says = sub.encode("the", 2)[0], sub.encode("says", 2)[0]
  assert sub.decode([the, subword.PAD_ID, subword.UNK_ID, 5000, subword.EOS_ID, says]) == "the"
  assert sub.decode(np.array([[the], [says]])) == "the says"


def test_check_length(sub):
  text = 'A sign that says "hi".'
  assert sub.num_tokens(text) == 10
  sub.check_length(text, 10)
  with pytest.raises(ValueError, match=r"needs 10 subword_en_1k tokens .* length is 9"):
    sub.check_length(text, 9)


def test_byte_tokenizer_matches_charred_tokenizer():
  tok = subword.get_tokenizer("bytes")
  assert isinstance(tok, subword.ByteTokenizer)
  assert tok.vocab_size == byte_tokenizer.VOCAB_SIZE == 259
  for length in (1, 5, 64):
    got, expected = tok.encode_batch(CAPTIONS, length), byte_tokenizer.encode_batch(CAPTIONS,
                                                                                     length)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
  for text in CAPTIONS:
    np.testing.assert_array_equal(tok.encode(text, 32), byte_tokenizer.encode(text, 32))
    assert tok.num_tokens(text) == byte_tokenizer.num_tokens(text)
    assert tok.decode(tok.encode(text, tok.num_tokens(text))) == text
  with pytest.raises(ValueError, match="byte tokens"):
    tok.check_length("hello", 5)


def test_tokenizers_share_the_interface(sub):
  tok = subword.get_tokenizer("bytes")
  for attr in ("vocab_size", "encode", "encode_batch", "decode", "num_tokens", "check_length"):
    assert hasattr(tok, attr) and hasattr(sub, attr)
  assert subword.get_tokenizer("subword_en_1k") is sub  # cached


def test_unknown_tokenizer():
  with pytest.raises(ValueError, match=r"Unknown tokenizer 'wordpiece'.*bytes, subword_en_1k"):
    subword.get_tokenizer("wordpiece")


def test_missing_model_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m charred.subword"):
    subword.SubwordTokenizer(str(tmp_path / "none.model"))


def test_training_data_has_real_words_only():
  import wordfreq  # pylint: disable=g-import-not-at-top
  quoted, lines = set(), 0
  for line in subword.training_sentences():
    sentence, count = line.split("\t")
    assert int(count) >= 1
    lines += 1
    if '"' in sentence:
      quoted.add(sentence.split('"')[1])
    else:
      assert wordfreq.word_frequency(sentence, "en") > 0, sentence
  assert lines > 50000
  assert {"sign", "Sign", "SIGN"} <= quoted
  for word in quoted:
    assert wordfreq.word_frequency(word.lower(), "en") > 0, word


def test_retraining_reproduces_shipped_model(tmp_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  out = tmp_path / "subword.model"
  run_cli("subword", f"--output={out}")
  shipped = spm.SentencePieceProcessor(model_file=subword.DEFAULT_MODEL_PATH)
  retrained = spm.SentencePieceProcessor(model_file=str(out))
  pieces = lambda sp: [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
  assert pieces(retrained) == pieces(shipped)
  with open(out, "rb") as f, open(subword.DEFAULT_MODEL_PATH, "rb") as g:
    assert f.read() == g.read()


def test_cli_rejects_bad_output(tmp_path):
  proc = run_cli("subword", f"--output={tmp_path / 'vocab'}", check=False)
  assert proc.returncode != 0
  assert "must end in .model" in proc.stderr


def test_vocab_size_too_small():
  with pytest.raises(ValueError, match="must exceed the 259"):
    subword.vocabulary_proto(vocab_size=259)
