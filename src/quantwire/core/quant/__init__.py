"""Quantization modules: each returns the fake-quantized tensor and the metadata a QuantTensor
carries (``(value, scale, zero_point, bit_width)``; minifloat: see :class:`FloatQuant`)."""

from quantwire.core.quant.binary import BinaryQuant, ClampedBinaryQuant
from quantwire.core.quant.delay import DelayWrapper
from quantwire.core.quant.float import FloatQuant, FloatScaling
from quantwire.core.quant.int import IntQuant, LearnedRoundIntQuant, PactIntQuant, PrescaledIntQuant, RescalingIntQuant
from quantwire.core.quant.learned_round import AdaRoundRounding
from quantwire.core.quant.ternary import TernaryQuant

__all__ = [
    "BinaryQuant",
    "ClampedBinaryQuant",
    "DelayWrapper",
    "FloatQuant",
    "FloatScaling",
    "AdaRoundRounding",
    "IntQuant",
    "LearnedRoundIntQuant",
    "PactIntQuant",
    "PrescaledIntQuant",
    "RescalingIntQuant",
    "TernaryQuant",
]
