"""`python -m charred.prepare` (and its alias `charred.datasets.prepare`) on the typography
builder's micro config."""
import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from charred.datasets import jxl_shards
from conftest import run_cli
from photo_fixtures import encode, psnr

MICRO_TRAIN = 256  # typography/micro's train split (TypographyConfig MICRO).


@pytest.fixture(scope="module")
def micro_dir(micro_data_dir):
  """conftest's session data_dir (the trainer tests' too), with typography/micro in it."""
  from charred.datasets import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.prepare("micro", micro_data_dir)
  return micro_data_dir


def _tfds_examples(data_dir, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("typography/micro", data_dir=data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  return list(tfds.as_numpy(ds))


def test_prepare_micro_lossless_equals_tfds(micro_dir, tmp_path):
  from charred.datasets import prepare  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "jxl")
  manifest = prepare.prepare("typography/micro", "train", out, data_dir=micro_dir,
                             settings=jxl_shards.JxlSettings(lossless=True, effort=1),
                             examples_per_shard=100, num_workers=2)
  assert manifest["num_records"] == MICRO_TRAIN and manifest["skipped"] == {}
  assert [s["num_records"] for s in manifest["shards"]] == [100, 100, 56]
  assert manifest["source"]["builder"] == "typography/micro"
  assert manifest["source"]["version"] == "1.0.0" and manifest["source"]["split"] == "train"
  expected = _tfds_examples(micro_dir, "train")
  records = list(jxl_shards.JxlShards(out, verify=True))
  assert len(records) == len(expected) == MICRO_TRAIN
  for record, ex in zip(records, expected):  # TFDS decodes the stored PNG itself
    np.testing.assert_array_equal(jxl_shards.decode_image(record["image"]), ex["image"])
    assert record["caption"] == ex["caption"].decode()
    assert record["key"] == ex["tfds_id"].decode()
    assert (record["height"], record["width"]) == (32, 128) and record["language"] == ""
  assert len({r["key"] for r in records}) == MICRO_TRAIN


def test_prepare_cli_lossy_tfrecord_and_refusals(micro_dir, tmp_path):
  out = str(tmp_path / "jxl")
  args = ["--builder=typography/micro", f"--data_dir={micro_dir}", "--split=validation[:20]",
          f"--out={out}", "--format=tfrecord", "--quality=d1.0", "--effort=3",
          "--examples_per_shard=8"]
  proc = run_cli("prepare", *args, timeout=300)
  assert "20 records in 3 shards" in proc.stdout.strip().splitlines()[-1]
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["record_format"] == "tfrecord" and manifest["codec"]["distance"] == 1.0
  assert [s["path"] for s in manifest["shards"]] == [
      f"validation_20-{i:05d}.tfrecord" for i in range(3)]
  expected = {ex["tfds_id"].decode(): ex for ex in _tfds_examples(micro_dir, "validation[:20]")}
  records = list(jxl_shards.JxlShards(out))
  assert sorted(r["key"] for r in records) == sorted(expected)
  jxl_psnr, jpeg_psnr = [], []
  for record in records:
    source = expected[record["key"]]["image"]
    jpeg = np.asarray(Image.open(io.BytesIO(encode(source, "jpeg", quality=90))))
    jxl_psnr.append(psnr(jxl_shards.decode_image(record["image"]), source))
    jpeg_psnr.append(psnr(jpeg, source))
  # Lossy but close: on average at least as close as JPEG at quality 90.
  assert min(jxl_psnr) > 25 and np.mean(jxl_psnr) > np.mean(jpeg_psnr), (jxl_psnr, jpeg_psnr)
  # Existing output: one line, nothing touched (by the command under its other name too).
  proc = run_cli("datasets.prepare", *args, check=False)
  assert proc.returncode == 2 and "--overwrite" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f) == manifest


def test_unknown_builder_and_feature_errors(micro_dir, tmp_path):
  from charred.datasets import prepare  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="unknown TFDS builder 'no_such_builder'"):
    prepare.prepare("no_such_builder", "train", str(tmp_path / "a"), data_dir=micro_dir)
  assert not (tmp_path / "a").exists()
