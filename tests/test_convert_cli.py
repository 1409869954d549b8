"""`python -m charred.models.convert`: output equals a direct load; bad input is one line."""

import os

from flax.traverse_util import flatten_dict
import numpy as np

from charred.models import pretrained
from conftest import run_cli

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
T5X_LEGACY = os.path.join(FIXTURES, 't5x', 'test_t5_tiny.checkpoint_0')


def _flat(params):
  return {k: np.asarray(v) for k, v in flatten_dict(params, sep='/').items()}


def test_t5x_checkpoint_converts_to_what_load_pretrained_reads(tmp_path):
  out = str(tmp_path / 'byt5')
  proc = run_cli('models.convert', T5X_LEGACY, out)
  assert 't5_encoder: 258,728 parameters' in proc.stdout  # the decoder is not converted
  assert proc.stderr == ''
  direct_module, direct = pretrained.load_pretrained(T5X_LEGACY)
  module, converted = pretrained.load_pretrained(out)
  assert module.config == direct_module.config
  direct, converted = _flat(direct), _flat(converted)
  assert set(direct) == set(converted)
  for name in direct:
    np.testing.assert_array_equal(converted[name], direct[name], err_msg=name)
  # An existing output is never overwritten without asking.
  proc = run_cli('models.convert', T5X_LEGACY, out, check=False)
  assert proc.returncode == 2 and 'exists' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_sources_are_one_line_errors_and_write_nothing(tmp_path):
  truncated = tmp_path / 'truncated_checkpoint'
  truncated.write_bytes(open(T5X_LEGACY, 'rb').read()[:100_000])
  for src, message in ((str(tmp_path / 'missing'), 'does not exist'),
                       (str(truncated), 'truncated')):
    out = tmp_path / 'out'
    proc = run_cli('models.convert', src, str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == ['truncated_checkpoint']
