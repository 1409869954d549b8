"""Aspect-ratio x caption-length buckets, resize-and-crop, and the resumable batch stream."""
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from charred.datasets import bucketing
from charred.datasets import jxl_shards
from photo_fixtures import photo

# Small buckets so that the stream tests decode tiny images.
CONFIG = bucketing.BucketConfig(base_resolution=64, step=16, min_side=32,
                                text_lengths=(16, 32))
SHAPES = [(96, 64), (64, 96), (80, 80), (128, 48), (48, 128), (72, 60), (40, 100)]  # (w, h)
NUM_RECORDS = 150


def _caption(i):
  # 3..40 UTF-8 bytes, some multi-byte: both text lengths get records.
  return ("ü" if i % 4 == 0 else "a") * (3 + (i * 7) % 20)


@pytest.fixture(scope="module")
def sources():
  return [photo(SHAPES[i % len(SHAPES)][1], SHAPES[i % len(SHAPES)][0], seed=i)
          for i in range(NUM_RECORDS)]


@pytest.fixture(scope="module")
def shards_dir(sources, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bucketing") / "shards")
  examples = [dict(image=img, caption=_caption(i), key=f"r{i:03d}")
              for i, img in enumerate(sources)]
  jxl_shards.write_shards(examples, out, settings=jxl_shards.JxlSettings(lossless=True, effort=1),
                          examples_per_shard=40)
  return out


def _batches(shards_dir, n, batch_size=4, **kwargs):
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  it = bucketing.BucketedBatches(shards_dir, batch_size, CONFIG, **kwargs)
  out = [next(it) for _ in range(n)]
  return it, out


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# Buckets.


def test_aspect_buckets_512_by_hand():
  # Widths 256..1024 step 64, height = largest multiple of 64 with w * h <= 512^2
  # (e.g. 640 -> 262144 / 640 = 409.6 -> 384), plus transposes, sorted by w / h.
  wide = [(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
          (896, 256), (960, 256), (1024, 256)]
  expected = sorted(set(wide) | {(h, w) for w, h in wide}, key=lambda s: s[0] / s[1])
  assert bucketing.aspect_buckets(512) == expected
  assert len(expected) == 17
  for w, h in expected:
    assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256


def test_nearest_bucket_and_text_length_by_hand():
  sizes = bucketing.aspect_buckets(512)
  cases = {(1024, 768): (576, 448), (1000, 1000): (512, 512), (4000, 1000): (1024, 256),
           (300, 1200): (256, 1024), (1920, 1080): (640, 384), (1080, 1920): (384, 640)}
  for (w, h), bucket in cases.items():
    assert sizes[bucketing.nearest_bucket(w, h, sizes)] == bucket, (w, h)
  widths, heights = zip(*cases)
  np.testing.assert_array_equal(bucketing.nearest_bucket(widths, heights, sizes),
                                [sizes.index(b) for b in cases.values()])
  np.testing.assert_array_equal(
      bucketing.text_length_bucket([1, 64, 65, 128, 129, 256, 1000], (64, 128, 256)),
      [0, 0, 1, 1, 2, 2, 2])


def test_resize_to_bucket_equals_resize_then_crop():
  image = photo(300, 400, seed=0)
  # Scale 0.48 makes the full resize 192 x 144 and the centre crop start at row 8.
  got, crop = bucketing.resize_to_bucket(image, (192, 128), resample="lanczos")
  full = np.asarray(Image.fromarray(image).resize((192, 144), Image.LANCZOS))
  diff = np.abs(got.astype(int) - full[8:136])
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # the box's float offset rounds
  assert crop == (8, 0)
  # No scaling: a plain centre crop of the pixels.
  got, crop = bucketing.resize_to_bucket(image, (400, 200))
  np.testing.assert_array_equal(got, image[50:250])
  assert crop == (50, 0)
  # Fractional offsets: close to resize-then-crop, exactly the bucket's shape.
  got, _ = bucketing.resize_to_bucket(image, (96, 112))  # bicubic by default
  full = np.asarray(Image.fromarray(image).resize((149, 112), Image.BICUBIC))
  assert got.shape == (112, 96, 3)
  assert np.abs(got.astype(int) - full[:, 26:122]).mean() < 3


def test_random_crop_stays_inside_and_is_seeded():
  boxes = [bucketing.crop_box(400, 300, (128, 128), np.random.default_rng(s)) for s in range(50)]
  for left, top, right, bottom in boxes:
    assert top == 0 and bottom == 300 and 0 <= left and right <= 400
    assert right - left == pytest.approx(300)
  assert len({b[0] for b in boxes}) == 50
  assert boxes[3] == bucketing.crop_box(400, 300, (128, 128), np.random.default_rng(3))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 1000, 4097])
def test_feistel_permutation_is_a_seeded_bijection(n):
  perm = bucketing.FeistelPermutation(n, [0, 1])
  values = perm(np.arange(n))
  np.testing.assert_array_equal(np.sort(values), np.arange(n))
  np.testing.assert_array_equal(values, bucketing.FeistelPermutation(n, [0, 1])(np.arange(n)))
  if n >= 16:
    assert not np.array_equal(values, bucketing.FeistelPermutation(n, [0, 2])(np.arange(n)))
    assert not np.array_equal(values, np.arange(n))
  if n >= 1000:  # Shuffled: near-zero rank correlation with the identity.
    assert abs(np.corrcoef(values, np.arange(n))[0, 1]) < 0.1


# The batch stream.


def test_one_epoch_every_record_once_in_its_bucket(shards_dir, sources):
  it = bucketing.BucketedBatches(shards_dir, 4, CONFIG, repeat=False, seed=5,
                                 process_index=0, process_count=1)
  batches = list(it)
  sizes = CONFIG.sizes()
  seen = []
  for batch in batches:
    (bucket,) = set(batch["bucket"].tolist())
    height, width, text_length = it.bucket_shape(bucket)
    assert batch["image"].shape == (4, height, width, 3) and batch["image"].dtype == np.float32
    assert batch["text_tokens"].shape == batch["text_mask"].shape == (4, text_length)
    for key, caption in zip(batch["key"], batch["caption"]):
      i = int(key[1:])
      assert caption == _caption(i)
      w, h = SHAPES[i % len(SHAPES)]
      nearest = min(sizes, key=lambda s: abs(np.log(w / h) - np.log(s[0] / s[1])))
      assert (width, height) == nearest
      n_tokens = len(caption.encode()) + 1
      assert text_length == (16 if n_tokens <= 16 else 32)
      seen.append(i)
  assert len(seen) == len(set(seen))  # no record twice in an epoch
  left = [k for keys in it.get_state()["pending"].values() for k in keys]
  assert sorted(seen + left) == list(range(NUM_RECORDS))  # and none lost
  assert all(len(keys) < 4 for keys in it.get_state()["pending"].values())


def test_pixels_tokens_and_conditioning(shards_dir, sources):
  _, batches = _batches(shards_dir, 6, seed=1)
  batch = batches[0]
  for row, key in enumerate(batch["key"]):
    source = sources[int(key[1:])]
    height, width = batch["image"].shape[1:3]
    # Independent reference: PIL resize of the whole source to cover, then a centre crop.
    scale = max(width / source.shape[1], height / source.shape[0])
    full_w, full_h = source.shape[1] * scale, source.shape[0] * scale
    box = ((full_w - width) / 2, (full_h - height) / 2)
    full = Image.fromarray(source).resize((round(full_w), round(full_h)), Image.BICUBIC)
    expected = np.asarray(full.crop((round(box[0]), round(box[1]), round(box[0]) + width,
                                     round(box[1]) + height))) / 127.5 - 1
    assert np.abs(batch["image"][row] - expected).mean() < 0.05
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    np.testing.assert_array_equal(batch["original_size"][row], source.shape[:2])
    np.testing.assert_array_equal(batch["crop_top_left"][row], [round(box[1]), round(box[0])])
  caption = batch["caption"][0]
  expected = [b + 3 for b in caption.encode()] + [1]
  length = batch["text_tokens"].shape[1]
  expected = (expected + [0] * length)[:length]
  np.testing.assert_array_equal(batch["text_tokens"][0], expected)
  np.testing.assert_array_equal(batch["text_mask"][0], np.array(expected) != 0)


def test_deterministic_per_seed(shards_dir):
  _, a = _batches(shards_dir, 8, seed=3, num_threads=1, prefetch=1)
  _, b = _batches(shards_dir, 8, seed=3, num_threads=2, prefetch=4)
  _assert_same(a, b)
  _, c = _batches(shards_dir, 8, seed=4)
  assert [x["key"].tolist() for x in a] != [x["key"].tolist() for x in c]


@pytest.mark.parametrize("random_crop", [False, True])
def test_resume_equals_uninterrupted_stream(shards_dir, random_crop):
  total = 60  # several epochs: 150 records, batches of 4
  _, reference = _batches(shards_dir, total, seed=7, random_crop=random_crop)
  partial_cuts = 0
  for cut in (0, 1, 5, 23, 37, 52):
    it, head = _batches(shards_dir, cut, seed=7, random_crop=random_crop)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    partial_cuts += bool(state["pending"])
    it.close()
    # Resume with another thread count and prefetch depth: same batches.
    resumed = bucketing.BucketedBatches(shards_dir, 4, CONFIG, seed=7, state=state,
                                        random_crop=random_crop, num_threads=1, prefetch=3,
                                        process_index=0, process_count=1)
    tail = [next(resumed) for _ in range(total - cut)]
    _assert_same(head + tail, reference)
    # set_state on a running iterator rewinds it the same way.
    it2, _ = _batches(shards_dir, 3, seed=7, random_crop=random_crop)
    it2.set_state(state)
    _assert_same([next(it2) for _ in range(4)], reference[cut:cut + 4])
  assert partial_cuts >= 4  # cuts where buckets held partial batches
  assert len(json.dumps(state)) < 2000  # small


def test_random_crops_differ_from_centre(shards_dir):
  _, centre = _batches(shards_dir, 4, seed=2)
  _, rand = _batches(shards_dir, 4, seed=2, random_crop=True)
  assert [b["key"].tolist() for b in centre] == [b["key"].tolist() for b in rand]
  assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(centre, rand))


def test_processes_split_each_global_batch(shards_dir):
  _, single = _batches(shards_dir, 10, batch_size=6, seed=9)
  parts = [_batches(shards_dir, 10, batch_size=3, seed=9, process_index=p, process_count=2)[1]
           for p in range(2)]
  for whole, first, second in zip(single, *parts):
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([first[k], second[k]]), err_msg=k)


def test_state_of_another_configuration_is_refused(shards_dir):
  it, _ = _batches(shards_dir, 2, seed=1)
  with pytest.raises(ValueError, match="global_batch_size"):
    bucketing.BucketedBatches(shards_dir, 8, CONFIG, seed=1, state=it.get_state(),
                              process_index=0, process_count=1)
  with pytest.raises(ValueError, match="seed"):
    bucketing.BucketedBatches(shards_dir, 4, CONFIG, seed=2, state=it.get_state(),
                              process_index=0, process_count=1)


def test_damaged_record_is_counted_not_fatal(shards_dir, tmp_path):
  """A record whose JPEG XL bytes are damaged on disk: its row is refilled and counted."""
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  for name in os.listdir(shards_dir):
    shutil.copy(os.path.join(shards_dir, name), damaged / name)
  first = damaged / jxl_shards.read_manifest(str(damaged))["shards"][0]["path"]
  (record,) = jxl_shards.JxlShards(shards_dir).read([0])
  data = first.read_bytes()  # uncompressed ArrayRecord: the codestream is stored as is
  start = data.index(record["image"]) + len(record["image"]) // 2
  first.write_bytes(data[:start] + bytes(64) + data[start + 64:])
  it = bucketing.BucketedBatches(str(damaged), 4, CONFIG, repeat=False, seed=5,
                                 process_index=0, process_count=1)
  batches = list(it)
  assert sum(v for k, v in it.metrics.items() if k.startswith("bad_record/")) == 1
  _, healthy = _batches(shards_dir, len(batches), seed=5, repeat=False)
  assert [b["bucket"][0] for b in batches] == [b["bucket"][0] for b in healthy]
  differing = [i for i, (a, b) in enumerate(zip(batches, healthy))
               if not np.array_equal(a["key"], b["key"])]
  assert len(differing) == 1  # the batch that held record r000
  assert "r000" in healthy[differing[0]]["key"] and "r000" not in batches[differing[0]]["key"]


def test_text_lengths_longer_than_the_model_are_refused():
  bucketing.BucketConfig(text_lengths=(32, 64)).check_text_length(64)
  with pytest.raises(ValueError, match='go up to 64 tokens, more than the model.s '
                                       'text_length 48'):
    bucketing.BucketConfig(text_lengths=(32, 64)).check_text_length(48)
