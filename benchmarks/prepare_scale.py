r"""`prepare` at scale: Beam's DirectRunner on N workers against the single-process path.

  pip install 'charred[beam]'
  python benchmarks/prepare_scale.py                 # 2,000 rows timed; 2,000 and 8,000 for memory
  python benchmarks/prepare_scale.py --rows=2000 --memory_rows=2000,8000 --workers=2
  python benchmarks/prepare_scale.py --rows=400 --memory_rows= --min_side=1024 --max_side=1280 \
      --rows_per_shard=100

Writes a LAION-HR download in img2dataset's layout (`web_fixtures.write_laion_hr_fixture`:
photo-like JPEGs of 160-320 px a side by default, 500 rows a shard, ~3 % bad rows: corrupt images,
captions that are not UTF-8, failed downloads), then runs, each in a fresh child process
with a fresh TFDS data_dir and output directory,

  python -m charred.prepare --builder=laion_hr/unfiltered --manual_dir=M \
      --data_dir=D --out=O [--num_workers=1]                       # single process
  python -m charred.prepare ... --runner=direct \
      --beam_pipeline_options=direct_num_workers=W                 # Beam

i.e. TFDS builder generation from the tars + parquet files, then the JPEG XL shards
(lossy, distance 1.0, effort 3). The single-process path runs twice: as shipped (libjxl
encoding on one thread per core) and with one encoder thread (`--num_workers=1`).
Throughput is input rows per wall-clock second, end to end, child start-up included.
Memory is the peak of the summed resident sets of the child and all its descendants
(Beam's worker processes), sampled every 50 ms. Then checks that the two paths agree:
the same manifest bar its time and data_dir, the same records (keys, captions, metadata,
sha256 of the decoded pixels) in the same shards, the same builder skip report, and the
fixture's expected skip counts. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the fixture writers
import web_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

BUILDER = "laion_hr/unfiltered"


def _tree_rss(proc: psutil.Process) -> int:
  total = 0
  for p in [proc, *proc.children(recursive=True)]:
    try:
      total += p.memory_info().rss
    except psutil.Error:  # exited between listing and reading
      pass
  return total


def run_prepare(manual: str, work: str, name: str, extra: list[str]) -> dict:
  """One `prepare` in a child; wall-clock seconds and peak RSS of its process tree."""
  data_dir, out = os.path.join(work, f"tfds_{name}"), os.path.join(work, f"out_{name}")
  cmd = [sys.executable, "-m", "charred.prepare", f"--builder={BUILDER}",
         f"--manual_dir={manual}", f"--data_dir={data_dir}", f"--out={out}", *extra]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             TF_CPP_MIN_LOG_LEVEL="3")
  peak, done = [0], threading.Event()
  start = time.perf_counter()
  child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  proc = psutil.Process(child.pid)

  def sample():
    while not done.is_set():
      try:
        peak[0] = max(peak[0], _tree_rss(proc))
      except psutil.Error:
        pass
      time.sleep(0.05)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  output, _ = child.communicate()
  seconds = time.perf_counter() - start
  done.set()
  sampler.join()
  if child.returncode:
    raise RuntimeError(f"{name} failed ({child.returncode}):\n{output[-3000:]}")
  return dict(name=name, seconds=seconds, peak_rss_gb=peak[0] / 1e9, out=out,
              report=os.path.join(data_dir, "laion_hr", "unfiltered", "1.0.0",
                                  "skipped_train.json"),
              summary=output.strip().splitlines()[-1])


def contents(run: dict) -> dict:
  c = web_fixtures.shard_contents(run["out"])
  c["manifest"]["source"].pop("data_dir")
  with open(run["report"]) as f:
    c["skip_report"] = json.load(f)
  return c


def measure(rows: int, workers: int, work: str, timed: bool, sides: tuple[int, int],
            rows_per_shard: int) -> dict:
  manual = os.path.join(work, f"manual_{rows}")
  expected = web_fixtures.write_laion_hr_fixture(manual, rows, min_side=sides[0],
                                                 max_side=sides[1],
                                                 rows_per_shard=rows_per_shard)
  runs = {}
  runs["single"] = run_prepare(manual, work, f"single_{rows}", [])
  if timed:
    runs["single_1_thread"] = run_prepare(manual, work, f"single1_{rows}", ["--num_workers=1"])
  runs["beam"] = run_prepare(manual, work, f"beam_{rows}", [
      "--runner=direct", f"--beam_pipeline_options=direct_num_workers={workers}"])
  for r in runs.values():
    print(f"  {rows} rows, {r['name']}: {r['seconds']:.1f} s, {rows / r['seconds']:.1f} rows/s, "
          f"peak RSS {r['peak_rss_gb']:.2f} GB  [{r['summary']}]", flush=True)
  single, beam = contents(runs["single"]), contents(runs["beam"])
  report = single["skip_report"]
  identical = dict(
      manifest=single["manifest"] == beam["manifest"],
      records=single["records"] == beam["records"],
      skip_report=report == beam["skip_report"],
      expected_skips=report["skipped"] == expected,
  )
  result = dict(rows=rows, identical=identical, skipped=report["skipped"],
                num_records=single["manifest"]["num_records"],
                shards=len(single["manifest"]["shards"]),
                **{f"{k}_seconds": round(r["seconds"], 2) for k, r in runs.items()},
                **{f"{k}_peak_rss_gb": round(r["peak_rss_gb"], 3) for k, r in runs.items()})
  if timed:
    result["ratio"] = round(runs["single"]["seconds"] / runs["beam"]["seconds"], 3)
    result["ratio_vs_1_thread"] = round(
        runs["single_1_thread"]["seconds"] / runs["beam"]["seconds"], 3)
  shutil.rmtree(manual)
  for r in runs.values():
    shutil.rmtree(r["out"])
    shutil.rmtree(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        r["report"])))))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=2000, help="rows of the timed run")
  parser.add_argument("--memory_rows", default="2000,8000",
                      help="row counts whose peak memory is compared (comma-separated)")
  parser.add_argument("--workers", type=int, default=2, help="DirectRunner workers")
  parser.add_argument("--min_side", type=int, default=160, help="fixture image sides, px")
  parser.add_argument("--max_side", type=int, default=320)
  parser.add_argument("--rows_per_shard", type=int, default=500,
                      help="rows per source tar (Beam reads one tar per element)")
  args = parser.parse_args()
  import apache_beam  # pylint: disable=g-import-not-at-top
  results = {}
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix="prepare_scale_") as work:
    sizes = sorted({args.rows, *(int(n) for n in args.memory_rows.split(",") if n)})
    for rows in sizes:
      print(f"{rows} rows:", flush=True)
      results[rows] = measure(rows, args.workers, work, timed=rows == args.rows,
                              sides=(args.min_side, args.max_side),
                              rows_per_shard=args.rows_per_shard)
  timed = results[args.rows]
  summary = dict(
      machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}, apache-beam {apache_beam.__version__}",
      load_average_before=[round(x, 2) for x in load_before],
      load_average_after=[round(x, 2) for x in os.getloadavg()],
      workers=args.workers, sides=[args.min_side, args.max_side],
      rows_per_shard=args.rows_per_shard, ratio=timed["ratio"], ratio_vs_1_thread=timed["ratio_vs_1_thread"],
      all_identical=all(all(r["identical"].values()) for r in results.values()),
      runs=list(results.values()))
  print(f"Beam DirectRunner ({args.workers} workers) / single process, {args.rows} rows: "
        f"{timed['ratio']:.2f}x (vs one encoder thread: {timed['ratio_vs_1_thread']:.2f}x)")
  for r in results.values():
    print(f"peak RSS at {r['rows']} rows: single {r['single_peak_rss_gb']:.2f} GB, "
          f"Beam {r['beam_peak_rss_gb']:.2f} GB; identical: {r['identical']}")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
