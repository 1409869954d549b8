"""Learning curves of text rendering: accuracy against training images seen, runs on one
plot (`python -m charred.curves` draws them).

A run is a workdir (its `samples/metrics.jsonl`, one line per periodic evaluation, and
`config.gin` for the batch size) or a training log (its `eval text_rendering @ N:` lines).
"""
from __future__ import annotations

import json
import os
import re
import runpy

_EVAL_LINE = re.compile(r'^eval text_rendering @ (\d+): (.*)$')


def read_curve(path: str, metric: str) -> list[tuple[int, float]]:
  """[(step, value)] of `metric` from a workdir's metrics.jsonl or a training log."""
  jsonl = os.path.join(path, 'samples', 'metrics.jsonl')
  if os.path.isdir(path):
    if not os.path.exists(jsonl):
      raise FileNotFoundError(f'{jsonl} not found: has {path!r} been evaluated?')
    with open(jsonl, encoding='utf-8') as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return [(r['step'], r[metric]) for r in rows if metric in r]
  points = []
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      match = _EVAL_LINE.match(line.strip())
      if match:
        values = dict(item.rsplit(' ', 1) for item in match.group(2).split(', '))
        if metric in values:
          points.append((int(match.group(1)), float(values[metric])))
  return points


def batch_size(workdir: str) -> int:
  """The run's BATCH_SIZE, read from its operative config.gin."""
  with open(os.path.join(workdir, 'config.gin'), encoding='utf-8') as f:
    text = f.read()
  # `batch_size = 16` in a TrainConfig block, or `trainer.TrainConfig.batch_size = %MACRO`.
  match = re.search(r'^\s*(?:[\w.]*TrainConfig\.)?batch_size = (%?\w+)', text, re.MULTILINE)
  value = match.group(1) if match else None
  if value and value.startswith('%'):
    macro = re.search(rf'^{re.escape(value[1:])} = (\d+)', text, re.MULTILINE)
    value = macro.group(1) if macro else None
  if not value or not value.isdigit():
    raise ValueError(f'{workdir}/config.gin binds no TrainConfig.batch_size.')
  return int(value)


def plot(curves: dict[str, list[tuple[int, float]]], metric: str, output: str) -> None:
  """One line per run: `metric` (in %) against training images seen."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
  for name, points in curves.items():
    ax.plot([x for x, _ in points], [100 * y for _, y in points], marker='o', label=name)
  ax.set_xlabel('training images seen')
  ax.set_ylabel(f'{metric} on held-out words (%)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(output)
  plt.close(fig)


if __name__ == '__main__':
  # `python -m charred.evaluation.curves` is `python -m charred.curves` by another name.
  runpy.run_module('charred.curves', run_name='__main__', alter_sys=True)
