"""int8 post-training quantisation of the networks, with qwix (Google's JAX quantisation
library, `pip install charred[int8]`).

Two modes (`MODES`):
- 'weight_only': every matmul and convolution kernel stored as int8 with one float32
  absmax scale per output channel, dequantised where it is used; activations stay float.
  Weights ~4x smaller; the arithmetic is float.
- 'dynamic': the same int8 kernels, and each matmul's and convolution's input quantised
  to int8 (absmax, per call), so they run int8 x int8 with int32 accumulation.

Embeddings, norms, biases and the T5 relative position table stay float: qwix quantises
the operands of dot_general, einsum and conv_general_dilated only. A quantised module is a
subclass of the original whose methods intercept those ops (`qwix.quantize_model`); call
its methods by name (`module.apply(..., method='denoise')`), since the base class's
functions are not intercepted.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from charred.models.image_codec import LatentCodec
from charred.models.model_kinds import MODEL_KINDS

MODES = ('weight_only', 'dynamic')

# The methods sampling and evaluation call, per module class name; other modules: __call__.
_METHODS = {
    'TextToImage': ('__call__', 'encode_text', 'denoise'),
    'AutoencoderKL': ('__call__', 'encode', 'decode'),
}


def _qwix():
  try:
    import qwix  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('int8 quantisation needs qwix: pip install charred[int8].') from e
  return qwix


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f'Unknown quantisation mode {mode!r}; expected one of {MODES}.')
  return mode


def provider(mode: str):
  """The qwix PTQ provider of `mode`: every module's kernels int8 (absmax per channel)."""
  qwix = _qwix()
  act = 'int8' if check_mode(mode) == 'dynamic' else None
  rules = [qwix.QuantizationRule(module_path='.*', weight_qtype='int8', act_qtype=act)]
  return (_weight_only_provider_class() if act is None else qwix.PtqProvider)(rules)


def _weight_only_provider_class():
  """qwix's PtqProvider with int8 convolution kernels also where activations stay float.

  qwix 0.1 quantises a convolution's kernel only together with its input (its PTQ conv
  requires act_qtype == weight_qtype); matmuls it quantises weight-only already. This
  quantises the kernel with qwix's own calibration and lets qwix's conv dequantise it.
  """
  qwix = _qwix()
  # pylint: disable=g-import-not-at-top
  from qwix._src.core import conv_general
  from qwix._src.providers import ptq
  from qwix._src.utils import flax_util
  # pylint: enable=g-import-not-at-top

  class WeightOnlyPtqProvider(qwix.PtqProvider):

    def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                             batch_group_count=1, precision=None, preferred_element_type=None,
                             out_sharding=None):
      rule, _ = self._get_current_rule_and_op_id('conv_general_dilated')
      kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                    feature_group_count=feature_group_count,
                    batch_group_count=batch_group_count)
      if rule is None or rule.weight_qtype is None:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, dimension_numbers=dimension_numbers,
            precision=precision, preferred_element_type=preferred_element_type,
            out_sharding=out_sharding, **kwargs)
      numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      if isinstance(rhs, ptq.WithAux):
        rhs = rhs.array
      else:  # initialisation: the float kernel becomes the int8 parameter
        how = conv_general.get_how_to_quantize(
            dimension_numbers=numbers, for_lhs=False, qtype=rule.weight_qtype,
            calibration_method=rule.weight_calibration_method)
        rhs = ptq.create_quantized_param(flax_util.find_param(rhs), rhs, how).array
      # A jax.Array: qwix dequantises the kernel for float inputs it recognises as such.
      return qwix.conv_general_dilated(jnp.asarray(lhs), rhs, window_strides, padding,
                                       dimension_numbers=numbers, **kwargs)

  return WeightOnlyPtqProvider


def quantize_module(module: nn.Module, mode: str) -> nn.Module:
  """`module` whose kernels are read as int8 (params from `quantize_params`)."""
  methods = _METHODS.get(type(module).__name__, ('__call__',))
  return _qwix().quantize_model(module, provider(mode), methods=methods)


def abstract_params(qmodule: nn.Module, *example_inputs):
  """The quantised parameter tree's structure (shapes, dtypes, how each kernel is
  quantised), traced from `qmodule.init` on `example_inputs` without computing it."""
  return jax.eval_shape(qmodule.init, jax.random.PRNGKey(0), *example_inputs)['params']


def quantize_params(qmodule: nn.Module, params, *example_inputs):
  """Float `params` of the original module -> the int8 params `qmodule` reads."""
  floats = jax.tree.map(jnp.asarray, nn.meta.unbox(params))
  return _qwix().quantize_params(floats, abstract_params(qmodule, *example_inputs))


def quantize_codec(codec, mode: str):
  """A latent model's VAE with int8 kernels; pixels stay pixels."""
  if not isinstance(codec, LatentCodec):
    return codec
  quantized = copy.copy(codec)
  quantized.module = quantize_module(codec.module, mode)
  quantized.params = quantize_params(quantized.module, codec.params,
                                     *MODEL_KINDS['autoencoder_kl'].example_inputs(codec.config))
  return quantized


def _is_quantized(leaf) -> bool:
  return hasattr(leaf, 'array') and hasattr(leaf.array, 'qvalue')


def is_quantized(params) -> bool:
  """Whether `params` holds any int8 kernel."""
  return any(_is_quantized(v) for v in jax.tree.leaves(params, is_leaf=_is_quantized))


def dequantize_params(params):
  """Float params from quantised ones (each int8 kernel times its scale)."""
  qwix = _qwix()
  return jax.tree.map(lambda v: qwix.dequantize(v.array) if _is_quantized(v) else v, params,
                      is_leaf=_is_quantized)


def to_arrays(params) -> dict[str, Any]:
  """Quantised params as nested dicts of arrays, for a checkpoint: each int8 kernel a
  {'qvalue': int8, 'scale': float32} dict (as qwix's pre-quantised format)."""
  def arrays(v):
    if not _is_quantized(v):
      return v
    q = v.array
    return {'qvalue': q.qvalue, 'scale': q.scale,
            **({} if q.zero_point is None else {'zero_point': q.zero_point})}
  return jax.tree.map(arrays, params, is_leaf=_is_quantized)


def from_arrays(arrays, template):
  """`to_arrays`' dicts back into the quantised params `template` describes (e.g.
  `abstract_params`); ValueError naming the first parameter it lacks."""
  flat = flatten_dict(arrays, is_leaf=lambda _, v: isinstance(v, dict) and 'qvalue' in v)
  out = {}
  for path, slot in flatten_dict(template, is_leaf=lambda _, v: _is_quantized(v)).items():
    if path not in flat:
      raise ValueError(f'Quantised parameter {"/".join(path)} is missing.')
    value = flat[path]
    if _is_quantized(slot):
      fields = {k: jnp.asarray(value[k]) for k in ('qvalue', 'scale', 'zero_point')
                if k in value}
      value = slot.replace(array=slot.array.replace(**fields))
    out[path] = jnp.asarray(value) if isinstance(value, np.ndarray) else value
  return unflatten_dict(out)


def nbytes(params) -> int:
  """Bytes of every array in `params` (int8 kernels and their scales included)."""
  return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape))
                 for a in jax.tree.leaves(params)))
