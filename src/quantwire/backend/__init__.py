"""Integer inference and export.

- :func:`to_integer` (:mod:`~quantwire.backend.integer`): a calibrated fake-quantized model as a
  model of integer operators (:class:`~quantwire.backend.ops.IntMatMul`,
  :class:`~quantwire.backend.ops.MulShift`, :class:`~quantwire.backend.ops.MulQuant`) with
  fixed-point rescales (:mod:`~quantwire.backend.fixed_point`);
- :mod:`~quantwire.backend.nonlinear`: I-BERT integer softmax, GELU and LayerNorm;
- :func:`export_integer`: per-operator test vectors and a manifest, re-run by the pure-NumPy
  :mod:`~quantwire.backend.reference_runner`;
- :func:`export_onnx`: the fake-quantized model as an ONNX QCDQ graph, checked in onnxruntime;
- :func:`to_native_int8` (:mod:`~quantwire.backend.native`): the integer model on PyTorch's int8
  CPU kernels, checked against it by :func:`compare_native`.
"""

from quantwire.backend.export import export_integer
from quantwire.backend.fixed_point import BackendError
from quantwire.backend.integer import IntegerConfig, register_integer_handler, to_integer
from quantwire.backend.native import compare_native, to_native_int8
from quantwire.backend.onnx_export import export_onnx, onnx_export_mode
from quantwire.backend.ops import AccumulatorOverflowError, IntMatMul, MulQuant, MulShift, Quantize
from quantwire.errors import ExportError

__all__ = [
    "AccumulatorOverflowError",
    "BackendError",
    "ExportError",
    "IntMatMul",
    "IntegerConfig",
    "MulQuant",
    "MulShift",
    "Quantize",
    "compare_native",
    "export_integer",
    "export_onnx",
    "onnx_export_mode",
    "register_integer_handler",
    "to_integer",
    "to_native_int8",
]
