"""Fixed-point quantizers: integers whose scales are powers of two."""

from quantwire.quant.base import PowerOfTwoScaling
from quantwire.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerTensorFloat

__all__ = [
    "Int8ActPerTensorFixedPoint",
    "Int8WeightPerChannelFixedPoint",
    "Int8WeightPerTensorFixedPoint",
    "Uint8ActPerTensorFixedPoint",
]


class Int8WeightPerTensorFixedPoint(PowerOfTwoScaling, Int8WeightPerTensorFloat):
    """8-bit weights, power-of-two scale covering the abs-max."""


class Int8WeightPerChannelFixedPoint(Int8WeightPerTensorFixedPoint):
    """8-bit weights, one power-of-two scale per output channel."""

    scaling_per_output_channel = True


class Int8ActPerTensorFixedPoint(PowerOfTwoScaling, Int8ActPerTensorFloat):
    """8-bit signed activations with a power-of-two scale at every step (while collecting too)."""


class Uint8ActPerTensorFixedPoint(Int8ActPerTensorFixedPoint):
    """8-bit unsigned activations with a power-of-two scale."""

    signed = False
