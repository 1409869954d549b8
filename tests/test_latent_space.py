"""The latent-space switch: a frozen VAE (diffusers' Flax format) in front of the U-Net."""

import os
import shutil

import numpy as np
import pytest

from charred import tokenizer
from charred.models import diffusion
from charred.models.diffusion_model import DiffusionModel
from charred.models.generation import ImageGenerator
from charred.models.pretrained import load_autoencoder, make_codec
from charred.models.t5_encoder import T5EncoderConfig
from charred.models.text_to_image import TextToImage, TextToImageConfig
from charred.models.unet import UNetConfig
from charred.trainers import trainer
from conftest import repeated_batches

VAE_DIR = os.path.join(os.path.dirname(__file__), 'fixtures', 'diffusers_flax', 'vae')


def latent_model():
  return TextToImageConfig(
      text_encoder=T5EncoderConfig(d_model=32, num_heads=2, head_dim=16, num_layers=1, d_ff=64),
      unet=UNetConfig(in_channels=4, out_channels=4, block_out_channels=(16, 32),
                      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1,
                      attention_head_dim=(1, 2), cross_attention_dim=32, norm_num_groups=8,
                      upcast_attention=False),
      noise_schedule=diffusion.NoiseSchedule('scaled_linear'), prediction_type='epsilon',
      text_length=16, image_size=(16, 16), pixel_space=False)


def test_latent_model_trains_and_samples_full_size_images(tmp_path):
  config = latent_model()
  rng = np.random.default_rng(0)
  tokens, mask = tokenizer.encode_batch(['a', 'bc'], 16)
  batch = {'image': rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
           'text_tokens': tokens, 'text_mask': mask}
  model = DiffusionModel(config, codec=make_codec(False, VAE_DIR))
  state = trainer.train(str(tmp_path), model, trainer.TrainConfig(train_steps=2, batch_size=2),
                        repeated_batches(lambda: batch), log=lambda s: None)
  # The U-Net saw 8x8x4 latents (the fixture VAE downsamples by 2) ...
  assert state.params['unet']['conv_in']['kernel'].shape[2] == 4
  assert 'encoder' not in state.params  # ... and the VAE is not part of what trains.
  images = model.generator(state.ema_params, num_steps=2)(['a'])
  assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
  with pytest.raises(ValueError, match='needs codec='):  # never a silent pixel codec
    ImageGenerator(TextToImage(config), state.ema_params)
  with pytest.raises(ValueError, match='needs codec='):
    DiffusionModel(config)


def test_codec_encodes_the_scaled_posterior_mean():
  codec = make_codec(False, VAE_DIR)
  ref = np.load(os.path.join(os.path.dirname(VAE_DIR), 'vae_reference.npz'))
  image = np.transpose(ref['image'], (0, 2, 3, 1))
  latents = np.asarray(codec.encode(image))
  expected = ref['latent_mean'] * codec.config.scaling_factor
  assert np.abs(latents - expected).max() / np.abs(expected).max() <= 1e-5


def test_pixel_space_false_without_a_vae_is_a_clear_error():
  with pytest.raises(ValueError, match='InitConfig.autoencoder'):
    make_codec(False, None)


def test_truncated_vae_weights_are_a_clear_error(tmp_path):
  broken = tmp_path / 'vae'
  shutil.copytree(VAE_DIR, broken)
  weights = broken / 'diffusion_flax_model.msgpack'
  weights.write_bytes(weights.read_bytes()[:1000])
  with pytest.raises(ValueError, match='diffusion_flax_model.msgpack'):
    load_autoencoder(str(broken))


def test_mismatched_vae_config_names_the_parameter(tmp_path):
  broken = tmp_path / 'vae'
  shutil.copytree(VAE_DIR, broken)
  config = (broken / 'config.json').read_text().replace('"latent_channels": 4',
                                                       '"latent_channels": 8')
  (broken / 'config.json').write_text(config)
  with pytest.raises(ValueError, match=r'kernel has shape .*the config needs'):
    load_autoencoder(str(broken))
