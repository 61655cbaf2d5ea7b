"""quantwire: neural-network quantization for PyTorch.

Quantizers are declared as dependency-injection classes (:mod:`quantwire.inject`) whose
attributes wire into small TorchScript-compatible core modules (:mod:`quantwire.core`); quant
layers (:mod:`quantwire.nn`) take them as keyword arguments; :mod:`quantwire.algorithms`
calibrates and optimises them.
"""

__version__ = "0.1.0"

from quantwire.algorithms import calibrate, calibration_mode, checking_finite, prune, sparsity  # noqa: E402
from quantwire.backend.export import export_integer  # noqa: E402
from quantwire.backend.integer import IntegerConfig, to_integer  # noqa: E402
from quantwire.convert import (  # noqa: E402
    Override,
    QuantConfig,
    TensorQuant,
    load_quantized,
    quantize_model,
    save_quantized,
)

__all__ = [
    "IntegerConfig",
    "Override",
    "QuantConfig",
    "TensorQuant",
    "__version__",
    "calibrate",
    "calibration_mode",
    "checking_finite",
    "export_integer",
    "load_quantized",
    "prune",
    "quantize_model",
    "save_quantized",
    "sparsity",
    "to_integer",
]
