"""Per-group weight quantizers (LLM-style weight-only quantization)."""

from quantwire.quant.base import PerGroupScaling
from quantwire.quant.scaled_int import Int8WeightPerTensorFloat

__all__ = ["Int4WeightPerGroupFloat", "Int8WeightPerGroupFloat"]


class Int8WeightPerGroupFloat(PerGroupScaling, Int8WeightPerTensorFloat):
    """8-bit weights, one abs-max scale per ``group_size`` input channels of each output channel."""


class Int4WeightPerGroupFloat(Int8WeightPerGroupFloat):
    """4-bit weights, one abs-max scale per ``group_size`` input channels of each output channel."""

    bit_width = 4
