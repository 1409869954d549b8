"""The text-rendering ablation: each change alone, then together, same budget and seed.

  python -m charred.sweep --sweep_file=sweeps/text_rendering_ablation.py \
      --workdir=runs/text_rendering_ablation [--parallel=2]

Every trial is `typography_tiny` (3,000 steps of 16, seed 0) with one set of switches, and
is scored by `charred.evaluate` on the 300 held-out words. About 20 minutes a trial on a
2-core CPU. docs/text_rendering.md holds the ablation measured so far (run by hand,
two at a time, before this file could run them).
"""

NAME = 'text_rendering_ablation'
GIN_FILES = ['experiments/typography_tiny.gin']

# Every switch the default turns on, off: the row to compare against.
_OFF = {
    'unet.UNetConfig.text_positions': None,
    'unet.UNetConfig.query_positions': None,
    'unet.UNetConfig.cross_attention_rope': False,
    'trainer.TrainConfig.attention_loss_weight': 0.0,
}
_TEXT_SIN = {'unet.UNetConfig.text_positions': 'sinusoidal'}
# Image columns in text-position units: the 128 px sign holds ~12 glyphs of the 18 px
# monospace font, so one unit of the image coordinate is one character cell.
_QUERY_SIN = {'unet.UNetConfig.query_positions': 'sinusoidal', 'unet.UNetConfig.position_span': 12}
_ROPE = {'unet.UNetConfig.cross_attention_rope': True, 'unet.UNetConfig.position_span': 12}
_ATTN = {'trainer.TrainConfig.attention_loss_weight': 0.1}


def get_sweep():
  trials = [
      {},  # baseline: no positions, no attention loss
      _TEXT_SIN,
      {**_TEXT_SIN, **_QUERY_SIN},
      _ROPE,
      _ATTN,
      {**_TEXT_SIN, **_QUERY_SIN, **_ATTN},
      {**_ROPE, **_ATTN},
  ]
  return [{**_OFF, **t} for t in trials]
