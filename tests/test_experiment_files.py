"""Every packaged experiment file parses into a valid Experiment whose model fits its data."""
import os

import gin
import pytest

from charred.configs import gin_utils
from charred.datasets import signs

EXPERIMENTS = sorted(f for f in os.listdir(os.path.join(gin_utils.GIN_DIR, 'experiments'))
                     if f.endswith('.gin'))


# Overlays go after an experiment; latent_tiny needs its VAE's folder (not read here).
PRECEDED_BY = {'micro.gin': ['experiments/latent_tiny.gin']}
BINDINGS = {'latent_tiny.gin': ["AUTOENCODER = '/vae'"], 'micro.gin': ["AUTOENCODER = '/vae'"]}


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_experiment_file_builds(name):
  from charred import main  # pylint: disable=g-import-not-at-top
  experiment = main.load_experiment(PRECEDED_BY.get(name, []) + [f'experiments/{name}'],
                                    BINDINGS.get(name, []))
  data, model = experiment.data, experiment.model
  if data.source == 'render':  # the sign's size is the model's
    render = signs.get_config(data.builder_config).render
    assert tuple(model.image_size) == (render.height, render.width), name


def test_an_image_size_the_data_does_not_draw_is_caught():
  from charred import main  # pylint: disable=g-import-not-at-top
  experiment = main.load_experiment(
      ['experiments/ladder_r1_box.gin'],
      ["experiment.DataConfig.builder_config = 'r4'"])
  render = signs.get_config(experiment.data.builder_config).render
  assert tuple(experiment.model.image_size) != (render.height, render.width)
