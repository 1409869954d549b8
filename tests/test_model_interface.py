"""The trainer is generic over base_model.BaseModel: it names no concrete model, and a toy
model that implements the interface trains with it."""

import ast
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred.models import base_model
from charred.trainers import trainer
from charred.trainers.optimizer import OptimizerConfig
from conftest import repeated_batches

TRUE_W, TRUE_B = np.array([2.0, -1.0, 0.5], np.float32), np.float32(0.25)


class LinearRegression(base_model.BaseModel):
  """y = x @ w + b, squared error: the smallest model the trainer can train."""
  batch_keys = ('x', 'y')

  def init_params(self, rng):
    return {'linear': {'w': jax.random.normal(rng, (3,)) * 0.1, 'b': jnp.zeros(())}}

  def param_axes(self):
    return {'linear': {'w': None, 'b': None}}  # replicated

  def loss_fn(self, params, batch, rng, first_example=0):
    del rng, first_example  # deterministic
    error = self.predict_batch(params, batch, None) - batch['y']
    return jnp.mean(error**2), {'mse': jnp.mean(error**2)}

  def predict_batch(self, params, batch, rng, **kwargs):
    return batch['x'] @ params['linear']['w'] + params['linear']['b']


def regression_batch(n=8, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, 3)).astype(np.float32)
  return {'x': x, 'y': x @ TRUE_W + TRUE_B, 'note': np.zeros((n,), np.int32)}


def test_the_trainer_imports_no_concrete_model():
  tree = ast.parse(inspect.getsource(trainer))
  imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
  imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names}
  assert not any('diffusion_model' in m for m in imported), imported
  assert 'DiffusionModel' not in inspect.getsource(trainer)
  assert 'charred.models.diffusion_model' not in {
      getattr(v, '__module__', None) for v in vars(trainer).values()}


def test_an_interface_method_left_out_cannot_be_instantiated():
  class NoLoss(base_model.BaseModel):
    batch_keys = ('x',)
    init_params = param_axes = predict_batch = lambda self, *a, **k: None

  with pytest.raises(TypeError, match='loss_fn'):
    NoLoss()


def test_a_toy_model_trains_with_the_generic_trainer(tmp_path):
  model = LinearRegression()
  assert model.host_batch(regression_batch()).keys() == {'x', 'y'}
  config = trainer.TrainConfig(train_steps=40, batch_size=8, log_every=20, ema_decay=0.5,
                               optimizer=OptimizerConfig(learning_rate=0.1, warmup_steps=0,
                                                         weight_decay=0.0))
  seeds = iter(range(10**6))
  logs = []
  state = trainer.train(str(tmp_path), model, config,
                        repeated_batches(lambda: regression_batch(seed=next(seeds))),
                        log=logs.append)
  held_out = regression_batch(seed=-1 % 2**32)
  before = model.loss_fn(model.init_params(jax.random.PRNGKey(config.seed)), held_out, None)[0]
  after = model.loss_fn(state.params, held_out, None)[0]
  assert int(state.step) == 40
  assert after < 0.01 * before, (before, after)
  np.testing.assert_allclose(state.params['linear']['w'], TRUE_W, atol=0.2)
  assert any('loss' in line for line in logs), logs


def test_a_model_without_a_host_stage_refuses_text_encoder_on_host():
  with pytest.raises(ValueError, match='LinearRegression has no host stage'):
    trainer.check_model(LinearRegression(), trainer.TrainConfig(
        train_steps=1, batch_size=8, text_encoder_on_host=True))
