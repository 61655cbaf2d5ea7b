"""Quantizers as declarations: the dependency-injection layer of quantwire.

A quantizer is a subclass of :class:`ExtendedInjector`. Its attributes are wired into each other
by name when one of them is read: ``MyQuant.tensor_quant`` builds a new core module whose
constructor arguments are looked up, recursively, among ``MyQuant``'s attributes.

This package is the only place that touches the internals of the ``dependencies`` library.
"""

from quantwire.inject._injector import DependencyError, ExtendedInjector, compose, this, value
from quantwire.inject._introspect import wireable_names

__all__ = ["DependencyError", "ExtendedInjector", "compose", "this", "value", "wireable_names"]
