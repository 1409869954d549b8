r"""Peak memory of converting a t5x ByT5 encoder checkpoint: bounded by tensors, not the model.

  python benchmarks/convert_memory.py                 # ByT5-Large encoder, 864 M params, ~3.5 GB
  python benchmarks/convert_memory.py --size=small --keep

Writes a synthetic t5x tensorstore checkpoint (gzip zarr arrays and a `checkpoint` msgpack
of their specs, as t5x lays them out) with the encoder shapes of gin/models/byt5_SIZE.gin,
float32, filled with tiles of one random block (tiles longer than gzip's 32 KiB window, so
the files stay incompressible like real weights). Then runs
`python -m charred.convert SRC OUT` in a subprocess and samples its
/proc/PID/status every 20 ms: VmHWM (the kernel's peak resident set), RssAnon (heap:
what the converter holds) and RssFile (mapped file pages, which the kernel can drop). A
baseline child that only imports the converter's modules separates interpreter and library
overhead from conversion. Prints a table, then as its last line one JSON object.
Everything is written under a temporary directory in /tmp, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runs from a checkout without installing charred
_FIELDS = ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile')


def encoder_shapes(size: str):
  import gin  # pylint: disable=g-import-not-at-top
  from charred.configs import gin_utils  # pylint: disable=g-import-not-at-top
  from charred.models import pretrained  # pylint: disable=g-import-not-at-top
  from charred.models.t5_encoder import T5EncoderConfig  # pylint: disable=g-import-not-at-top
  gin_utils.parse([f'models/byt5_{size}.gin'])
  config = gin.get_configurable(T5EncoderConfig)()
  gin.clear_config()
  return pretrained.parameter_shapes('t5_encoder', config)


def write_t5x_checkpoint(directory: str, shapes: dict[str, tuple[int, ...]], seed: int = 0):
  """A t5x tensorstore checkpoint holding `shapes` (charred paths = t5x paths) under
  `optimizer/target`, one zarr array per parameter in `target.<dotted path>/`."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  os.makedirs(directory)
  block = (np.random.default_rng(seed).standard_normal(1 << 20) * 0.05).astype(np.float32)
  offsets = np.random.default_rng(seed + 1)
  tree, pending = {}, []
  for path, shape in shapes.items():
    name = 'target.' + path.replace('/', '.')
    n = int(np.prod(shape))
    start = int(offsets.integers(0, block.size))
    value = np.resize(np.roll(block, -start), n).reshape(shape)
    metadata = {'chunks': list(shape), 'compressor': {'id': 'gzip', 'level': 1},
                'shape': list(shape)}
    store = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file',
                                                   'path': os.path.join(directory, name)},
                     'metadata': dict(metadata, dtype='<f4')}, create=True).result()
    pending.append(store.write(value))
    if len(pending) >= 4:  # a few writes in flight: both cores compress, memory stays small
      for p in pending:
        p.result()
      pending = []
    node = tree
    for k in path.split('/')[:-1]:
      node = node.setdefault(k, {})
    node[path.split('/')[-1]] = {'driver': 'zarr', 'dtype': 'float32', 'metadata': metadata,
                                 'kvstore': {'driver': 'gfile', 'path': name + '/'}}
  for p in pending:
    p.result()
  checkpoint = {'version': 3, 'optimizer': {'target': tree, 'state': {'step': np.int32(1)}}}
  with open(os.path.join(directory, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize(checkpoint))


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _status_bytes(pid: int) -> dict[str, int] | None:
  try:
    with open(f'/proc/{pid}/status') as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  out = {}
  for line in lines:
    key, _, value = line.partition(':')
    if key in _FIELDS:
      out[key] = int(value.split()[0]) * 1024  # reported in kB
  return out if len(out) == len(_FIELDS) else None


def run_sampled(argv: list[str], log: str, interval: float = 0.02) -> dict:
  """Runs argv (output to `log`); peaks of the sampled /proc fields, wall time, exit code."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  start = time.perf_counter()
  with open(log, 'w') as f:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    peaks = dict.fromkeys(_FIELDS, 0)
    samples = 0
    while proc.poll() is None:
      status = _status_bytes(proc.pid)
      if status:
        samples += 1
        for k, v in status.items():
          peaks[k] = max(peaks[k], v)
      time.sleep(interval)
  with open(log) as f:
    output = f.read()
  return {'peaks': peaks, 'samples': samples, 'seconds': time.perf_counter() - start,
          'returncode': proc.returncode, 'output': output}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='large', choices=['small', 'base', 'large', 'xl', 'xxl'])
  parser.add_argument('--tmp', default='/tmp', help='where the temporary directory goes')
  parser.add_argument('--keep', action='store_true', help='keep the checkpoint and output')
  args = parser.parse_args()

  shapes = encoder_shapes(args.size)
  parameters = sum(int(np.prod(s)) for s in shapes.values())
  largest = max(int(np.prod(s)) for s in shapes.values()) * 4
  work = tempfile.mkdtemp(prefix='charred_convert_memory.', dir=args.tmp)
  src, out = os.path.join(work, 'checkpoint_1000000'), os.path.join(work, 'converted')
  try:
    start = time.perf_counter()
    write_t5x_checkpoint(src, shapes)
    write_seconds = time.perf_counter() - start
    checkpoint_bytes = directory_bytes(src)

    baseline = run_sampled([sys.executable, '-c',
                            'import charred.models.convert.__main__, charred.models.pretrained,'
                            ' charred.models.convert.t5, orbax.checkpoint, tensorstore'],
                           os.path.join(work, 'baseline.log'))
    run = run_sampled([sys.executable, '-m', 'charred.convert', src, out],
                      os.path.join(work, 'convert.log'))
    if run['returncode'] != 0:
      sys.exit(f'converter failed ({run["returncode"]}):\n{run["output"][-3000:]}')
    with open(os.path.join(out, 'charred_model.json')) as f:
      converted = json.load(f)['num_parameters']
    if converted != parameters:
      sys.exit(f'converted {converted} parameters, expected {parameters}')
    output_bytes = directory_bytes(out)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)

  gb = lambda b: f'{b / 1e9:8.3f} GB'
  peaks, base = run['peaks'], baseline['peaks']
  print(run['output'].strip().splitlines()[-1])
  print(f'ByT5-{args.size} encoder: {parameters:,} parameters, {len(shapes)} tensors, '
        f'largest {largest / 1e6:.1f} MB; checkpoint written in {write_seconds:.0f} s, '
        f'converted in {run["seconds"]:.0f} s ({run["samples"]} samples)')
  print(f'{"":28}{"converter":>12}{"imports only":>14}')
  for label, value in (('checkpoint on disk', checkpoint_bytes), ('output on disk', output_bytes)):
    print(f'{label:28}{gb(value):>12}')
  for label, key in (('peak RSS (VmHWM)', 'VmHWM'), ('peak RssAnon', 'RssAnon'),
                     ('peak RssFile', 'RssFile')):
    print(f'{label:28}{gb(peaks[key]):>12}{gb(base[key]):>14}')
  result = {
      'size': args.size, 'parameters': parameters, 'tensors': len(shapes),
      'largest_tensor_bytes': largest, 'checkpoint_bytes': checkpoint_bytes,
      'output_bytes': output_bytes, 'convert_seconds': round(run['seconds'], 1),
      'peak_rss_bytes': peaks['VmHWM'], 'peak_rss_anon_bytes': peaks['RssAnon'],
      'peak_rss_file_bytes': peaks['RssFile'], 'baseline_rss_bytes': base['VmHWM'],
      'baseline_rss_anon_bytes': base['RssAnon'],
      'ratios': {
          'peak_rss_over_checkpoint': round(peaks['VmHWM'] / checkpoint_bytes, 3),
          'peak_rss_anon_over_checkpoint': round(peaks['RssAnon'] / checkpoint_bytes, 3),
          'anon_above_baseline_over_checkpoint': round(
              (peaks['RssAnon'] - base['RssAnon']) / checkpoint_bytes, 3),
          'anon_above_baseline_over_largest_tensor': round(
              (peaks['RssAnon'] - base['RssAnon']) / largest, 2),
      },
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
