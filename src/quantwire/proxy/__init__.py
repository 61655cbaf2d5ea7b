"""Proxies: the modules that sit between a quant layer and its quantizers.

A proxy builds its quantizer's ``tensor_quant`` from the declaration with ``module`` set to
the layer(s) using it, rebuilds it whenever a ``state_dict`` is loaded, turns the core module's
tuple into a :class:`~quantwire.quant_tensor.QuantTensor`, and caches frozen weights in eval.
"""

from quantwire.proxy.act import ActQuantProxyFromInjector
from quantwire.proxy.base import QuantProxyFromInjector
from quantwire.proxy.bias import BiasQuantProxyFromInjector
from quantwire.proxy.weight import WeightQuantProxyFromInjector

__all__ = [
    "ActQuantProxyFromInjector",
    "BiasQuantProxyFromInjector",
    "QuantProxyFromInjector",
    "WeightQuantProxyFromInjector",
]
