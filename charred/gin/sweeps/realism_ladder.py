"""The realism ladder (issue 23): alignments measured rung by rung, one change per trial.

  python -m charred.sweep --sweep_file=gin/sweeps/realism_ladder.py \
      --workdir=runs/realism_ladder [--parallel=2]

Every trial is `typography_tiny`'s model and recipe (4,000 steps of 16, seed 0) on one
rung's data (`experiment.DataConfig.builder_config`: 'tiny_grid' is R0, 'r1' free
placement, ...), scored by `charred.evaluate` on the rung's 300 held-out validation words
(50 DDIM steps, guidance 1). docs/text_rendering.md holds the table, with the trials cut
short at 2,000 steps marked. About 25 minutes a trial on a 2-core CPU, two at a time.
"""

NAME = 'realism_ladder'
GIN_FILES = ['experiments/typography_tiny.gin']

# Text positions by byte index from the caption's start (typography_tiny.gin counts them
# from the opening quote).
_BYTE_POSITIONS = {'text_to_image.TextToImageConfig.quote_positions': False,
                   'unet.UNetConfig.text_positions': 'sinusoidal'}
_R1 = {'experiment.DataConfig.builder_config': 'r1'}
# R1 and R2 with boxes over the text's ink instead of the font's line.
_R1_INK = {'experiment.DataConfig.builder_config': 'r1_ink'}
_R2_INK = {'experiment.DataConfig.builder_config': 'r2_ink'}
_R1_SIZES = {'experiment.DataConfig.builder_config': 'r1_sizes'}  # R2's sizes, R1's faces
_R2 = {'experiment.DataConfig.builder_config': 'r2'}
_R3 = {'experiment.DataConfig.builder_config': 'r3'}
# R4's texts need the larger sign and the longer caption budget (ladder_r4.gin).
_R4 = {'experiment.DataConfig.builder_config': 'r4',
       'text_to_image.TextToImageConfig.image_size': (64, 256),
       'text_to_image.TextToImageConfig.text_length': 96}
_BOX = {'text_to_image.TextToImageConfig.box_conditioning': True}
_ANCHOR = {**_BOX, 'text_to_image.TextToImageConfig.anchor_patches': True}
_NO_QUERY_POSITIONS = {'unet.UNetConfig.query_positions': None}
_LAYOUT_FEATURES = {'unet.UNetConfig.layout_features': True}


def get_sweep():
  return [
      _BYTE_POSITIONS,  # R0, the previous default
      {},  # R0, quote positions (the default)
      _R1_INK,  # R1 layout-free
      {**_R1_INK, **_NO_QUERY_POSITIONS},  # R1 layout-free, no image-column positions
      {**_R1_INK, **_BOX},  # R1, the box-conditioned arm
      {**_R1_INK, **_ANCHOR},  # R1, box-conditioned, patches anchored at the box
      {**_R1, **_ANCHOR},  # R1, + boxes over the font's line (ladder_r1_box.gin)
      {**_R2_INK, **_ANCHOR},  # R2 fonts and sizes, ink boxes
      {**_R1_SIZES, **_ANCHOR},  # R1's faces at R2's sizes
      {**_R1_SIZES, **_ANCHOR, **_LAYOUT_FEATURES},  # + the box frame into the U-Net
      {**_R2, **_ANCHOR},  # R2 fonts and sizes, box-conditioned and anchored
      {**_R3, **_ANCHOR},  # R3 colours and backgrounds, box-conditioned and anchored
      {**_R4, **_ANCHOR},  # R4 templates and phrases, box-conditioned and anchored
  ]
