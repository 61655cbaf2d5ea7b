"""Quantizers for quantization-aware training: LSQ, LSQ+, token-wise LSQ and PACT."""

from quantwire.quant.base import (
    LsqGradientScaling,
    MSEStats,
    PactClipping,
    ParameterFromWeightStatsScaling,
    PerTokenPositionRuntimeStatsScaling,
)
from quantwire.quant.scaled_int import (
    Int8ActPerTensorFloat,
    Int8WeightPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from quantwire.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloat

__all__ = [
    "Int4ActLsq",
    "Int4WeightPerChannelLsq",
    "Int8ActLsq",
    "Int8ActPerTokenLsq",
    "Int8WeightPerChannelLsq",
    "Int8WeightPerTensorLsq",
    "Uint4ActLsq",
    "Uint4ActLsqPlus",
    "Uint4ActPact",
    "Uint8ActLsq",
    "Uint8ActLsqPlus",
    "Uint8ActPact",
]


class Int8WeightPerTensorLsq(LsqGradientScaling, ParameterFromWeightStatsScaling, MSEStats, Int8WeightPerTensorFloat):
    """LSQ weights: a learned step size, started at the MSE-optimal threshold of the weight,
    with LSQ's gradient scale."""


class Int8WeightPerChannelLsq(Int8WeightPerTensorLsq):
    """LSQ weights with one learned step size per output channel."""

    scaling_per_output_channel = True


class Int4WeightPerChannelLsq(Int8WeightPerChannelLsq):
    """4-bit LSQ weights, one learned step size per output channel."""

    bit_width = 4


class Int8ActLsq(LsqGradientScaling, Int8ActPerTensorFloat):
    """LSQ signed activations: the step size starts from collected statistics (or calibration)
    and is learned with LSQ's gradient scale."""


class Int4ActLsq(Int8ActLsq):
    """4-bit LSQ signed activations."""

    bit_width = 4


class Uint8ActLsq(LsqGradientScaling, Uint8ActPerTensorFloat):
    """LSQ unsigned activations (after ReLU)."""


class Uint4ActLsq(Uint8ActLsq):
    """4-bit LSQ unsigned activations."""

    bit_width = 4


class Uint8ActLsqPlus(LsqGradientScaling, ShiftedUint8ActPerTensorFloat):
    """LSQ+: asymmetric activations with a learned step size and a learned offset (the lower
    range end), both started from collected statistics and learned with LSQ's gradient scale."""


class Uint4ActLsqPlus(Uint8ActLsqPlus):
    """4-bit LSQ+ asymmetric activations."""

    bit_width = 4


class Int8ActPerTokenLsq(PerTokenPositionRuntimeStatsScaling, Int8ActLsq):
    """Token-wise LSQ for transformer activations ``(batch, num_tokens, features)``: one learned
    step size per token position (declare ``num_tokens``)."""


class Uint8ActPact(PactClipping, Uint8ActPerTensorFloat):
    """PACT: unsigned activations clipped at a learned ``alpha`` (started from collected
    statistics); regularise ``alpha`` with weight decay as the paper does."""


class Uint4ActPact(Uint8ActPact):
    """4-bit PACT activations."""

    bit_width = 4
