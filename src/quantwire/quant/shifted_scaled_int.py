"""Asymmetric (zero-point) integer quantizers."""

from quantwire.quant.base import ShiftedActZeroPoint, ShiftedWeightZeroPoint
from quantwire.quant.scaled_int import Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

__all__ = ["ShiftedUint8ActPerTensorFloat", "ShiftedUint8WeightPerTensorFloat"]


class ShiftedUint8WeightPerTensorFloat(ShiftedWeightZeroPoint, Int8WeightPerTensorFloat):
    """8-bit unsigned weights over ``[min(w, 0), max(w, 0)]`` with a zero point."""

    narrow_range = False


class ShiftedUint8ActPerTensorFloat(ShiftedActZeroPoint, Uint8ActPerTensorFloat):
    """8-bit unsigned activations over a collected percentile interval, with a zero point."""
