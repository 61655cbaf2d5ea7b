"""Pruning, declared on a weight quantizer: the weight proxy applies the mask before quantizing.

Combine a pruning mixin with any weight quantizer by inheritance (the mixin first)::

    class Int4PerChannelPruned(MagnitudePruning, Int4WeightPerChannelFloat):
        pruning_sparsity = 0.7

or pick one of the ready quantizers below; layers route ``weight_pruning_*`` keyword
arguments to them (``QuantLinear(..., weight_quant=Int8WeightPerChannelFloat2of4,
weight_pruning_n=1)``). :func:`quantwire.algorithms.pruning.prune` adds the same declarations
to the layers of an existing model.
"""

from quantwire.core.pruning import MagnitudeMask, NMMask
from quantwire.inject import ExtendedInjector, value
from quantwire.quant.scaled_int import Int4WeightPerChannelFloat, Int8WeightPerChannelFloat, Int8WeightPerTensorFloat

__all__ = [
    "Int4WeightPerChannelFloat2of4",
    "Int8WeightPerChannelFloat2of4",
    "Int8WeightPerChannelFloatMagnitudePruned",
    "Int8WeightPerTensorFloat2of4",
    "Int8WeightPerTensorFloatMagnitudePruned",
]


def layer_input_channel_dim(module):
    """The dim of the layer's weight that holds input channels (1 for Linear and Conv, 0 for
    ConvTranspose): where N:M blocks run."""
    layer = module[0] if isinstance(module, tuple) else module
    return getattr(layer, "input_channel_dim", 1)


class MagnitudePruning(ExtendedInjector):
    """Unstructured magnitude pruning: the ``pruning_sparsity`` fraction of the weight with the
    smallest ``|w|`` is set to zero."""

    pruning_impl = MagnitudeMask
    pruning_sparsity = 0.5


class NMPruning(ExtendedInjector):
    """N:M structured pruning (2:4 by default): ``pruning_n`` of every ``pruning_m`` consecutive
    input channels are kept (the largest ``|w|``), at each output channel and kernel position."""

    pruning_impl = NMMask
    pruning_n = 2
    pruning_m = 4
    pruning_dim = value(layer_input_channel_dim)


class Int8WeightPerTensorFloatMagnitudePruned(MagnitudePruning, Int8WeightPerTensorFloat):
    """8-bit per-tensor weights, half of them (``pruning_sparsity``) pruned by magnitude."""


class Int8WeightPerChannelFloatMagnitudePruned(MagnitudePruning, Int8WeightPerChannelFloat):
    """8-bit per-channel weights, half of them (``pruning_sparsity``) pruned by magnitude."""


class Int8WeightPerTensorFloat2of4(NMPruning, Int8WeightPerTensorFloat):
    """8-bit per-tensor weights with 2:4 structured sparsity along input channels."""


class Int8WeightPerChannelFloat2of4(NMPruning, Int8WeightPerChannelFloat):
    """8-bit per-channel weights with 2:4 structured sparsity along input channels."""


class Int4WeightPerChannelFloat2of4(NMPruning, Int4WeightPerChannelFloat):
    """4-bit per-channel weights with 2:4 structured sparsity along input channels."""
