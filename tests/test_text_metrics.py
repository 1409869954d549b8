"""Closed-form checks of charred.evaluation.text_metrics."""
import math

import numpy as np
import pytest

from charred.datasets import render
from charred.datasets import signs
from charred.evaluation import text_metrics


def test_identical_strings_are_perfect():
  m = text_metrics.score(["Hello", "abc"], ["Hello", "abc"])
  perfect = {"exact_match": 1.0, "exact_match_ci": 1.0, "char_accuracy": 1.0, "cer": 0.0}
  assert m == dict(
      exact_match=1.0, exact_match_ci=1.0, ned=1.0, num_words=2,
      char_accuracy=1.0, char_accuracy_ci=1.0, cer=0.0, cer_ci=0.0,
      **{f"{k}/len_5": v for k, v in perfect.items()}, **{"num_words/len_5": 1},
      **{f"{k}/len_3": v for k, v in perfect.items()}, **{"num_words/len_3": 1})


def test_one_substitution_in_five_letters():
  m = text_metrics.score(["Hxllo"], ["Hello"])
  assert m["exact_match"] == 0.0
  assert m["exact_match_ci"] == 0.0
  assert m["ned"] == pytest.approx(0.8)  # 1 - 1/5.


def test_case_only_difference_counts_for_ci_but_not_cs():
  m = text_metrics.score(["HELLO", "world"], ["hello", "world"])
  assert m["exact_match"] == 0.5
  assert m["exact_match_ci"] == 1.0
  assert m["ned"] == pytest.approx((0.0 + 1.0) / 2)  # All 5 letters differ in case.


def test_empty_prediction_scores_zero():
  m = text_metrics.score(["", "cat"], ["dog", "cat"])
  assert m["exact_match"] == 0.5
  assert m["ned"] == pytest.approx(0.5)  # 1 - 3/3 = 0 and 1.


def test_length_mismatch_uses_longer_string():
  # One deletion: distance 1, longer length 4.
  assert text_metrics.score(["cat"], ["cart"])["ned"] == pytest.approx(0.75)
  # One insertion: distance 1, longer length 6.
  assert text_metrics.score(["planet"], ["plant"])["ned"] == pytest.approx(5 / 6)


def test_normalization_strips_only_surrounding_punctuation():
  assert text_metrics.normalize(' "Hello." ') == "Hello"
  assert text_metrics.normalize("\u201cHi!\u201d") == "Hi"
  assert text_metrics.normalize("don't") == "don't"
  assert text_metrics.normalize("two words") == "two words"
  m = text_metrics.score(["'Sign'", "Sign."], ["Sign", "sign"])
  assert m["exact_match"] == 0.5  # Case is kept.
  assert m["exact_match_ci"] == 1.0


def test_buckets():
  m = text_metrics.score(["abc", "XYZ", "nope", "qq"], ["abc", "xyz", "yes", "qq"],
                         buckets=["frequent", "rare", "rare", "unseen"])
  assert m["exact_match_ci/frequent"] == 1.0
  assert m["exact_match_ci/rare"] == 0.5
  assert m["exact_match_ci/unseen"] == 1.0
  assert m["exact_match"] == 0.5
  assert m["exact_match_ci"] == 0.75
  assert m["num_words"] == 4
  assert m["exact_match/rare"] == 0.0  # XYZ != xyz.
  assert m["exact_match/frequent"] == m["char_accuracy/unseen"] == m["ned/unseen"] == 1.0


def test_no_words_gives_nan():
  m = text_metrics.score([], [])
  assert m["num_words"] == 0
  assert math.isnan(m["exact_match"]) and math.isnan(m["ned"])
  assert math.isnan(m["char_accuracy"]) and math.isnan(m["cer"])
  assert not any("/len_" in k for k in m)


def test_length_mismatch_raises():
  with pytest.raises(ValueError):
    text_metrics.score(["a"], ["a", "b"])
  with pytest.raises(ValueError):
    text_metrics.score(["a"], ["a"], buckets=["x", "y"])


# char_accuracy / cer. Each alignment below is the only minimum-distance one, so the
# matched count does not depend on rapidfuzz's tie-breaking. Notation: target over
# prediction, `=` equal, `s` substitution, `i` insertion, `d` deletion.


def test_substitution():
  # h e l l o
  # h a l l o
  # = s = = =   -> 4 of 5 target characters matched, distance 1.
  m = text_metrics.score(["hallo"], ["hello"])
  assert m["char_accuracy"] == pytest.approx(4 / 5)
  assert m["cer"] == pytest.approx(1 / 5)
  assert text_metrics.matched_chars("hallo", "hello") == 4


def test_insertion():
  # a b - c
  # a b x c
  # = = i =     -> 3 of 3 matched, distance 1.
  m = text_metrics.score(["abxc"], ["abc"])
  assert m["char_accuracy"] == 1.0
  assert m["cer"] == pytest.approx(1 / 3)
  assert m["exact_match"] == 0.0  # All characters found, but not the word.


def test_deletion():
  # a b c d
  # a b - d
  # = = d =     -> 3 of 4 matched, distance 1.
  m = text_metrics.score(["abd"], ["abcd"])
  assert m["char_accuracy"] == pytest.approx(3 / 4)
  assert m["cer"] == pytest.approx(1 / 4)


def test_character_metrics_are_micro_averages():
  # The three cases above: (4 + 3 + 3) / (5 + 3 + 4) matched, (1 + 1 + 1) / 12 errors;
  # the mean of the per-word accuracies would be (4/5 + 1 + 3/4) / 3 = 0.85 instead.
  m = text_metrics.score(["hallo", "abxc", "abd"], ["hello", "abc", "abcd"])
  assert m["char_accuracy"] == pytest.approx(10 / 12)
  assert m["cer"] == pytest.approx(3 / 12)


def test_case_folded_character_metrics():
  # h e l l o       (no common letter but e, o: longest common subsequence 2)
  # H e L L o
  # s = s s =   -> 2 of 5, distance 3; folded, identical.
  m = text_metrics.score(["HeLLo"], ["hello"])
  assert m["char_accuracy"] == pytest.approx(2 / 5)
  assert m["cer"] == pytest.approx(3 / 5)
  assert m["char_accuracy_ci"] == 1.0 and m["cer_ci"] == 0.0
  # Folded: h e l l o
  #         h a l - o
  #         = s = d =   -> 3 of 5, distance 2 (any other distance-2 alignment needs one
  #                        deletion and one substitution too, so also matches 3).
  # Case-sensitive: 'HALO' shares no character with 'hello': 0 of 5, distance 5.
  m = text_metrics.score(["HALO"], ["hello"])
  assert m["char_accuracy_ci"] == pytest.approx(3 / 5)
  assert m["cer_ci"] == pytest.approx(2 / 5)
  assert m["char_accuracy"] == 0.0
  assert m["cer"] == 1.0


def test_empty_prediction_character_metrics():
  # d o g
  # - - -
  # d d d       -> 0 of 3, distance 3.
  m = text_metrics.score([""], ["dog"])
  assert m["char_accuracy"] == 0.0 and m["char_accuracy_ci"] == 0.0
  assert m["cer"] == 1.0 and m["cer_ci"] == 1.0


def test_cer_can_exceed_one():
  # a b - -
  # x y z w
  # s s i i     -> 0 of 2, distance 4.
  m = text_metrics.score(["xyzw"], ["ab"])
  assert m["cer"] == pytest.approx(2.0)
  assert m["char_accuracy"] == 0.0


def test_character_metrics_ignore_surrounding_punctuation():
  m = text_metrics.score(['"hallo."'], ["Hello!"])  # 'hallo' vs 'Hello': 3 of 5.
  assert m["char_accuracy"] == pytest.approx(3 / 5)
  assert m["char_accuracy_ci"] == pytest.approx(4 / 5)
  assert m["cer"] == pytest.approx(2 / 5)
  assert m["cer_ci"] == pytest.approx(1 / 5)


def test_by_target_length():
  # Lengths after normalisation: 3, 3, 5, 3 ('sun.' -> 'sun').
  m = text_metrics.score(["cat", "Dog", "hallo", ""], ["cat", "dog", "hello", "sun."])
  assert sorted(k for k in m if "/len_" in k) == sorted(
      f"{k}/len_{n}" for n in (3, 5)
      for k in ("exact_match", "exact_match_ci", "char_accuracy", "cer", "num_words"))
  assert m["num_words/len_3"] == 3 and m["num_words/len_5"] == 1
  assert m["exact_match/len_3"] == pytest.approx(1 / 3)  # cat
  assert m["exact_match_ci/len_3"] == pytest.approx(2 / 3)  # cat, Dog
  # Matched: cat 3, Dog/dog 2 (D/d substituted), '' 0; distances 0, 1, 3.
  assert m["char_accuracy/len_3"] == pytest.approx(5 / 9)
  assert m["cer/len_3"] == pytest.approx(4 / 9)
  assert m["exact_match/len_5"] == 0.0 and m["exact_match_ci/len_5"] == 0.0
  assert m["char_accuracy/len_5"] == pytest.approx(4 / 5)
  assert m["cer/len_5"] == pytest.approx(1 / 5)
  assert m["num_words"] == 4


def test_character_metrics_by_bucket():
  m = text_metrics.score(["hallo", "abxc", "abd", "same"], ["hello", "abc", "abcd", "same"],
                         buckets=["x", "x", "y", "y"])
  assert m["char_accuracy/x"] == pytest.approx((4 + 3) / (5 + 3))
  assert m["ned/x"] == pytest.approx((1 - 1 / 5 + 1 - 1 / 4) / 2)  # Longer length 5, 4.
  assert m["exact_match/x"] == 0.0 and m["exact_match_ci/x"] == 0.0
  assert m["char_accuracy/y"] == pytest.approx((3 + 4) / (4 + 4))
  assert m["ned/y"] == pytest.approx((1 - 1 / 4 + 1) / 2)
  assert m["exact_match/y"] == 0.5


def test_bucket_named_like_a_length_group_raises():
  with pytest.raises(ValueError, match="len_3"):
    text_metrics.score(["abc"], ["abc"], buckets=["len_3"])


# Ground truth for the evaluate CLI's `ceiling/` metrics (read by OCR in test_cli).


def test_ground_truth_config_is_the_run_style_at_the_sample_size():
  config = signs.ground_truth_config("tiny", 64, 256)
  assert (config.height, config.width) == (64, 256)
  assert config.font_size == (18, 18) and config.x_offset == (3, 5)  # signs.TINY's style.
  assert signs.ground_truth_config("svg_tiny", 128, 128) == render.RenderConfig(
      height=128, width=128)


def test_render_ground_truth_draws_the_texts_as_written():
  config = signs.ground_truth_config("micro", 32, 128)
  images = signs.render_ground_truth(["abc", "ABC"], config, seed=3)
  assert images.shape == (2, 32, 128, 3) and images.dtype == np.uint8
  # Image i uses the rng (seed, i), as documented.
  expected = render.render("ABC", np.random.default_rng([3, 1]), config)[0]
  np.testing.assert_array_equal(images[1], expected)
  np.testing.assert_array_equal(signs.render_ground_truth(["abc", "ABC"], config, seed=3),
                                images)
  # The case is kept: the same style draws 'abc' and 'ABC' differently.
  same_style = signs.render_ground_truth(["abc", "abc"], config, seed=3)
  assert not np.array_equal(images[1], same_style[1])
  assert all(len(np.unique(im.reshape(-1, 3), axis=0)) > 2 for im in images)  # Text drawn.
  with pytest.raises(ValueError):
    signs.render_ground_truth([], config)
