"""Train-step comparisons that compile quickly: random parameters drawn in numpy (the
comparisons need fixed parameters, not the model's initialisation, whose compilation
takes longer than the steps'), and the losses of several steps read from one program."""

import functools

import jax
import numpy as np

from charred.trainers import trainer


def random_state(model, config, tx, seed: int = 0) -> trainer.TrainState:
  """A train state with random parameters at the usual scales: kernels and embeddings
  N(0, 1 / fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)
  shapes = trainer.abstract_state(model, config, tx).params

  def draw(path, s):
    x, name = rng.standard_normal(s.shape), jax.tree_util.keystr(path)
    if 'embedding' in name:
      pass
    elif len(s.shape) >= 2:
      x = x / np.sqrt(np.prod(s.shape[:-1]))
    else:
      x = 0.1 * x + ('scale' in name)
    return x.astype(s.dtype)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  return jax.jit(functools.partial(trainer.state_from_params, tx=tx))(params)


def step_losses(state, rng, steps_and_batches) -> list[float]:
  """The `loss` metric of train_step `step(state, batch, rng)` for each (step, batch).
  Only the losses are read, so XLA drops the updates; one compilation for all."""
  steps = [step for step, _ in steps_and_batches]
  losses = jax.jit(lambda state, batches: [
      step(state, batch, rng)[1]['loss'] for step, batch in zip(steps, batches)])
  return [float(x) for x in losses(state, [batch for _, batch in steps_and_batches])]
