"""Schedules and the DDIM sampler against closed forms and diffusers' documented values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from charred.models import diffusion, sampling


def test_scaled_linear_schedule_closed_form():
  s = diffusion.NoiseSchedule('scaled_linear', 1000, 0.00085, 0.012)
  betas = s.betas()
  assert betas[0] == pytest.approx(0.00085)
  assert betas[-1] == pytest.approx(0.012)
  # Stable Diffusion's final alpha-bar, prod(1 - beta), is about 0.0047.
  assert s.alphas_cumprod()[-1] == pytest.approx(np.prod(1 - betas), rel=1e-5)
  assert 0.004 < s.alphas_cumprod()[-1] < 0.0055


def test_cosine_schedule_follows_nichol_dhariwal():
  s = diffusion.NoiseSchedule('cosine', 1000)
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2)**2
  for t in (0, 100, 500, 900):
    assert s.alphas_cumprod()[t] == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-4)


def test_unknown_schedule_is_a_clear_error():
  with pytest.raises(ValueError, match='Unknown noise schedule'):
    diffusion.NoiseSchedule('quadratic')


@pytest.mark.parametrize('spacing,expected', [
    # diffusers' DDIMScheduler(num_train_timesteps=1000).set_timesteps(10) timesteps.
    ('leading', [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ('trailing', [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ('linspace', [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_ddim_timesteps_match_diffusers(spacing, expected):
  assert sampling.ddim_timesteps(1000, 10, spacing).tolist() == expected


@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
def test_targets_invert(prediction_type):
  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(2, 3, 4, 3)), rng.normal(size=(2, 3, 4, 3))
  a = jnp.array([0.3, 0.9])
  x_t = diffusion.add_noise(x0, noise, a)
  target = diffusion.training_target(prediction_type, x0, noise, a)
  x0_hat, eps_hat = diffusion.predict_x0_and_eps(prediction_type, target, x_t, a)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
  np.testing.assert_allclose(eps_hat, noise, atol=1e-5)


@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
@pytest.mark.parametrize('guidance_scale', [1.0, 4.0])
def test_ddim_with_an_oracle_denoiser_returns_the_data_point(prediction_type, guidance_scale):
  """If the data distribution is one point x*, the ideal model's output is known in closed
  form at every (x_t, t); deterministic DDIM must then land exactly on x*."""
  schedule = diffusion.NoiseSchedule('cosine')
  alphas = schedule.alphas_cumprod()
  x_star = jnp.asarray(np.random.default_rng(1).uniform(-0.9, 0.9, (2, 4, 8, 3)), jnp.float32)

  def oracle(x_t, t, context, mask):
    a = jnp.asarray(alphas)[t]
    eps = (x_t - jnp.sqrt(a)[:, None, None, None] * jnp.concatenate([x_star] * (
        x_t.shape[0] // 2))) / jnp.sqrt(1 - a)[:, None, None, None]
    x0 = jnp.concatenate([x_star] * (x_t.shape[0] // 2))
    return diffusion.training_target(prediction_type, x0, eps, a)

  noise = jnp.asarray(np.random.default_rng(2).normal(size=x_star.shape), jnp.float32)
  ctx, mask = jnp.zeros((2, 3, 4)), jnp.ones((2, 3))
  out = sampling.ddim_sample(
      oracle, noise, ctx, mask, ctx, mask, alphas_cumprod=alphas,
      prediction_type=prediction_type, num_steps=20, guidance_scale=guidance_scale)
  np.testing.assert_allclose(out, x_star, atol=2e-3)
