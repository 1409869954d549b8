"""Published model sizes, from the gin files, counted without allocating (jax.eval_shape)."""

import gin
import pytest

from charred.configs import gin_utils
from charred.models import pretrained
from charred.models.unet import UNetConfig
from charred.models.vae import AutoencoderKLConfig


def _from_gin(path, cls):
  gin.clear_config()
  try:
    gin_utils.parse([path])
    return gin.get_configurable(cls)()
  finally:
    gin.clear_config()


def test_sd21_unet_gin_has_865_910_724_parameters():
  config = _from_gin('models/unet_sd21.gin', UNetConfig)
  assert config.block_out_channels == (320, 640, 1280, 1280)
  assert config.heads_per_block == (5, 10, 20, 20)
  assert config.cross_attention_dim == 1024 and config.upcast_attention
  assert config.use_linear_projection and config.layers_per_block == 2
  assert pretrained.count_parameters('unet', config) == 865_910_724


def test_sd21_byt5_base_unet_gin_widens_only_cross_attention():
  config = _from_gin('models/unet_sd21_byt5_base.gin', UNetConfig)
  assert config.cross_attention_dim == 1536
  # attn2's to_k and to_v read 512 more text channels, in 16 transformer blocks whose
  # inner widths sum to 2 * (320 + 640 + 1280) + 1280 + 3 * (1280 + 640 + 320) = 12,480.
  assert pretrained.count_parameters('unet', config) == 865_910_724 + 2 * 512 * 12_480


def test_sd21_vae_gin_has_83_653_863_parameters():
  config = _from_gin('models/vae_sd21.gin', AutoencoderKLConfig)
  assert config == AutoencoderKLConfig()
  assert pretrained.count_parameters('autoencoder_kl', config) == 83_653_863


@pytest.mark.parametrize('width', [1472, 1536, 2560, 4672])  # ByT5 small .. xxl d_model
def test_cross_attention_reads_any_byt5_width(width):
  small = dict(block_out_channels=(32, 64), down_block_types=('CrossAttnDownBlock2D',
                                                               'DownBlock2D'),
               up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=(2, 4),
               norm_num_groups=8, sample_size=8)
  direct = pretrained.parameter_shapes('unet', UNetConfig(cross_attention_dim=width, **small))
  assert direct['down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel'] == (
      width, 32)
  projected = pretrained.parameter_shapes(
      'unet', UNetConfig(cross_attention_dim=64, encoder_hid_dim=width, **small))
  assert projected['encoder_hid_proj/kernel'] == (width, 64)
  assert projected['mid_block/attentions_0/transformer_blocks_0/attn2/to_v/kernel'] == (64, 64)
