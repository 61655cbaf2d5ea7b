"""Dynamic per-token activation quantizers (transformers)."""

from quantwire.quant.base import DynamicPerTokenScaling
from quantwire.quant.scaled_int import Int8ActPerTensorFloat

__all__ = ["Int8ActDynamicPerTokenFloat"]


class Int8ActDynamicPerTokenFloat(DynamicPerTokenScaling, Int8ActPerTensorFloat):
    """8-bit signed activations, one abs-max scale per token computed on every call."""
