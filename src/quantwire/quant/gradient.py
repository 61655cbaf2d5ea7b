"""Quantizers whose gradients are quantized too: forward and backward formats chosen separately,
as INT-FP-QSim does (e.g. E3M4 forward, E5M2 backward)."""

from quantwire.quant.base import (
    ActQuantSolver,
    DynamicPerTensorScaling,
    FloatQuantSolver,
    Fp8e4m3Mixin,
    Fp8e5m2Mixin,
    RuntimeStatsScaling,
)

__all__ = [
    "Fp8e3m4ActFp8e5m2Grad",
    "Fp8e4m3ActFp8e5m2Grad",
    "Fp8e4m3GradPerTensorFloat",
    "Fp8e5m2GradPerTensorFloat",
]


class Fp8e5m2GradPerTensorFloat(Fp8e5m2Mixin, FloatQuantSolver, DynamicPerTensorScaling):
    """A gradient format: FP8 E5M2 with a dynamic per-tensor scale (abs-max maps to 57344)."""


class Fp8e4m3GradPerTensorFloat(Fp8e4m3Mixin, FloatQuantSolver, DynamicPerTensorScaling):
    """A gradient format: FP8 E4M3 with a dynamic per-tensor scale (abs-max maps to 448)."""


class Fp8e4m3ActFp8e5m2Grad(Fp8e4m3Mixin, FloatQuantSolver, RuntimeStatsScaling, ActQuantSolver):
    """FP8 E4M3 activations whose gradients are quantized to FP8 E5M2."""

    grad_quant = Fp8e5m2GradPerTensorFloat


class Fp8e3m4ActFp8e5m2Grad(Fp8e4m3ActFp8e5m2Grad):
    """E3M4 activations (3 exponent bits, bias 3, IEEE-style specials) with E5M2 gradients."""

    exponent_bit_width = 3
    mantissa_bit_width = 4
    exponent_bias = 3
    has_inf = True
    has_nan = True
