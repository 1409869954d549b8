r"""Learning curves of text rendering: accuracy against training images seen, runs on one
plot (the reading and drawing are `charred.evaluation.curves`).

  python -m charred.curves --run='bytes=runs/a' --run='subword=runs/b' \
      [--metric=exact_match_ci] [--output=curves.png]

A run is a workdir (its `samples/metrics.jsonl`, one line per periodic evaluation, and
`config.gin` for the batch size) or a training log (its `eval text_rendering @ N:` lines;
then give the batch size as `name=path@batch`).
"""
from __future__ import annotations

from absl import app
from absl import flags

from charred.evaluation import curves

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when the command runs: `charred.sample` has an --output too."""
  flags.DEFINE_multi_string('run', [], "'name=workdir' or 'name=train.log@batch_size'.")
  flags.DEFINE_string('metric', 'exact_match_ci', 'Metric on the y axis.')
  flags.DEFINE_string('output', 'curves.png', 'Where the PNG goes.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  points = {}
  for spec in FLAGS.run:
    name, _, path = spec.partition('=')
    path, _, batch = path.partition('@')
    batch = int(batch) if batch else curves.batch_size(path)
    points[name] = [(step * batch, v) for step, v in curves.read_curve(path, FLAGS.metric)]
  if not points:
    raise app.UsageError('Give at least one --run=NAME=PATH.')
  curves.plot(points, FLAGS.metric, FLAGS.output)
  print(f'Wrote {FLAGS.output}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
