"""Quantizers that post-training algorithms learn: AdaRound weights and QDrop activations."""

from quantwire.quant.base import AdaRoundLearnedRounding, QuantDropMixin
from quantwire.quant.scaled_int import (
    Int4WeightPerChannelFloat,
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Uint8ActPerTensorFloat,
)

__all__ = [
    "Int4WeightPerChannelAdaRound",
    "Int8ActQDrop",
    "Int8WeightPerChannelAdaRound",
    "Int8WeightPerTensorAdaRound",
    "Uint8ActQDrop",
]


class Int8WeightPerTensorAdaRound(AdaRoundLearnedRounding, Int8WeightPerTensorFloat):
    """8-bit weights with AdaRound's learned rounding (round to nearest until optimised)."""


class Int8WeightPerChannelAdaRound(AdaRoundLearnedRounding, Int8WeightPerChannelFloat):
    """8-bit per-channel weights with AdaRound's learned rounding."""


class Int4WeightPerChannelAdaRound(AdaRoundLearnedRounding, Int4WeightPerChannelFloat):
    """4-bit per-channel weights with AdaRound's learned rounding."""


class Int8ActQDrop(QuantDropMixin, Int8ActPerTensorFloat):
    """8-bit signed activations whose quantization is dropped per element with probability 0.5
    in training mode (QDrop)."""


class Uint8ActQDrop(QuantDropMixin, Uint8ActPerTensorFloat):
    """8-bit unsigned activations with QDrop."""
