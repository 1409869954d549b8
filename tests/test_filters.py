"""Quality filters: each rule on hand-picked examples, with exact outcome counts."""
import functools

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")

from charred.datasets import filters  # pylint: disable=g-import-not-at-top,wrong-import-position


def _captions(captions):
  return tf.data.Dataset.from_tensor_slices({"caption": tf.constant(captions, tf.string)})


def _run(filter_fn, ds, **kwargs):
  """(kept captions or examples, the filter's outcome counts)."""
  counts = filters.FilterCounts()
  out = list(filter_fn(ds, counts=counts, **kwargs).as_numpy_iterator())
  (per_outcome,) = counts.as_dict().values()
  return out, per_outcome


def _kept_captions(out):
  return [ex["caption"] for ex in out]


def test_valid_caption():
  captions = [b"caf\xc3\xa9 au lait",          # valid 2-byte UTF-8
              "Zeichen \ufffd ersetzt".encode(),  # a genuine U+FFFD is valid
              b"bad \xff byte",                 # invalid start byte
              b"cut \xe2\x82",                  # truncated 3-byte sequence
              b"\xed\xa0\x80 surrogate",        # UTF-16 surrogate, invalid in UTF-8
              b"   \t ", b""]
  out, counts = _run(filters.valid_caption, _captions(captions))
  assert _kept_captions(out) == captions[:2]
  assert counts == {"kept": 2, "invalid_utf8": 3, "empty": 2}
  invalid = []  # The reference: Python's strict decoder.
  for c in captions:
    try:
      c.decode("utf-8")
    except UnicodeDecodeError:
      invalid.append(c)
  assert len(invalid) == counts["invalid_utf8"]


def test_caption_length_counts_bytes_and_words():
  captions = ["été", "  ab  ", "a dog", "Ein großer Hund", "one two three four five six"]
  # Reference lengths: UTF-8 bytes of the stripped caption, whitespace words.
  nbytes = [len(c.strip().encode()) for c in captions]
  assert nbytes == [5, 2, 5, 16, 27]
  out, counts = _run(filters.caption_length, _captions(captions), min_bytes=5, max_bytes=20)
  assert _kept_captions(out) == [c.encode() for c in ("été", "a dog", "Ein großer Hund")]
  assert counts == {"kept": 3, "too_short": 1, "too_long": 1}
  out, counts = _run(filters.caption_length, _captions(captions), min_bytes=None,
                     min_words=2, max_words=5)
  assert _kept_captions(out) == [b"a dog", "Ein großer Hund".encode()]
  assert counts == {"kept": 2, "too_short": 2, "too_long": 1}


def test_repetition():
  captions = [
      "sale sale sale sale cheap",                  # 3 of 5 words repeat: 0.6 > 0.5
      "the quick brown fox the quick brown fox",    # words 0.5 (passes), trigrams 2/6
      "New York, new York!",                        # 2 of 4 repeat: 0.5, not above
      "A dog and a cat on a mat",                   # 2 of 8 repeat
      "buy buy buy",                                # under min_words
      "Paris Paris Paris Paris Paris",              # 4 of 5 repeat
  ]
  out, counts = _run(filters.repetition, _captions(captions))
  assert _kept_captions(out) == [captions[i].encode() for i in (2, 3, 4)]
  assert counts == {"kept": 3, "repeated_words": 2, "repeated_ngrams": 1}


def test_boilerplate():
  positives = ["Stock Photo - Red apple on white", "Click here to enlarge",
               "Image may contain: one person, smiling", "Untitled design (3)",
               "No description available.", "Image not available", "royalty-free vector",
               "Sunset over the lake — Alamy", "Getty Images / sunset"]
  negatives = ["A stockpile of firewood", "The untitled painting by Mondrian",
               "A description of the castle in winter", "Click beetle on a leaf",
               "Photo of stock cubes in a pot"]
  out, counts = _run(filters.boilerplate, _captions(positives + negatives))
  assert _kept_captions(out) == [c.encode() for c in negatives]
  assert counts == {"kept": len(negatives), "boilerplate": len(positives)}
  out, counts = _run(filters.boilerplate, _captions(negatives), patterns=[r"\bstock"])
  assert counts == {"kept": 3, "boilerplate": 2}


def test_url_or_filename():
  urls = ["https://example.com/images/1234.jpg", "http://foo.org", "www.example.com",
          "  example.com/page?id=3 "]
  names = ["IMG_1234.JPG", "DSC0001", "photo.jpeg", "PXL_20210101_123456789",
           "IMG 20190101 123456", "P1010001", "My Holiday Pic.PNG", "20190101_123456",
           "a3f5e6b7c8d9e0f1a2b3", "screenshot_2020-01-01"]
  captions = ["A photo of a dog", "Visit example.com for more", "The 1984 Olympic Games",
              "Canon EOS 5D sample image", "IMG_1234 is my favourite shot of Paris",
              "Version 2.0 release notes"]
  out, counts = _run(filters.url_or_filename, _captions(urls + names + captions))
  assert _kept_captions(out) == [c.encode() for c in captions]
  assert counts == {"kept": len(captions), "url": len(urls), "filename": len(names)}


def test_language_confidence():
  sentences = ["A red bicycle leaning against a brick wall",
               "Ein rotes Fahrrad lehnt an einer Backsteinmauer",
               "Красный велосипед стоит у кирпичной стены",
               "レンガの壁に立てかけられた赤い自転車"]
  # No character n-gram langid knows: its posterior stays near its prior (~0.17).
  junk = ["", "IMG", "!!!", "12"]
  out, counts = _run(filters.language_confidence, _captions(junk[:2] + sentences + junk[2:]))
  assert _kept_captions(out) == [s.encode() for s in sentences]
  assert counts == {"kept": 4, "low_confidence": 4}


def test_image_size():
  sizes = [(0, 100), (100, 0), (300, 200), (256, 256), (1024, 256), (768, 256), (512, 512),
           (-1, 50)]
  ds = tf.data.Dataset.from_tensor_slices({
      "width": np.array([w for w, _ in sizes], np.int32),
      "height": np.array([h for _, h in sizes], np.int32)})
  out, counts = _run(filters.image_size, ds, min_side=256, min_pixels=70_000,
                     max_aspect_ratio=3.0)
  # Hand-checked: (300, 200) short side 200 < 256; 256 * 256 = 65536 < 70000; 1024 / 256 =
  # 4 > 3; 768 / 256 = 3 is not above 3.
  assert [(ex["width"], ex["height"]) for ex in out] == [(768, 256), (512, 512)]
  assert counts == {"kept": 2, "zero_size": 3, "too_small": 1, "too_few_pixels": 1,
                    "aspect_ratio": 1}
  out, counts = _run(filters.image_size, ds)  # Only zero sizes are dropped by default.
  assert counts == {"kept": 5, "zero_size": 3, "too_small": 0, "too_few_pixels": 0,
                    "aspect_ratio": 0}


def test_metadata_scores_nan_passes():
  nan = float("nan")
  ds = tf.data.Dataset.from_tensor_slices({
      "pwatermark": np.array([0.1, 0.6, nan, 0.59, 0.2], np.float32),
      "punsafe": np.array([0.0, 0.0, 1.0, nan, 0.0], np.float32),
      "similarity": np.array([0.3, 0.3, 0.3, 0.3, 0.2], np.float32)})
  out, counts = _run(filters.metadata_scores, ds, max_pwatermark=0.6, max_punsafe=1.0,
                     min_similarity=0.25)
  assert [float(ex["pwatermark"]) for ex in out] == pytest.approx([0.1, 0.59])
  assert counts == {"kept": 2, "watermark": 1, "unsafe": 1, "low_similarity": 1}
  # A source without the score features: nothing to judge, everything passes.
  out, counts = _run(filters.metadata_scores, _captions(["a", "b"]), max_pwatermark=0.5)
  assert counts["kept"] == 2


def test_counts_through_a_seqio_task():
  captions = ["A dog on a beach", "IMG_0001.jpg", "Stock photo of a cat", "ok",
              "A tall tree in a green field", "https://x.org/y.png"]
  source = seqio.FunctionDataSource(
      lambda split, shuffle_files: _captions(captions), splits=["train"])
  counts = filters.FilterCounts()
  name = "filters_test_task"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=source, output_features={}, preprocessors=[
      functools.partial(filters.caption_length, min_bytes=5, counts=counts),
      functools.partial(filters.url_or_filename, counts=counts),
      functools.partial(filters.boilerplate, counts=counts),
  ])
  task = seqio.get_mixture_or_task(name)
  kept = [ex["caption"] for ex in task.get_dataset(None, split="train", shuffle=False,
                                                   num_epochs=1).as_numpy_iterator()]
  assert kept == [b"A dog on a beach", b"A tall tree in a green field"]
  # Each filter sees what the previous kept.
  assert counts.as_dict() == {
      "caption_length": {"kept": 5, "too_short": 1, "too_long": 0},
      "url_or_filename": {"kept": 3, "url": 1, "filename": 1},
      "boilerplate": {"kept": 2, "boilerplate": 1},
  }
  assert counts.dropped("url_or_filename") == 2
  assert counts.flat()["filters/boilerplate/boilerplate"] == 1
  # A second pass adds to the counts; reset() clears them.
  list(task.get_dataset(None, split="train", shuffle=False, num_epochs=1))
  assert counts.as_dict()["caption_length"]["kept"] == 10
  counts.reset()
  assert counts.dropped("caption_length") == 0 and "caption_length: kept 0" in str(counts)


def test_counts_reject_a_reused_name_with_other_outcomes():
  counts = filters.FilterCounts()
  counts.counter("f", ("kept", "a"))
  with pytest.raises(ValueError, match="already counts"):
    counts.counter("f", ("kept", "b"))
