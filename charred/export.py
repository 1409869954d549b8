r"""Exports a trained run for serving without Python's JAX: StableHLO and IREE modules.

  python -m charred.export --workdir=RUN --out=DIR [--batch=1] [--steps=50] \
      [--guidance_scale=G] [--scheduler=ddim] [--targets=llvm-cpu,cuda] [--overwrite]

DIR gets `manifest.json` (inputs, outputs, shapes, dtypes and the sampling settings),
`weights.irpa` (every weight, an IREE parameter archive) and, for each of encode_text,
sample (the guided sampling loop: --steps, --batch prompts) and decode, a `jax.export`
artefact, its MLIR and one `.vmfb` per IREE target: llvm-cpu, plus cuda where the
installed compiler has it (unless --targets names them). See `charred.aot` for the
layout and for running them (`aot.IreeModel(DIR)`, the Python IREE runtime).
"""

from __future__ import annotations

from absl import app
from absl import flags

from charred.configs import gin_utils

FLAGS = flags.FLAGS
PROG = 'charred.export'


def define_flags() -> None:
  """Defined only when the command runs: --workdir, --out, --steps and others are other
  commands' flags too."""
  flags.DEFINE_string('workdir', None, 'Training workdir (config.gin or charred_run.json, '
                      'and checkpoints/).')
  flags.DEFINE_string('out', None, 'Output folder (new, empty, or with --overwrite).')
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: newest).')
  flags.DEFINE_integer('batch', 1, 'Prompts per call of the exported modules.')
  flags.DEFINE_integer('steps', 50, 'Sampling steps of the exported loop.')
  flags.DEFINE_float('guidance_scale', None, "Guidance scale (default: the run's own).")
  flags.DEFINE_string('scheduler', 'ddim', 'Sampler: ddim, ddpm, euler, euler_ancestral or '
                      'dpmpp_2m (trailing spacing).')
  flags.DEFINE_float('guidance_rescale', 0.0, 'Guidance rescale phi in [0, 1].')
  flags.DEFINE_list('targets', [], 'IREE targets (llvm-cpu, cuda); default: llvm-cpu, and '
                    'cuda where the compiler has it.')
  flags.DEFINE_bool('overwrite', False, 'Replace a non-empty --out.')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('--workdir and --out are required.')
  # Imported after flag parsing so that --help is fast.
  from charred import aot  # pylint: disable=g-import-not-at-top
  from charred.pipeline import TextToImagePipeline  # pylint: disable=g-import-not-at-top
  from charred.trainers.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    aot.check_out_dir(FLAGS.out, FLAGS.overwrite)  # before the slow part; nothing written
    pipe = TextToImagePipeline.from_pretrained(FLAGS.workdir, FLAGS.checkpoint_step)
    manifest = pipe.export(
        FLAGS.out, batch=FLAGS.batch, num_steps=FLAGS.steps,
        guidance_scale=FLAGS.guidance_scale, scheduler=FLAGS.scheduler,
        guidance_rescale=FLAGS.guidance_rescale, targets=FLAGS.targets or None,
        overwrite=FLAGS.overwrite, settings={'workdir': FLAGS.workdir})
  except (ValueError, OSError, KeyError, CheckpointError) as e:
    gin_utils.exit_with_error(PROG, e)
  compiled = [t for t, v in manifest['targets'].items() if v['compiled']]
  skipped = {t: v['error'] for t, v in manifest['targets'].items() if not v['compiled']}
  print(f'Wrote {FLAGS.out}: {", ".join(manifest["functions"])} for {", ".join(compiled)}; '
        f'{manifest["parameters"]["count"]} parameters '
        f'({manifest["parameters"]["bytes"]:,} bytes) in {manifest["parameters"]["file"]}.'
        + (f' Not compiled: {skipped}.' if skipped else ''))


if __name__ == '__main__':
  define_flags()
  app.run(main)
