"""Closed-form checks of charred.evaluation.text_metrics."""
import math

import pytest

from charred.evaluation import text_metrics


def test_identical_strings_are_perfect():
  m = text_metrics.score(["Hello", "abc"], ["Hello", "abc"])
  assert m == dict(exact_match=1.0, exact_match_ci=1.0, ned=1.0, num_words=2)


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


def test_no_words_gives_nan():
  m = text_metrics.score([], [])
  assert m["num_words"] == 0
  assert math.isnan(m["exact_match"]) and math.isnan(m["ned"])


def test_length_mismatch_raises():
  with pytest.raises(ValueError):
    text_metrics.score(["a"], ["a", "b"])
  with pytest.raises(ValueError):
    text_metrics.score(["a"], ["a"], buckets=["x", "y"])
