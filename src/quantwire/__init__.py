"""quantwire: neural-network quantization for PyTorch.

Quantizers are declared as dependency-injection classes (:mod:`quantwire.inject`) whose
attributes wire into small TorchScript-compatible core modules (:mod:`quantwire.core`); quant
layers (:mod:`quantwire.nn`) take them as keyword arguments; :mod:`quantwire.algorithms`
calibrates and optimises them.
"""

__version__ = "0.1.0"

from quantwire.algorithms import calibrate, calibration_mode, prune, sparsity  # noqa: E402

__all__ = ["__version__", "calibrate", "calibration_mode", "prune", "sparsity"]
