"""Schedulers step by step against diffusers' PyTorch schedulers of the same config, and the
guided sampling loop against diffusers' pipeline loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred.models import diffusion, sampling, schedulers

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
# pylint: disable=g-import-not-at-top,g-bad-import-order
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

DIFFUSERS = {
    'ddpm': diffusers.DDPMScheduler,
    'ddim': diffusers.DDIMScheduler,
    'euler': diffusers.EulerDiscreteScheduler,
    'euler_ancestral': diffusers.EulerAncestralDiscreteScheduler,
    'dpmpp_2m': diffusers.DPMSolverMultistepScheduler,
}
# Our schedule kind -> (diffusers' beta_schedule, beta_start, beta_end).
BETAS = {
    'linear': ('linear', 0.0001, 0.02),
    'scaled_linear': ('scaled_linear', 0.00085, 0.012),
    'cosine': ('squaredcos_cap_v2', 0.0001, 0.02),
}
SHAPE = (2, 4, 4, 3)
TOL = 1e-6  # max |ours - reference| / max |reference|; ours in float32 (see run_parity)


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def make_pair(name, prediction_type='epsilon', spacing='leading', betas='scaled_linear',
              zero_snr=False, steps_offset=0, clip_sample=None, **kwargs):
  """(ours, diffusers') schedulers of one config, on one alpha-bar table.

  diffusers builds its table in float32 and ours is float64 rounded once to float32; they
  differ by float32 rounding (checked in test_schedules_match_diffusers), up to 1e-5
  relative where alpha-bar is tiny. To compare the stepping itself, diffusers gets
  our table, keeping its own last entry (its zero-terminal-SNR guard, 2^-24 for Euler and
  DPM-Solver) so that that guard is diffusers', not ours.
  """
  kind, start, end = BETAS[betas]
  schedule = diffusion.NoiseSchedule(betas, 1000, start, end, rescale_zero_terminal_snr=zero_snr)
  ours_kwargs = dict(kwargs)
  ref_kwargs = {}  # DDIM's eta is a step() argument in diffusers
  if name in ('ddpm', 'ddim'):
    ours_kwargs['clip_sample'] = clip_sample
    ref_kwargs.update(clip_sample=clip_sample is not None, clip_sample_range=clip_sample or 1.0)
  ours = schedulers.make(name, schedule=schedule, prediction_type=prediction_type,
                         spacing=spacing, steps_offset=steps_offset, **ours_kwargs)
  ref_prediction = prediction_type
  if name == 'euler_ancestral' and prediction_type == 'sample':
    ref_prediction = 'epsilon'  # diffusers has no 'sample' here: see run_parity
  ref = DIFFUSERS[name](
      num_train_timesteps=1000, beta_schedule=kind, beta_start=start, beta_end=end,
      prediction_type=ref_prediction, timestep_spacing=spacing, steps_offset=steps_offset,
      rescale_betas_zero_snr=zero_snr, **ref_kwargs)
  table = torch.from_numpy(schedule.alphas_cumprod())
  if zero_snr:
    table[-1] = ref.alphas_cumprod[-1]
  ref.alphas_cumprod = table
  return ours, ref


def _euler_step_f64(ref, i, out, x, noise, prediction_type):
  """diffusers' Euler(-ancestral) step, transcribed from its source, in float64 on its
  own (float32) sigmas."""
  s = ref.sigmas.numpy().astype(np.float64)
  sigma, sigma_next = s[i], s[i + 1]
  if prediction_type == 'epsilon':
    x0 = x - sigma * out
  elif prediction_type == 'v_prediction':
    x0 = out * (-sigma / (sigma**2 + 1)**0.5) + (x / (sigma**2 + 1))
  else:
    x0 = out
  derivative = (x - x0) / sigma
  if isinstance(ref, diffusers.EulerAncestralDiscreteScheduler):
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)**0.5
    sigma_down = (sigma_next**2 - sigma_up**2)**0.5
    return x + derivative * (sigma_down - sigma) + noise * sigma_up
  return x + derivative * (sigma_next - sigma)


def run_parity(monkeypatch, name, num_steps=8, seed=0, eta=0.0, **config):
  """Steps ours and diffusers' with the same model outputs (0.5 * scaled input + a seeded
  Gaussian) and, where stochastic, the same noise; 8 steps make Euler's linspace timesteps
  fractional. Returns the max relative errors over all steps: 'ours' against the
  reference, and for the Euler family 'diffusers' (its float32 steps against the reference)
  with 'bound', what float32 rounding explains.

  The reference is diffusers itself, in float64 where it computes in the input's dtype
  (DDPM, DDIM), else in float32 (DPM-Solver and the Euler family cast to float32). For the
  Euler family the reference is its update evaluated in float64 from its own sigmas:
  its float32 form x + (x - x0) / sigma * (sigma_next - sigma) cancels x against nearly -x
  when sigma_next << sigma (cosine's sigma_max is 2e4, zero terminal SNR's 4096), losing
  a relative 2^-24 |x| / |x_next| per step; ours is rearranged not to.
  """
  kwargs = {'eta': eta} if name == 'ddim' else {}
  ours, ref = make_pair(name, **config, **kwargs)
  ref.set_timesteps(num_steps)
  prediction_type = config.get('prediction_type', 'epsilon')
  ts = ours.timesteps(num_steps)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  assert ours.init_noise_sigma(num_steps) == pytest.approx(float(ref.init_noise_sigma), rel=TOL)

  in_float64 = name in ('ddpm', 'ddim')
  euler = name in ('euler', 'euler_ancestral')
  dtype = torch.float64 if in_float64 else torch.float32
  if in_float64:
    ref.alphas_cumprod = ref.alphas_cumprod.double()
  noise_holder = []
  fake_randn = lambda shape, dtype=None, **unused: noise_holder[-1].to(dtype)
  monkeypatch.setattr(scheduling_ddpm, 'randn_tensor', fake_randn)
  monkeypatch.setattr(scheduling_euler_ancestral_discrete, 'randn_tensor', fake_randn)

  rng = np.random.default_rng(seed)
  x_init = rng.standard_normal(SHAPE).astype(np.float32)
  x_ref = torch.from_numpy(x_init).to(dtype) * ref.init_noise_sigma
  x64 = x_init.astype(np.float64) * float(ref.init_noise_sigma)
  x = jnp.asarray(x_init) * ours.init_noise_sigma(num_steps)
  state = ours.init_state(num_steps, x)
  errors = {'ours': rel_err(x, x_ref), 'diffusers': 0.0, 'bound': TOL}
  for i, t in enumerate(ref.timesteps):
    in_ref = ref.scale_model_input(x_ref, t)
    x_in = ours.scale_model_input(state, x, jnp.int32(i))  # an index as the loop traces it
    if euler:
      in64 = x64 / (float(ref.sigmas[i])**2 + 1)**0.5
      errors['ours'] = max(errors['ours'], rel_err(x_in, in64))
      errors['diffusers'] = max(errors['diffusers'], rel_err(in_ref, in64))
    else:
      errors['ours'] = max(errors['ours'], rel_err(x_in, in_ref))
    r = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    out_ref = 0.5 * in_ref + torch.from_numpy(r).to(dtype)
    out = 0.5 * x_in + jnp.asarray(r)
    step_kwargs = {}
    if name == 'ddim':
      step_kwargs = dict(eta=eta, variance_noise=torch.from_numpy(noise).to(dtype) if eta else None)
    if name == 'euler_ancestral' and prediction_type == 'sample':
      # diffusers has no x0 outputs here; its x0 is x - sigma * eps: feed it the eps that
      # means our x0.
      sigma = ref.sigmas[ref.step_index]
      out_ref = (x_ref - out_ref) / sigma
    noise_holder.append(torch.from_numpy(noise))
    x_prev_ref = ref.step(out_ref, t, x_ref, **step_kwargs).prev_sample
    x_prev, state = ours.step(state, out, jnp.int32(i), x, noise=jnp.asarray(noise))
    if euler:
      out64 = 0.5 * in64 + r
      x64_prev = _euler_step_f64(ref, i, out64, x64, noise, prediction_type)
      errors['ours'] = max(errors['ours'], rel_err(x_prev, x64_prev))
      errors['diffusers'] = max(errors['diffusers'], rel_err(x_prev_ref, x64_prev))
      growth = np.max(np.abs(x64)) / np.max(np.abs(x64_prev))
      errors['bound'] = max(errors['bound'], TOL * growth)
      x64 = x64_prev
    else:
      errors['ours'] = max(errors['ours'], rel_err(x_prev, x_prev_ref))
    x, x_ref = x_prev, x_prev_ref
  assert np.all(np.isfinite(np.asarray(x)))
  return errors


def check_parity(monkeypatch, name, **config):
  errors = run_parity(monkeypatch, name, **config)
  assert errors['ours'] <= TOL, errors
  assert errors['diffusers'] <= errors['bound'], errors


@pytest.mark.parametrize('betas', list(BETAS))
@pytest.mark.parametrize('spacing', schedulers.SPACINGS)
@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
@pytest.mark.parametrize('name', list(DIFFUSERS))
def test_steps_match_diffusers(monkeypatch, name, prediction_type, spacing, betas):
  clip = 1.0 if betas == 'linear' else None  # DDPM/DDIM, both ways across the grid
  check_parity(monkeypatch, name, prediction_type=prediction_type, spacing=spacing,
               betas=betas, clip_sample=clip)


@pytest.mark.parametrize('name', list(DIFFUSERS))
@pytest.mark.parametrize('betas', ['scaled_linear', 'linear'])
def test_zero_terminal_snr_steps_match_diffusers(monkeypatch, name, betas):
  check_parity(monkeypatch, name, prediction_type='v_prediction', spacing='trailing',
               betas=betas, zero_snr=True)


@pytest.mark.parametrize('name', list(DIFFUSERS))
def test_steps_offset_and_odd_step_counts_match_diffusers(monkeypatch, name):
  for num_steps, spacing in [(7, 'leading'), (13, 'linspace'), (3, 'trailing'), (1, 'leading')]:
    check_parity(monkeypatch, name, num_steps=num_steps, spacing=spacing, steps_offset=1,
                 prediction_type='v_prediction')


@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
def test_ddim_with_eta_matches_diffusers(monkeypatch, prediction_type):
  check_parity(monkeypatch, 'ddim', eta=0.7, prediction_type=prediction_type,
               spacing='trailing', clip_sample=1.0)


@pytest.mark.parametrize('betas', list(BETAS))
def test_schedules_match_diffusers(betas):
  kind, start, end = BETAS[betas]
  ours = diffusion.NoiseSchedule(betas, 1000, start, end)
  ref = diffusers.DDIMScheduler(beta_schedule=kind, beta_start=start, beta_end=end)
  # diffusers computes betas in float32 (linspace, squaring): a few ulp.
  np.testing.assert_allclose(ours.betas(), ref.betas.numpy(), rtol=5e-7)
  # Its float32 cumprod drifts further, and 1 - beta at cosine's cap of 0.999 keeps only
  # ~3e-5 of relative precision in float32; a wrong formula would be off by far more.
  table = ours.alphas_cumprod()
  assert table.dtype == np.float32
  np.testing.assert_allclose(table, ref.alphas_cumprod.numpy(), rtol=5e-5)

  zero = diffusion.NoiseSchedule(betas, 1000, start, end, rescale_zero_terminal_snr=True)
  ref = diffusers.DDIMScheduler(beta_schedule=kind, beta_start=start, beta_end=end,
                                rescale_betas_zero_snr=True)
  assert zero.alphas_cumprod()[-1] == 0 and ref.alphas_cumprod[-1] == 0
  assert zero.alphas_cumprod()[-2] > 0
  # The rescaling shifts sqrt(alpha-bar), so compare that (diffusers' float32 shift).
  np.testing.assert_allclose(np.sqrt(zero.alphas_cumprod()), ref.alphas_cumprod.numpy()**0.5,
                             atol=1e-6)


def test_rescale_zero_terminal_snr_matches_diffusers():
  betas = diffusion.NoiseSchedule('scaled_linear').betas()
  ref = diffusers.schedulers.scheduling_ddim.rescale_zero_terminal_snr(torch.from_numpy(betas))
  ours = diffusion.rescale_zero_terminal_snr(betas)
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-12, atol=1e-15)
  assert np.cumprod(1 - ours)[-1] == 0


def test_epsilon_at_zero_terminal_snr_is_a_clear_error(monkeypatch):
  schedule = diffusion.NoiseSchedule(rescale_zero_terminal_snr=True)
  x = jnp.zeros(SHAPE)
  for name in ('ddim', 'ddpm'):
    with pytest.raises(ValueError, match='zero terminal'):
      schedulers.make(name, schedule=schedule, spacing='trailing').init_state(10, x)
  # 'leading' never visits the last timestep; Euler and DPM++ clamp alpha-bar as diffusers.
  schedulers.DDIM(schedule=schedule, spacing='leading').init_state(10, x)
  for name in ('euler', 'dpmpp_2m'):
    check_parity(monkeypatch, name, spacing='trailing', zero_snr=True)


def test_rescale_noise_cfg_matches_diffusers():
  rng = np.random.default_rng(0)
  cond = rng.normal(size=SHAPE).astype(np.float32) * np.array([1.0, 3.0])[:, None, None, None]
  guided = (cond + 2 * rng.normal(size=SHAPE)).astype(np.float32)
  for phi in (0.0, 0.7, 1.0):
    ref = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), phi).numpy()
    ours = sampling.rescale_noise_cfg(jnp.asarray(guided), jnp.asarray(cond), phi)
    assert rel_err(ours, ref) <= TOL


def _toy_denoiser(xp):
  """One small model, in jax (xp=jnp) or torch: depends on x, t and the context."""
  def denoise(x, t, context, mask):
    c = (context * mask[..., None]).mean(axis=(1, 2)) if xp is jnp else (
        (context * mask[..., None]).mean(dim=(1, 2)))
    scale = xp.cos(t * 0.002)[:, None, None, None]
    return 0.6 * scale * x + 0.3 * xp.sin(x) + c[:, None, None, None]
  return denoise


@pytest.mark.parametrize('name', list(DIFFUSERS))
def test_guided_loop_matches_a_diffusers_pipeline_loop(monkeypatch, name):
  """`sample` against StableDiffusionPipeline's loop: init_noise_sigma, scale_model_input,
  guidance [cond; uncond] and its rescale, step, with our noise fed to the stochastic ones.
  Zero terminal SNR except for the Euler family, whose float32 steps from sigma 4096 lose
  digits in diffusers (see run_parity)."""
  num_steps, scale, phi = 8, 4.0, 0.7
  euler = name in ('euler', 'euler_ancestral')
  ours, ref = make_pair(name, prediction_type='v_prediction', spacing='trailing',
                        zero_snr=not euler)
  rng = np.random.default_rng(3)
  noise = rng.standard_normal(SHAPE).astype(np.float32)
  ctx = rng.standard_normal((2, 5, 8)).astype(np.float32)
  uncond = rng.standard_normal((2, 5, 8)).astype(np.float32)
  mask = np.ones((2, 5), np.float32)
  key = jax.random.PRNGKey(7)

  run = jax.jit(lambda n, c, m, u, k: sampling.sample(
      _toy_denoiser(jnp), n, c, m, u, m, scheduler=ours, num_steps=num_steps,
      guidance_scale=scale, guidance_rescale=phi, rng=k))
  x = run(noise, ctx, mask, uncond, key)

  step_noise = [np.array(jax.random.normal(jax.random.fold_in(key, i), SHAPE))
                for i in range(num_steps)]
  noise_holder = []
  fake_randn = lambda shape, dtype=None, **unused: noise_holder[-1]
  monkeypatch.setattr(scheduling_ddpm, 'randn_tensor', fake_randn)
  monkeypatch.setattr(scheduling_euler_ancestral_discrete, 'randn_tensor', fake_randn)
  denoise = _toy_denoiser(torch)
  ref.set_timesteps(num_steps)
  latents = torch.from_numpy(noise) * ref.init_noise_sigma
  both_ctx = torch.from_numpy(np.concatenate([ctx, uncond]))
  both_mask = torch.from_numpy(np.concatenate([mask, mask]))
  for i, t in enumerate(ref.timesteps):
    model_in = ref.scale_model_input(torch.cat([latents] * 2), t)
    out = denoise(model_in, torch.full((4,), float(t)), both_ctx, both_mask)
    cond, uncond_out = out.chunk(2)
    out = uncond_out + scale * (cond - uncond_out)
    out = rescale_noise_cfg(out, cond, guidance_rescale=phi)
    noise_holder.append(torch.from_numpy(step_noise[i]))
    latents = ref.step(out, t, latents).prev_sample
  assert rel_err(x, latents.numpy()) <= TOL


ORACLE_SCHEDULERS = [pytest.param(name, {}, id=name) for name in DIFFUSERS] + [
    pytest.param('ddim', {'eta': 1.0}, id='ddim_eta1')]


@pytest.mark.parametrize('name,kwargs', ORACLE_SCHEDULERS)
@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
def test_sample_with_an_oracle_denoiser_lands_on_the_data_point(name, kwargs, prediction_type):
  """With one data point x* the ideal model output is known at every (x_t, t); every
  scheduler's last step must then return x* (the stochastic ones add no noise there)."""
  schedule = diffusion.NoiseSchedule('cosine')
  alphas = jnp.asarray(schedule.alphas_cumprod())
  x_star = jnp.asarray(np.random.default_rng(1).uniform(-0.9, 0.9, SHAPE), jnp.float32)

  def oracle(x_t, t, context, mask):
    a = alphas[t.astype(jnp.int32)]  # trailing spacing: integer timesteps throughout
    x0 = jnp.concatenate([x_star] * (x_t.shape[0] // SHAPE[0]))
    eps = (x_t - jnp.sqrt(a)[:, None, None, None] * x0) / jnp.sqrt(1 - a)[:, None, None, None]
    return diffusion.training_target(prediction_type, x0, eps, a)

  scheduler = schedulers.make(name, schedule=schedule, prediction_type=prediction_type,
                              spacing='trailing', **kwargs)
  noise = jnp.asarray(np.random.default_rng(2).normal(size=SHAPE), jnp.float32)
  ctx, mask = jnp.zeros((2, 3, 4)), jnp.ones((2, 3))
  run = jax.jit(lambda n, k: sampling.sample(
      oracle, n, ctx, mask, ctx, mask, scheduler=scheduler, num_steps=20, guidance_scale=3.0,
      rng=k))
  out = run(noise, jax.random.PRNGKey(0))
  np.testing.assert_allclose(out, x_star, atol=2e-3)


def test_stochastic_sampling_needs_and_follows_the_rng():
  scheduler = schedulers.EulerAncestral(spacing='trailing')
  denoise = lambda x, t, c, m: 0.1 * x
  noise, ctx, mask = jnp.ones(SHAPE), jnp.zeros((2, 3, 4)), jnp.ones((2, 3))
  run = lambda rng: sampling.sample(denoise, noise, ctx, mask, ctx, mask, scheduler=scheduler,
                                    num_steps=4, guidance_scale=1.0, rng=rng)
  with pytest.raises(ValueError, match='stochastic'):
    run(None)
  run = jax.jit(run)
  a, b, c = (run(jax.random.PRNGKey(k)) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match='Unknown scheduler'):
    schedulers.make('heun')
  with pytest.raises(ValueError, match='Unknown timestep spacing'):
    schedulers.Euler(spacing='karras')
  with pytest.raises(ValueError, match='num_steps'):
    schedulers.DPMSolverPP2M().timesteps(0)


def test_trailing_never_yields_a_negative_timestep():
  # np.arange(1000, 0, -1000 / 61) has 62 entries, the last rounding to timestep -1.
  for name in DIFFUSERS:
    ts = schedulers.make(name, spacing='trailing').timesteps(61)
    assert len(ts) == 61 and ts.min() >= 0
