"""Smoke sweep: two few-step trainings of typography_micro that differ in learning rate.

  python -m charred.sweep --sweep_file=gin/sweeps/typography_tiny_smoke.py --workdir=runs/smoke

Takes a few minutes on a 2-core CPU (the first run also generates the micro dataset).
"""

NAME = 'typography_tiny_smoke'
GIN_FILES = ['experiments/typography_micro.gin']
# The micro run's 32 validation words, sampled with 2 DDIM steps: checks the path, not
# the model.
EVALUATE_FLAGS = ['--steps=2']


def get_sweep():
  return [{'TRAIN_STEPS': 4, 'optimizer.OptimizerConfig.learning_rate': lr}
          for lr in (1e-3, 3e-4)]
