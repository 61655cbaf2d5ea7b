"""Quantized tensors: a float value that travels with the scale, zero point and format that
put it on a quantization grid, and the torch-function rules that say when an operation's
result still lies on that grid.

``IntQuantTensor`` holds integer-grid values (``scale * (k - zero_point)``, ``k`` a
``bit_width``-bit integer), ``FloatQuantTensor`` scaled minifloat values. Shape ops, ``relu``,
max pooling and nearest interpolation keep the metadata; equal-scale ``add``, zero-point-free
``mul`` and ``cat`` of IntQuantTensors compute it; everything else returns plain tensors.
"""

from quantwire.quant_tensor.base import QuantTensor
from quantwire.quant_tensor.float_quant_tensor import FloatQuantTensor
from quantwire.quant_tensor.int_quant_tensor import IntQuantTensor

__all__ = ["FloatQuantTensor", "IntQuantTensor", "QuantTensor"]
