"""Minifloat (FP8) quantizers with floating-point scales."""

from quantwire.quant.base import (
    ActQuantSolver,
    FloatQuantSolver,
    Fp8e4m3Mixin,
    Fp8e5m2Mixin,
    RuntimeStatsScaling,
    StatsFromWeightScaling,
    WeightQuantSolver,
)

__all__ = [
    "Fp8e4m3ActPerTensorFloat",
    "Fp8e4m3WeightPerChannelFloat",
    "Fp8e4m3WeightPerTensorFloat",
    "Fp8e5m2ActPerTensorFloat",
    "Fp8e5m2WeightPerChannelFloat",
    "Fp8e5m2WeightPerTensorFloat",
]


class Fp8e4m3WeightPerTensorFloat(Fp8e4m3Mixin, FloatQuantSolver, StatsFromWeightScaling, WeightQuantSolver):
    """FP8 E4M3 weights; the abs-max maps to 448."""


class Fp8e4m3WeightPerChannelFloat(Fp8e4m3WeightPerTensorFloat):
    """FP8 E4M3 weights, one scale per output channel."""

    scaling_per_output_channel = True


class Fp8e5m2WeightPerTensorFloat(Fp8e5m2Mixin, FloatQuantSolver, StatsFromWeightScaling, WeightQuantSolver):
    """FP8 E5M2 weights; the abs-max maps to 57344."""


class Fp8e5m2WeightPerChannelFloat(Fp8e5m2WeightPerTensorFloat):
    """FP8 E5M2 weights, one scale per output channel."""

    scaling_per_output_channel = True


class Fp8e4m3ActPerTensorFloat(Fp8e4m3Mixin, FloatQuantSolver, RuntimeStatsScaling, ActQuantSolver):
    """FP8 E4M3 activations, scale collected then learned."""


class Fp8e5m2ActPerTensorFloat(Fp8e5m2Mixin, FloatQuantSolver, RuntimeStatsScaling, ActQuantSolver):
    """FP8 E5M2 activations, scale collected then learned."""
