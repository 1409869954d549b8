"""An InitConfig starts the text encoder and U-Net from converted checkpoints."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from charred.models import model_kinds, pretrained
from charred.models.diffusion_model import DiffusionModel
from charred.models.image_codec import PixelCodec
from charred.models.text_to_image import TextToImage, TextToImageConfig, init_params
from charred.trainers import trainer
from test_trainer import micro_model


def _write_random(tmp_path, kind, config, seed):
  rng = np.random.default_rng(seed)
  tensors = {k: rng.normal(size=s).astype(np.float32)
             for k, s in pretrained.parameter_shapes(kind, config).items()}
  out = str(tmp_path / kind)
  pretrained.save_pretrained(out, kind, config, tensors.items())
  return out, tensors


def test_init_params_loads_the_named_checkpoints(tmp_path):
  config = micro_model()
  t5_path, t5 = _write_random(tmp_path, 't5_encoder', config.text_encoder, 1)
  unet_path, unet = _write_random(tmp_path, 'unet', config.unet, 2)
  init = pretrained.InitConfig(text_encoder=t5_path, unet=unet_path)
  model = DiffusionModel(config)
  train_config = trainer.TrainConfig(train_steps=10, batch_size=2)
  state = trainer.create_state(model, train_config, trainer.make_tx(train_config), init)
  for part, expected in (('text_encoder', t5), ('unet', unet)):
    got = flatten_dict(state.params[part], sep='/')
    assert set(got) == set(expected)
    for name, value in expected.items():
      np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
      np.testing.assert_array_equal(np.asarray(flatten_dict(state.ema_params[part],
                                                            sep='/')[name]), value)


def test_a_checkpoint_of_another_shape_names_the_parameter(tmp_path):
  config = micro_model()
  wider = dataclasses.replace(config.text_encoder, d_ff=48)
  path, _ = _write_random(tmp_path, 't5_encoder', wider, 1)
  model = TextToImage(config)
  with pytest.raises(ValueError, match=r'text_encoder parameter encoder/layers_0/mlp/wi_0/kernel '
                     r'has shape \(32, 48\), the model config needs \(32, 64\)'):
    pretrained.load_checkpoints(pretrained.InitConfig(text_encoder=path),
                                init_params(model, jax.random.PRNGKey(0), PixelCodec()))


def test_a_text_to_image_config_round_trips_through_json():
  config = dataclasses.replace(micro_model(), tokenizer='bytes')
  raw = json.loads(json.dumps(model_kinds.config_to_dict(config)))
  assert raw['unet']['block_out_channels'] == list(config.unet.block_out_channels)
  assert model_kinds.config_from_dict(TextToImageConfig, raw) == config
  # Files written when model configs still held weight paths read as the same model.
  legacy = dict(raw, text_encoder_checkpoint='/x', unet_checkpoint=None, autoencoder_path=None)
  assert model_kinds.config_from_dict(TextToImageConfig, pretrained._current(legacy)) == config


def test_a_run_records_what_it_started_from(tmp_path):
  init = pretrained.InitConfig(autoencoder='/vae', unet='/unet')
  pretrained.write_run_model(str(tmp_path), micro_model(), init)
  with open(tmp_path / pretrained.RUN_MODEL_FILE) as f:
    assert json.load(f)['init'] == {'text_encoder': None, 'unet': '/unet',
                                    'autoencoder': '/vae'}
