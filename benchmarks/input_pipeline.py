r"""Input pipeline speed: charred (JPEG XL shards -> buckets) against a PIL + torch DataLoader.

  python benchmarks/input_pipeline.py                 # ~1-3 minutes on 2 cores
  python benchmarks/input_pipeline.py --num_images=512 --resolution=1024

Makes `--num_images` photo-like images of about one megapixel (typography renders on
gradients, shapes and noise, in several aspect ratios), writes them once as JPEG files
(PIL, quality 90) and once as JPEG XL shards (`jxl_shards.write_shards`, lossy at
`--distance`), then measures images/s of decode -> resize -> crop -> normalise -> batch:

- reference: the original CHARRED project's pipeline: a torch Dataset that opens each
  JPEG with PIL, resizes its shorter side to `--resolution` (Lanczos), random-crops a
  square, converts to a tensor and normalises to [-1, 1] (torchvision's Resize,
  RandomCrop, ToTensor and Normalize([0.5], [0.5]) written out with PIL and torch, as
  torchvision is not installed here), collated by a DataLoader with one worker per core;
- charred: `bucketing.BucketedBatches` over the shards (aspect-ratio buckets with the
  area of `--resolution`^2, decoding and resizing on a thread pool with one thread per
  core), float32 NHWC in [-1, 1].

Both also tokenize the captions (ByT5 bytes). Each makes one pass over the images and
reports wall-clock images/s after `--warmup` batches, and images per CPU second over
the whole pass (user + system time of all threads, and of the DataLoader's worker
processes once joined): the per-core figure, which stays meaningful on a machine shared
with other jobs, where wall-clock figures swing with their load. It also compares JPEG XL (lossy and lossless) with JPEG on the same
images: bytes per pixel and single-threaded decode speed. The last line printed is one
JSON object; `ratio` is charred's images per CPU second over the reference's (> 1:
charred is faster), `ratio_wall_clock` the same for wall-clock images/s, and
`ratio_prescaled` the per-core ratio when both read images stored at the training scale
(JPEGs with their shorter side at `--resolution`; shards from `prepare --max_pixels`
at `--resolution`^2), which spares both most of the decoding and resizing.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from charred import tokenizer
from charred.datasets import bucketing
from charred.datasets import jxl_shards
from charred.datasets import render
from charred.datasets import words

# (width, height) of about one megapixel, as in LAION-HR's smallest images.
SIZES = [(1024, 1024), (1024, 768), (768, 1024), (1216, 832), (832, 1216), (1344, 768)]


def make_photo(index: int, word: str) -> tuple[np.ndarray, str]:
  """A photo-like image showing a sign with `word`, and its caption."""
  rng = np.random.default_rng(index)
  width, height = SIZES[index % len(SIZES)]
  # Colour gradients and coarse texture (foliage, walls) at 1/8 scale, upsampled.
  y, x = np.mgrid[0:height // 8, 0:width // 8].astype(np.float32) / (max(width, height) / 8)
  freq, phase = rng.uniform(0.5, 3, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
  low = np.stack([np.sin(freq[c, 0] * 3 * x + freq[c, 1] * 2 * y + phase[c])
                  for c in range(3)], -1) * 80 + 128
  low = 0.7 * low + 0.3 * (128 + rng.normal(0, 25, low.shape))
  pil = Image.fromarray(low.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
  draw = ImageDraw.Draw(pil)
  for _ in range(6):
    cx, cy, r = rng.integers(0, width), rng.integers(0, height), int(rng.integers(20, 200))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(rng.integers(0, 256, 3).tolist()))
  sign = render.render_example(word, seed=0, index=index, config=render.RenderConfig(
      height=160, width=640, fonts=render.ALL_FONTS, font_size=(48, 96), x_offset=(8, 60),
      y_jitter=20))
  left, top = int(rng.integers(0, width - 640)), int(rng.integers(0, height - 160))
  pil.paste(Image.fromarray(sign["image"]), (left, top))
  out = np.asarray(pil, np.float32) + 2.0 * rng.standard_normal((height, width, 3), np.float32)
  return out.clip(0, 255).astype(np.uint8), sign["caption"]


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="jpeg", quality=quality)
  return buf.getvalue()


# The reference: the original project's PIL + torchvision-style transforms.


class JpegCaptionDataset:
  """torch-style Dataset: JPEG file -> (pixel tensor [3, R, R] in [-1, 1], token ids)."""

  def __init__(self, paths, captions, resolution: int, text_length: int):
    self.paths, self.captions = paths, captions
    self.resolution, self.text_length = resolution, text_length

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    import torch  # pylint: disable=g-import-not-at-top
    image = Image.open(self.paths[i]).convert("RGB")
    # Resize(resolution, LANCZOS): the shorter side to `resolution`.
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(self.resolution * long / short)
    size = (self.resolution, new_long) if w <= h else (new_long, self.resolution)
    image = image.resize(size, Image.LANCZOS)
    # RandomCrop(resolution).
    left = np.random.randint(0, size[0] - self.resolution + 1)
    top = np.random.randint(0, size[1] - self.resolution + 1)
    image = image.crop((left, top, left + self.resolution, top + self.resolution))
    # ToTensor, then Normalize([0.5], [0.5]).
    pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()
    pixels = pixels.to(torch.float32).div(255)
    pixels = pixels.sub(0.5).div(0.5)
    ids = torch.from_numpy(tokenizer.encode(self.captions[i], self.text_length))
    return {"pixel_values": pixels, "input_ids": ids}


def _collate(samples):
  import torch  # pylint: disable=g-import-not-at-top
  return {
      "pixel_values": torch.stack([s["pixel_values"] for s in samples]).contiguous().float().numpy(),
      "input_ids": torch.stack([s["input_ids"] for s in samples]).numpy(),
  }


def bench_reference(paths, captions, resolution, batch_size, workers, warmup, text_length):
  import torch  # pylint: disable=g-import-not-at-top
  dataset = JpegCaptionDataset(paths, captions, resolution, text_length)
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       collate_fn=_collate)
  return _measure(loader, "pixel_values", warmup)  # Exhausting it joins the workers.


def bench_charred(shards_dir, resolution, batch_size, workers, warmup, text_length, **kwargs):
  config = bucketing.BucketConfig(base_resolution=resolution, step=64,
                                  min_side=resolution // 2, text_lengths=(text_length,))
  # One pass: records left in partial buckets at the end are never decoded.
  with bucketing.BucketedBatches(shards_dir, batch_size, config, num_threads=workers,
                                 process_index=0, process_count=1, random_crop=True,
                                 repeat=False, **kwargs) as stream:
    return _measure(stream, "image", warmup)


def _cpu_seconds() -> float:
  """CPU time of this process (all threads) and of its exited, joined children."""
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.process_time() + children.ru_utime + children.ru_stime


def _measure(batches, image_key, warmup):
  """(wall-clock images/s after `warmup` batches, images per CPU second over the pass)."""
  cpu_start = _cpu_seconds()
  images = timed = 0
  for i, batch in enumerate(batches):
    images += len(batch[image_key])
    if i + 1 == warmup:
      start, timed = time.perf_counter(), -images
  timed += images
  wall = timed / (time.perf_counter() - start)
  return dict(images=images, images_per_s=wall,
              images_per_cpu_s=images / (_cpu_seconds() - cpu_start))


# JPEG XL against JPEG.


def _decode_ms(decode, blobs, repeat=1):
  decode(blobs[0])
  start = time.perf_counter()
  for _ in range(repeat):
    for b in blobs:
      decode(b)
  return (time.perf_counter() - start) / (repeat * len(blobs)) * 1e3


def compare_codecs(images, jxl_lossy, settings, num_subset, lossless_effort):
  """Bytes per pixel and single-threaded decode time: JPEG q90, JPEG XL as the shards hold
  it, JPEG XL at libjxl's default effort 7 / decoding speed 0, and lossless JPEG XL (the
  last two on the first `num_subset` images: their encoding is slow)."""
  subset = images[:num_subset]
  default = jxl_shards.JxlSettings(distance=settings.distance, effort=7, decoding_speed=0)
  lossless = jxl_shards.JxlSettings(lossless=True, distance=None, effort=lossless_effort)
  pil_decode = lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
  candidates = {
      "jpeg_q90": (images, [_jpeg(a) for a in images], pil_decode),
      f"jxl_d{settings.distance:g}_e{settings.effort}_ds{settings.decoding_speed}": (
          images, jxl_lossy, jxl_shards.decode_image),
      f"jxl_d{settings.distance:g}_e7_ds0": (
          subset, [default.encode(a) for a in subset], jxl_shards.decode_image),
      f"jxl_lossless_e{lossless_effort}": (
          subset, [lossless.encode(a) for a in subset], jxl_shards.decode_image),
  }
  rows = {}
  for name, (sources, blobs, decode) in candidates.items():
    pixels = sum(a.shape[0] * a.shape[1] for a in sources)
    decode_ms = _decode_ms(decode, blobs)
    psnr = np.mean([_psnr(decode(b), a) for a, b in zip(sources, blobs)])
    rows[name] = dict(images=len(sources), bytes_per_pixel=sum(map(len, blobs)) / pixels,
                      decode_ms=decode_ms, psnr_db=float(psnr),
                      megapixels_per_s=pixels / len(sources) / 1e6 / decode_ms * 1e3)
  return rows


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b) ** 2)
  return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=192)
  parser.add_argument("--resolution", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--warmup", type=int, default=2, help="untimed batches")
  parser.add_argument("--workers", type=int, default=os.cpu_count(),
                      help="DataLoader workers / charred decoding threads")
  parser.add_argument("--distance", type=float, default=1.0, help="JPEG XL lossy distance")
  parser.add_argument("--effort", type=int, default=jxl_shards.JxlSettings.effort,
                      help="JPEG XL encoder effort")
  parser.add_argument("--decoding_speed", type=int,
                      default=jxl_shards.JxlSettings.decoding_speed)
  parser.add_argument("--lossless_effort", type=int, default=3)
  parser.add_argument("--num_subset", type=int, default=24,
                      help="images in the effort-7 and lossless codec comparisons")
  parser.add_argument("--text_length", type=int, default=128)
  parser.add_argument("--workdir", default=None, help="keep the files here")
  args = parser.parse_args()
  if args.num_images // args.batch_size <= args.warmup:
    parser.error("--num_images must give more than --warmup batches.")

  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  workdir = args.workdir or tempfile.mkdtemp(prefix="input_pipeline-")
  start = time.time()
  word_list = words.real_words(2000, 3, 12)
  images, captions = zip(*(make_photo(i, word_list[i % len(word_list)])
                           for i in range(args.num_images)))
  jpeg_dir = os.path.join(workdir, "jpeg")
  os.makedirs(jpeg_dir, exist_ok=True)
  paths = []
  for i, image in enumerate(images):
    paths.append(os.path.join(jpeg_dir, f"{i:05d}.jpg"))
    with open(paths[-1], "wb") as f:
      f.write(_jpeg(image))
  # The same images stored at the training scale, as each pipeline needs them: the
  # reference's shorter side at `resolution` (for its square crop), charred's area at
  # resolution^2 (its buckets' area; `prepare --max_pixels`).
  small_paths = []
  for i, image in enumerate(images):
    h, w = image.shape[:2]
    scale = args.resolution / min(h, w)
    small = Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    small_paths.append(os.path.join(jpeg_dir, f"{i:05d}_small.jpg"))
    with open(small_paths[-1], "wb") as f:
      f.write(_jpeg(np.asarray(small)))
  shards_dir = os.path.join(workdir, "jxl")
  settings = jxl_shards.JxlSettings(distance=args.distance, effort=args.effort,
                                    decoding_speed=args.decoding_speed)
  encode_start = time.time()
  manifest = jxl_shards.write_shards(
      (dict(image=a, caption=c, key=str(i)) for i, (a, c) in enumerate(zip(images, captions))),
      shards_dir, settings=settings, examples_per_shard=64, num_workers=args.workers,
      overwrite=True)
  encode_s = time.time() - encode_start
  small_shards_dir = os.path.join(workdir, "jxl_small")
  jxl_shards.write_shards(
      (dict(image=a, caption=c, key=str(i)) for i, (a, c) in enumerate(zip(images, captions))),
      small_shards_dir, settings=settings, examples_per_shard=64, num_workers=args.workers,
      max_pixels=args.resolution ** 2, overwrite=True)
  reader = jxl_shards.JxlShards(shards_dir)
  jxl_lossy = [r["image"] for r in reader]
  reader.close()
  print(f"{args.num_images} images ({sum(a.size // 3 for a in images) / len(images) / 1e6:.2f} "
        f"MP each) made and written as JPEG in {encode_start - start:.1f} s; as JPEG XL "
        f"(d{args.distance:g}, effort {args.effort}, decoding speed {args.decoding_speed}) "
        f"in {encode_s:.1f} s on {args.workers} threads")

  codecs = compare_codecs(list(images), jxl_lossy, settings, args.num_subset,
                          args.lossless_effort)
  print(f"{'codec':22s}{'images':>7s}{'bytes/pixel':>12s}{'PSNR dB':>9s}{'decode ms':>11s}"
        f"{'MP/s':>7s}  (1 thread)")
  for name, row in codecs.items():
    print(f"{name:22s}{row['images']:>7d}{row['bytes_per_pixel']:>12.3f}{row['psnr_db']:>9.1f}"
          f"{row['decode_ms']:>11.2f}{row['megapixels_per_s']:>7.1f}")

  common = (args.resolution, args.batch_size, args.workers, args.warmup, args.text_length)
  runs = {"reference": bench_reference(paths, list(captions), *common)}
  runs["charred"] = bench_charred(shards_dir, *common)
  runs["charred_lanczos"] = bench_charred(shards_dir, *common, resample="lanczos")
  runs["charred_uint8"] = bench_charred(shards_dir, *common, image_dtype=np.uint8)
  runs["reference_prescaled"] = bench_reference(small_paths, list(captions), *common)
  runs["charred_prescaled"] = bench_charred(small_shards_dir, *common)
  labels = {
      "reference": "reference: PIL JPEG, Lanczos, torch DataLoader",
      "charred": "charred: JPEG XL shards, buckets, bicubic",
      "charred_lanczos": "charred with Lanczos (the reference's filter)",
      "charred_uint8": "charred, uint8 out (normalise on device)",
      "reference_prescaled": "reference, JPEGs stored at the training scale",
      "charred_prescaled": "charred, shards stored at the training scale",
  }
  print(f"decode -> resize -> crop -> normalise -> batch at {args.resolution} px, batch "
        f"{args.batch_size}, {args.workers} workers/threads (images per CPU second: "
        "per core, whatever else the machine runs):")
  print(f"  {'':48s}{'images':>7s}{'img/s':>8s}{'img/CPU-s':>11s}{'ratio':>7s}")
  ref = runs["reference"]["images_per_cpu_s"]
  for name, run in runs.items():
    print(f"  {labels[name]:48s}{run['images']:>7d}{run['images_per_s']:>8.1f}"
          f"{run['images_per_cpu_s']:>11.1f}{run['images_per_cpu_s'] / ref:>6.2f}x")
  jpeg_bytes = sum(os.path.getsize(p) for p in paths)
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  print(json.dumps({
      "benchmark": "input_pipeline", "num_images": args.num_images,
      "resolution": args.resolution, "batch_size": args.batch_size, "workers": args.workers,
      "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
      "jxl_distance": args.distance, "jxl_effort": args.effort,
      "jxl_decoding_speed": args.decoding_speed,
      "pipelines": runs,
      "shard_bytes": manifest["total_bytes"],
      "jpeg_bytes": jpeg_bytes,
      "codecs": codecs,
      "ratio_wall_clock": runs["charred"]["images_per_s"] / runs["reference"]["images_per_s"],
      "ratio_prescaled": (runs["charred_prescaled"]["images_per_cpu_s"]
                          / runs["reference_prescaled"]["images_per_cpu_s"]),
      "ratio": runs["charred"]["images_per_cpu_s"] / ref}))


if __name__ == "__main__":
  main()
