"""Shared by the library plugins (torchvision, timm): turn a float block into its quantized
twin by swapping the instance's class and attaching the quant modules its forward uses.

A twin is a module-level subclass ``class QuantBasicBlock(ConvertedModule, BasicBlock)`` whose
forward is the float forward with the quantized pieces put in (``residual_sum(self.residual_add,
out, identity)`` instead of ``out += identity``). Swapping ``__class__`` keeps the block's
children, parameters and hooks where they are, and a module-level class keeps the converted
model picklable and deep-copyable.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from quantwire.convert.quantize import ConvertedModule
from quantwire.convert.registry import Conversion

__all__ = ["residual_sum", "swap_in_residual_adds", "swap_in_twin", "twin_of"]


def residual_sum(add: nn.Module | None, a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` through ``add`` (a :class:`~quantwire.nn.QuantEltwiseAdd`), or the float sum
    when residual quantization is off (``add`` is None)."""
    return a + b if add is None else add(a, b)


def twin_of(module: nn.Module, twins: dict[type, type], conversion: Conversion) -> type | None:
    """The twin class of ``module`` from ``twins`` (float class -> twin), or None (with a
    warning naming the layer) when ``module`` is a subclass of a float class: its forward or
    methods may differ from the one the twin re-implements, so it is left float (its
    Linear/Conv children are still converted)."""
    twin = twins.get(type(module))
    if twin is not None:
        return twin
    base = next((cls for cls in type(module).__mro__ if cls in twins), None)
    described = f"{type(module).__module__}.{type(module).__qualname__}"
    if base is None:
        raise TypeError(f"{conversion.name or 'model'}: no quantized twin for {described}")
    warnings.warn(
        f"{conversion.name or 'model'}: {described} subclasses {base.__qualname__}, whose quantized twin "
        f"re-implements {base.__qualname__}.forward; left as it is (its inner layers are still converted). "
        "Register a handler for it to quantize its residual adds / attention.",
        stacklevel=2,
    )
    return None


def swap_in_twin(module: nn.Module, twin: type, **attached: Any) -> nn.Module:
    """Make ``module`` an instance of ``twin`` (a :class:`ConvertedModule` subclass of its
    class) with ``attached`` set as attributes (submodules or None)."""
    if not issubclass(twin, ConvertedModule) or not issubclass(twin, type(module)):
        raise TypeError(f"{twin.__qualname__} is not a ConvertedModule subclass of {type(module).__qualname__}")
    for name, value in attached.items():
        setattr(module, name, value)
    module.__class__ = twin
    return module


def swap_in_residual_adds(
    module: nn.Module,
    twins: dict[type, type],
    conversion: Conversion,
    adds: tuple[str, ...] = ("residual_add",),
) -> nn.Module | None:
    """The handler body of a residual block: one :class:`~quantwire.nn.QuantEltwiseAdd` per
    name in ``adds`` (each with its own ``residual`` quantizer) and the twin class; None
    (the block stays float, its children are still converted) when the config leaves
    residual adds float or the block has no twin."""
    twin = twin_of(module, twins, conversion)
    if twin is None:
        return None
    residual_adds = {name: conversion.residual_add() for name in adds}
    if all(add is None for add in residual_adds.values()):
        return None
    return swap_in_twin(module, twin, **residual_adds)
