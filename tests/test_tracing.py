"""Retracing fails loudly: the train step and the sampler trace once per input signature,
and a second trace of one signature (what a retrace on every call looks like) raises."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred.models import tracing
from charred.models.diffusion_model import DiffusionModel
from charred.trainers import partitioning
from charred.trainers import trainer
from charred.trainers.optimizer import OptimizerConfig
from test_model_interface import LinearRegression, regression_batch
from test_optimizer import nano_model, nano_params

RETRACE = 'traced > 1 times'


@pytest.fixture(autouse=True)
def fresh_trace_counts():
  # chex's counts are global to the process.
  chex.clear_trace_counter()
  yield
  chex.clear_trace_counter()


def test_one_trace_per_signature_and_a_changing_static_value_is_caught():
  f = jax.jit(tracing.once_per_signature(lambda x, n: x * n, 'scale'), static_argnums=1)
  for _ in range(3):
    f(jnp.ones(3), 2)
  f(jnp.ones(4), 2)  # a new shape: one more program, as bucketed batches need
  with pytest.raises(AssertionError, match=RETRACE):
    f(jnp.ones(3), 3)  # the same arrays, a new static value: a retrace


def test_a_jit_rebuilt_around_one_guard_is_caught():
  guarded = tracing.once_per_signature(lambda x, y: x + y, 'add')
  jax.jit(functools.partial(guarded, y=1.0))(jnp.ones(2))
  with pytest.raises(AssertionError, match=RETRACE):
    jax.jit(functools.partial(guarded, y=1.0))(jnp.ones(2))  # a new function: a retrace


def test_guards_count_apart():
  # Two runs in one process (tests, sweeps) each trace their own step once.
  for _ in range(2):
    f = jax.jit(tracing.once_per_signature(lambda x: x + 1, 'plus_one'))
    f(jnp.ones(2))
    f(jnp.ones(2))


def test_the_train_step_traces_once_and_a_retrace_is_caught():
  model = LinearRegression()
  config = trainer.TrainConfig(train_steps=4, batch_size=8,
                               optimizer=OptimizerConfig(warmup_steps=0))
  tx = trainer.make_tx(config)
  mesh, batch_sharding = trainer.make_mesh(config)
  state = trainer.create_sharded_state(model, config, tx, mesh)
  step_fn = trainer.jit_train_step(model, config, tx, state, batch_sharding)
  rng = np.asarray(jax.random.PRNGKey(0))

  def batch(seed):
    return partitioning.global_batch(model.host_batch(regression_batch(seed=seed)),
                                     batch_sharding, 1)

  for seed in range(3):
    state, _ = step_fn(state, batch(seed), rng)
  assert int(state.step) == 3
  jax.clear_caches()  # what a jit rebuilt every step, or a changing static value, does
  with pytest.raises(AssertionError, match=RETRACE):
    step_fn(state, batch(3), rng)


def test_the_sampler_traces_once_and_a_retrace_is_caught():
  generator = DiffusionModel(nano_model()).generator(nano_params(), num_steps=2)
  first = generator(['ab', 'cd'], seed=1)
  np.testing.assert_array_equal(generator(['ab', 'cd'], seed=1), first)
  generator(['ab'], seed=1)  # one prompt: another shape, another program
  jax.clear_caches()
  with pytest.raises(AssertionError, match=RETRACE):
    generator(['ab', 'cd'], seed=1)
