"""AutoencoderKL against diffusers 0.39's FlaxAutoencoderKL (float32, CPU)."""

import dataclasses
import json
import os

from flax import serialization
import flax.linen as nn
from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp
import numpy as np

from charred.models.vae import AutoencoderKL, AutoencoderKLConfig

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'diffusers_flax')


def _diffusers_flax_vae():
  with open(os.path.join(FIXTURES, 'vae', 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(FIXTURES, 'vae', 'diffusion_flax_model.msgpack'), 'rb') as f:
    params = serialization.msgpack_restore(f.read())
  fields = {f.name for f in dataclasses.fields(AutoencoderKLConfig)}
  c = AutoencoderKLConfig(**{k: v for k, v in config.items() if k in fields})
  assert c.block_out_channels == [32, 64] and c.layers_per_block == 1  # the fixture's shape
  return AutoencoderKL(c), params, np.load(os.path.join(FIXTURES, 'vae_reference.npz'))


def _rel_err(ours, theirs):
  return np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()


def test_vae_parameter_tree_is_diffusers_flax_tree():
  model, params, _ = _diffusers_flax_vae()
  ours = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                      jnp.zeros((1, 16, 16, 3)))['params'])
  theirs = {k: v.shape for k, v in flatten_dict(params).items()}
  assert {k: v.shape for k, v in flatten_dict(ours).items()} == theirs


def test_vae_matches_diffusers_flax_reference_outputs():
  model, params, ref = _diffusers_flax_vae()
  images = np.transpose(ref['image'], (0, 2, 3, 1))  # NCHW -> NHWC
  mean, logvar = model.apply({'params': params}, images, method=AutoencoderKL.encode)
  assert mean.shape == logvar.shape == ref['latent_mean'].shape == (2, 8, 8, 4)
  assert _rel_err(mean, ref['latent_mean']) <= 1e-5
  decoded = model.apply({'params': params}, ref['latent_mean'], method=AutoencoderKL.decode)
  assert _rel_err(np.transpose(decoded, (0, 3, 1, 2)), ref['decoded']) <= 1e-5
  # Without an rng the forward pass decodes the posterior mean.
  recon = model.apply({'params': params}, images)
  assert _rel_err(np.transpose(recon, (0, 3, 1, 2)), ref['decoded']) <= 1e-5


def test_vae_sd21_default_config_has_83_653_863_parameters():
  model = AutoencoderKL(AutoencoderKLConfig())
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == 83_653_863
