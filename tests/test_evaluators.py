"""Evaluators: the registry, cadence, lazy building, validation loss, the OCR ceiling, and
no effect on training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred import tokenizer
from charred.models.diffusion_model import DiffusionModel
from charred.evaluation import evaluators
from charred.trainers import trainer
from charred.trainers.optimizer import OptimizerConfig
from test_monitoring import nano_model
from test_trainer import fixed_batch
from conftest import repeated_batches


def test_periodic_evaluator_cadence_and_lazy_build():
  built, ran = [], []

  def build():
    built.append(len(ran))
    return lambda step, params, writer: ran.append(step) or {'eval/x': 1.0}

  every3 = evaluators.PeriodicEvaluator('x', 3, build)
  results = [every3(s, params=None, writer=None, last=s == 7) for s in range(1, 8)]
  assert ran == [3, 6, 7] and built == [0]  # built once, when first due
  assert [r is not None for r in results] == [s in (3, 6, 7) for s in range(1, 8)]
  never = evaluators.PeriodicEvaluator('never', 0, lambda: pytest.fail('built'))
  assert never(5, params=None, writer=None, last=True) is None
  with pytest.raises(ValueError, match="'bad': every must be"):
    evaluators.PeriodicEvaluator('bad', -1, build)


class FakeOcr:
  """Reads 'ab' everywhere: the sampling and the grid run; OCR's speed does not matter."""

  def read(self, images):
    return ['ab'] * len(images)


def validation_batches(n=3):
  rng = np.random.default_rng(1)
  for i in range(n):
    tokens, mask = tokenizer.encode_batch([f'held{i}a', f'held{i}b'], 16)
    image = rng.uniform(-1, 1, (2, 8, 16, 3)) * (i + 1) / n  # a different mean square each
    yield {'image': image.astype(np.float32), 'text_tokens': tokens, 'text_mask': mask,
           'caption': np.array(['x', 'y'])}


@pytest.mark.slow
def test_evaluators_every_step_leave_training_bit_identical(tmp_path):
  model_config = nano_model()
  config = trainer.TrainConfig(
      train_steps=3, batch_size=2, log_every=1, nan_policy='none',
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
      monitoring=trainer.monitoring.MonitoringConfig(count_flops=False))
  model = DiffusionModel(model_config)
  batch = fixed_batch(2)
  batches = repeated_batches(lambda: batch)
  validation = evaluators.ValidationConfig(every=1, num_batches=2, seed=3)
  losses, built = {}, {}

  def build_validation():
    built['validation'] = evaluators.ValidationLossEvaluator(
        model, validation_batches(), validation)
    return lambda step, params, writer: losses.setdefault(
        step, built['validation'](step, params, writer))

  def build_samples():
    targets = [evaluators.RenderingTarget('sign "ab"', 'ab')] * 2  # text_length 16
    return evaluators.TextRenderingEvaluator(
        model, targets, str(tmp_path / 'with' / 'samples'),
        evaluators.SampleEvalConfig(num_prompts=2, num_steps=2), ocr=FakeOcr())

  plain = trainer.train(str(tmp_path / 'plain'), model, config, batches,
                        log=lambda s: None)
  lines = []
  evaluated = trainer.train(
      str(tmp_path / 'with'), model, config, batches, log=lines.append, evaluators=[
          evaluators.PeriodicEvaluator('validation', 1, build_validation),
          evaluators.PeriodicEvaluator('text_rendering', 1, build_samples)])

  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                plain, evaluated)
  assert all(jax.tree_util.tree_leaves(same))
  assert sorted(losses) == [1, 2, 3]
  assert sum(line.startswith('eval text_rendering @ ') for line in lines) == 3
  assert (tmp_path / 'with' / 'samples' / 'step_3.png').exists()
  assert not (tmp_path / 'with' / 'profile').exists()  # no profile unless asked for

  # The last validation loss is that of the final EMA params, not the raw params, and
  # the same parameters always give the same loss (fixed timesteps and noise).
  evaluate = built['validation']
  writer = type('Writer', (), {'write_scalars': lambda self, step, scalars: None})()
  loss = lambda params: evaluate(3, params, writer)['validation/loss']
  assert loss(evaluated.ema_params) == losses[3]['validation/loss']
  assert loss(evaluated.params) != losses[3]['validation/loss']
  # A U-Net with all weights zero predicts 0 everywhere, so the x0-target loss is the
  # mean squared image over the fixed batches, whatever the timesteps and noise.
  zero = dict(evaluated.ema_params,
              unet=jax.tree_util.tree_map(jnp.zeros_like, evaluated.ema_params['unet']))
  expected = np.mean([np.mean(np.square(b['image'])) for b in list(validation_batches())[:2]])
  assert loss(zero) == pytest.approx(expected, rel=1e-5)


def eval_data(read):
  """EvalData over validation_batches(); `read` records which splits were asked for."""
  def batches(split, batch_size):
    read.append(('batches', split, batch_size))
    return validation_batches()

  def targets(split):
    read.append(('targets', split))
    return [evaluators.RenderingTarget('sign "ab"', 'ab', 'common'),
            evaluators.RenderingTarget('sign "cd"', 'cd', 'rare')]

  def ground_truth(texts, height, width, seed):
    read.append(('ground_truth', tuple(texts), height, width, seed))
    return np.zeros((len(texts), height, width, 3), np.uint8)

  return evaluators.EvalData(batches, targets, batch_size=2, ground_truth=ground_truth)


def test_registry_builds_each_evaluator_from_its_config_with_its_own_cadence():
  model = DiffusionModel(nano_model())
  read = []
  configs = {'loss': evaluators.ValidationConfig(every=5, split='train', num_batches=1),
             'ocr': evaluators.SampleEvalConfig(every=7, split='test', num_steps=1)}
  periodic = evaluators.periodic(configs, model, eval_data(read), workdir=None)
  assert [(p.name, p.every) for p in periodic] == [('loss', 5), ('ocr', 7)]
  assert not read  # nothing is read or compiled before an evaluator first runs
  loss = evaluators.build('loss', configs['loss'], model, eval_data(read), None)
  assert isinstance(loss, evaluators.ValidationLossEvaluator) and len(loss.batches) == 1
  ocr = evaluators.build('ocr', configs['ocr'], model, eval_data(read), None)
  assert isinstance(ocr, evaluators.TextRenderingEvaluator) and len(ocr.targets) == 2
  assert read == [('batches', 'train', 2), ('targets', 'test')]
  assert evaluators.sampling_config(configs) is configs['ocr']
  assert evaluators.sampling_config({}) == evaluators.SampleEvalConfig()


def test_unknown_evaluator_configs_fail_with_one_line():
  from charred.configs.experiment import Experiment
  model = DiffusionModel(nano_model())
  with pytest.raises(ValueError, match="Evaluator 'x': int is not an evaluator config; "
                     'expected one of SampleEvalConfig, ValidationConfig'):
    evaluators.periodic({'x': 3}, model, eval_data([]), None)
  with pytest.raises(ValueError, match="Evaluator 'loss': OptimizerConfig"):
    Experiment(model=nano_model(), train=trainer.TrainConfig(1, 1),
               evaluators={'loss': OptimizerConfig()})
  with pytest.raises(ValueError, match='must be a dict'):
    evaluators.check([evaluators.ValidationConfig()])
  with pytest.raises(ValueError, match='every must be an integer'):
    evaluators.SampleEvalConfig(every=-1)


@pytest.mark.slow
def test_text_rendering_without_a_directory_writes_nothing_and_scores_the_ceiling(tmp_path):
  model = DiffusionModel(nano_model())
  read = []
  config = evaluators.SampleEvalConfig(num_steps=1, attention_maps=0, ceiling=True, seed=4)
  evaluator = evaluators.TextRenderingEvaluator(
      model, eval_data(read).targets('validation'), None, config, ocr=FakeOcr(),
      ground_truth=eval_data(read).ground_truth)
  params = model.init_params(jax.random.PRNGKey(0))
  written = []
  writer = type('Writer', (), {'write_scalars': lambda self, step, m: written.append(m),
                               'write_images': lambda self, step, images: None})()
  metrics = evaluator(9, params, writer)
  # FakeOcr reads 'ab' everywhere: one of the two targets is right, model and ceiling alike.
  assert metrics['eval/exact_match'] == 0.5 and metrics['eval/ceiling/exact_match'] == 0.5
  assert read[-1] == ('ground_truth', ('ab', 'cd'), 8, 16, 4)  # the samples' size and seed
  assert evaluator.picture.dtype == np.uint8 and written == [metrics]
  assert not list(tmp_path.iterdir())
  with pytest.raises(ValueError, match='ceiling needs'):
    evaluators.TextRenderingEvaluator(model, eval_data([]).targets('x'), None, config)
