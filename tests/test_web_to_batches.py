"""LAION-HR as img2dataset writes it -> TFDS -> `prepare` (JPEG XL shards) -> bucketed
batches: every good image arrives once, in the bucket its aspect ratio picks."""

import numpy as np

from charred.datasets import bucketing, prepare
import web_fixtures as wf

SIZES = [(96, 64), (64, 96), (80, 80), (128, 64), (64, 64), (96, 64)]  # (width, height)


def test_laion_fixture_through_prepare_into_buckets(tmp_path):
  manual = str(tmp_path / 'img2dataset')
  rows = [wf.LaionRow(f'photo number {i}', wf.jpeg(w, h, seed=i))
          for i, (w, h) in enumerate(SIZES)]
  rows.append(wf.LaionRow('corrupt', b'\xff\xd8\xff\xe0 not really a jpeg'))
  keys = wf.write_img2dataset_shard(manual, 0, rows)
  out = str(tmp_path / 'shards')
  manifest = prepare.prepare('laion_hr/unfiltered', 'train', out,
                             data_dir=str(tmp_path / 'tfds'), manual_dir=manual)
  assert sum(s['num_records'] for s in manifest['shards']) == len(SIZES)

  config = bucketing.BucketConfig(base_resolution=64, step=32, min_side=32, max_side=128,
                                  text_lengths=(32,))
  batches = bucketing.BucketedBatches(out, 2, config, seed=0, repeat=False, shuffle=False,
                                      process_index=0, process_count=1)
  seen = {}
  for batch in batches:
    for caption, bucket, image in zip(batch['caption'], batch['bucket'], batch['image']):
      seen[str(caption)] = image.shape
      assert -1 <= image.min() and image.max() <= 1
  by_caption = {f'photo number {i}': size for i, size in enumerate(SIZES)}
  # Each image in the bucket of nearest aspect ratio (log scale); buckets too small to fill
  # a batch of 2 in one pass hold their images back.
  sizes = config.sizes()
  for caption, shape in seen.items():
    w, h = by_caption[caption]
    want = min(sizes, key=lambda s: abs(np.log(s[0] / s[1]) - np.log(w / h)))
    assert shape == (want[1], want[0], 3), (caption, shape, want)
  assert len(seen) >= 4 and set(seen) <= set(by_caption)
  assert len(keys) == len(rows)
