"""The text-rendering ablation on the default's grid signs: each switch alone, same seed.

  python -m charred.sweep --sweep_file=gin/sweeps/text_rendering_ablation.py \
      --workdir=runs/text_rendering_ablation [--parallel=2]

Every trial is `typography_tiny` at half its budget (2,000 steps of 16, seed 0) with one
change, scored by `charred.evaluate` on the 300 held-out words (50 DDIM steps, at the
run's own guidance: 1.0 since the default sets it). The reference row, the default itself at 2,000 steps, is the first trial. About 15
minutes a trial on a 2-core CPU, two at a time. docs/text_rendering.md holds the table.
"""

NAME = 'text_rendering_ablation'
GIN_FILES = ['experiments/typography_tiny.gin']

_STEPS = {'TRAIN_STEPS': 2000}
# The default's switches, each off alone, then all off.
_NO_ATTENTION_LOSS = {'diffusion_model.ObjectiveConfig.attention_loss_weight': 0.0}
_NO_POSITIONS = {'text_to_image.TextToImageConfig.quote_positions': False,
                 'unet.UNetConfig.text_positions': None,
                 'unet.UNetConfig.query_positions': None}
_ALL_OFF = {**_NO_ATTENTION_LOSS, **_NO_POSITIONS}
# Training signal that costs little, each added alone.
_BLANK = {'diffusion_model.ObjectiveConfig.attention_loss_blank': True}  # empty cells -> closing quote
_CURRICULUM = {'experiment.DataConfig.length_curriculum': 16000}  # 3 -> 8 letters in 1k steps
_RANDOM_HALF = {'experiment.DataConfig.train_random_fraction': 0.5}  # default 0.2
_GLYPH_WEIGHT = {'diffusion_model.ObjectiveConfig.glyph_loss_weight': 1.0}
_LOGIT_NORMAL = {'diffusion_model.ObjectiveConfig.timestep_sampling': 'logit_normal'}
# The previous default's data (18 px glyphs, 11 px advance, 3-5 px margin, 1 px jitter).
_OFF_GRID = {'experiment.DataConfig.builder_config': 'tiny_bw',
             'unet.UNetConfig.position_span': 12}


def get_sweep():
  changes = [{}, _BLANK, _ALL_OFF, _NO_ATTENTION_LOSS, _NO_POSITIONS, _CURRICULUM,
             _RANDOM_HALF, _GLYPH_WEIGHT, _LOGIT_NORMAL, _OFF_GRID]
  return [{**_STEPS, **c} for c in changes]
