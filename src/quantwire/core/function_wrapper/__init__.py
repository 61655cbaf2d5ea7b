"""Modules wrapping the functions of :mod:`quantwire.function`, so that an injector can choose
them by class (``float_to_int_impl = FloorSte``), and the tensor views statistics are taken over."""

from quantwire.core.function_wrapper.ops import (
    BinarySignSte,
    CeilSte,
    FloorSte,
    Identity,
    RoundSte,
    RoundToZeroSte,
    ScalarClampMinSte,
    StochasticRoundSte,
    TensorClamp,
    TensorClampSte,
    TernarySignSte,
)
from quantwire.core.function_wrapper.view import (
    OverBatchOverTensorView,
    OverChannelView,
    OverGroupView,
    OverOutputChannelView,
    OverTensorView,
    OverTokenView,
)

__all__ = [
    "BinarySignSte",
    "CeilSte",
    "FloorSte",
    "Identity",
    "OverBatchOverTensorView",
    "OverChannelView",
    "OverGroupView",
    "OverOutputChannelView",
    "OverTensorView",
    "OverTokenView",
    "RoundSte",
    "RoundToZeroSte",
    "ScalarClampMinSte",
    "StochasticRoundSte",
    "TensorClamp",
    "TensorClampSte",
    "TernarySignSte",
]
