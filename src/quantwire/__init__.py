"""quantwire: neural-network quantization for PyTorch.

Quantizers are declared as dependency-injection classes (:mod:`quantwire.inject`) whose
attributes wire into small TorchScript-compatible core modules (:mod:`quantwire.core`).
"""

__version__ = "0.1.0"
