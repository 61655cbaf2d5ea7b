"""Integer quantizers with floating-point scales (the everyday 8- and 4-bit quantizers)."""

from quantwire.quant.base import (
    ActQuantSolver,
    BiasQuantSolver,
    IntQuantSolver,
    MinMaxInitScaling,
    MSEStats,
    RuntimeStatsScaling,
    StatsFromWeightScaling,
    WeightQuantSolver,
)

__all__ = [
    "Int4WeightPerChannelFloat",
    "Int8ActPerTensorFloat",
    "Int8ActPerTensorFloatMSE",
    "Int8ActPerTensorFloatMinMaxInit",
    "Int8Bias",
    "Int8WeightPerChannelFloat",
    "Int8WeightPerTensorFloat",
    "Int8WeightPerTensorFloatMSE",
    "Int16Bias",
    "Int32Bias",
    "Uint8ActPerTensorFloat",
]


class Int8WeightPerTensorFloat(IntQuantSolver, StatsFromWeightScaling, WeightQuantSolver):
    """8-bit signed narrow-range weights, one scale from the abs-max of the whole weight."""

    bit_width = 8


class Int8WeightPerChannelFloat(Int8WeightPerTensorFloat):
    """8-bit signed narrow-range weights, one abs-max scale per output channel."""

    scaling_per_output_channel = True


class Int4WeightPerChannelFloat(Int8WeightPerChannelFloat):
    """4-bit signed narrow-range weights, one abs-max scale per output channel."""

    bit_width = 4


class Int8WeightPerTensorFloatMSE(MSEStats, Int8WeightPerTensorFloat):
    """8-bit weights whose clipping threshold minimises the quantization MSE."""


class Int8ActPerTensorFloat(IntQuantSolver, RuntimeStatsScaling, ActQuantSolver):
    """8-bit signed activations; the scale starts from the 99.999th percentile of |x| over the
    first training steps (or calibration) and is learned afterwards."""

    bit_width = 8
    signed = True


class Uint8ActPerTensorFloat(Int8ActPerTensorFloat):
    """8-bit unsigned activations (after ReLU, sigmoid)."""

    signed = False


class Int8ActPerTensorFloatMSE(MSEStats, Int8ActPerTensorFloat):
    """8-bit signed activations whose collected threshold minimises the quantization MSE."""


class Int8ActPerTensorFloatMinMaxInit(IntQuantSolver, MinMaxInitScaling, ActQuantSolver):
    """8-bit signed activations with a learned scale initialised from ``min_val``/``max_val``
    (what ``QuantHardTanh`` passes)."""

    bit_width = 8
    signed = True


class Int8Bias(BiasQuantSolver, IntQuantSolver):
    """8-bit bias with scale input scale x weight scale."""

    bit_width = 8


class Int16Bias(Int8Bias):
    """16-bit bias with scale input scale x weight scale."""

    bit_width = 16


class Int32Bias(Int8Bias):
    """32-bit bias with scale input scale x weight scale (what integer accelerators add)."""

    bit_width = 32
