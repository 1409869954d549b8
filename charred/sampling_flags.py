"""The flags that `charred.sample` and `charred.evaluate` share: which run, and how to sample."""

from __future__ import annotations

from absl import flags

from charred.configs import gin_utils

WORKDIR = gin_utils.workdir_flag('Training workdir (config.gin + checkpoints).')
CHECKPOINT_STEP = flags.DEFINE_integer('checkpoint_step', None,
                                       'Checkpoint step (default: newest).')
SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
STEPS = flags.DEFINE_integer('steps', 50, 'Sampling steps.')
GUIDANCE_SCALE = flags.DEFINE_float('guidance_scale', None, 'Classifier-free guidance scale '
                                     "(default: the run's own, SampleEvalConfig.guidance_scale).")
SCHEDULER = flags.DEFINE_string('scheduler', 'ddim', 'Sampler: ddim, ddpm, euler, '
                                'euler_ancestral or dpmpp_2m (trailing spacing).')
GUIDANCE_RESCALE = flags.DEFINE_float('guidance_rescale', 0.0, 'Guidance rescale phi in '
                                      '[0, 1] (0.7 suits a zero-terminal-SNR schedule).')


def guidance_scale(run_guidance_scale: float) -> float:
  """The flag's guidance scale, else the one the run's experiment samples with."""
  return run_guidance_scale if GUIDANCE_SCALE.value is None else GUIDANCE_SCALE.value


def generator_kwargs(run_guidance_scale: float) -> dict:
  """ImageGenerator's sampling arguments from the flags; guidance falls back to the run's."""
  return dict(num_steps=STEPS.value, guidance_scale=guidance_scale(run_guidance_scale),
              scheduler=SCHEDULER.value, guidance_rescale=GUIDANCE_RESCALE.value)
