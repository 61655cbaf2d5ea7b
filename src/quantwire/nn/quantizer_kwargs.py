"""Attaching quantizers to a layer: keyword arguments by prefix, proxies built or shared."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from quantwire.errors import QuantConfigError
from quantwire.inject import ExtendedInjector, wireable_names
from quantwire.proxy import (
    ActQuantProxyFromInjector,
    BiasQuantProxyFromInjector,
    QuantProxyFromInjector,
    WeightQuantProxyFromInjector,
)

QuantSpec = type[ExtendedInjector] | QuantProxyFromInjector | None


def route_quant_kwargs(
    layer_name: str, quantizers: Mapping[str, tuple[str, QuantSpec]], kwargs: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Split a layer's extra keyword arguments among its quantizers by prefix.

    ``quantizers`` maps a prefix (``"weight_"``, ``"input_"``; ``""`` for an activation layer's
    own quantizer) to ``(role, quantizer)``. The longest matching prefix wins. A keyword that no
    quantizer could ever use raises a :class:`QuantConfigError` naming the closest valid one.
    """
    routed: dict[str, dict[str, Any]] = {prefix: {} for prefix in quantizers}
    prefixes = sorted(quantizers, key=len, reverse=True)
    for key, value in kwargs.items():
        prefix = next((p for p in prefixes if key.startswith(p) and len(key) > len(p)), None)
        if prefix is None:
            raise _unknown_keyword(layer_name, key, quantizers)
        role, quant = quantizers[prefix]
        name = key[len(prefix) :]
        if quant is None:
            raise QuantConfigError(f"{layer_name}: keyword argument {key!r} is for {role}, which is None")
        if isinstance(quant, QuantProxyFromInjector):
            raise QuantConfigError(
                f"{layer_name}: keyword argument {key!r} can not change {role}: it is a shared proxy "
                f"({quant.describe()}); derive a quantizer with .let({name}=...) instead"
            )
        if name not in wireable_names(quant):
            raise _unknown_keyword(layer_name, key, quantizers)
        routed[prefix][name] = value
    return routed


def _unknown_keyword(layer_name: str, key: str, quantizers: Mapping[str, tuple[str, QuantSpec]]) -> QuantConfigError:
    valid = [
        prefix + name
        for prefix, (_, quant) in quantizers.items()
        if is_injector(quant)
        for name in wireable_names(quant)
    ]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    roles = ", ".join(f"{prefix or '(no prefix)'} -> {role}" for prefix, (role, _) in quantizers.items())
    return QuantConfigError(
        f"{layer_name}: keyword argument {key!r} is not used by any of its quantizers ({roles}){hint}"
    )


def is_injector(quant: Any) -> bool:
    """Whether ``quant`` is a quantizer declaration (an ExtendedInjector subclass)."""
    return inspect.isclass(quant) and issubclass(quant, ExtendedInjector)


def build_proxy(layer: nn.Module, role: str, quant: QuantSpec, overrides: Mapping[str, Any]) -> Any:
    """The proxy for ``role``: built from a quantizer class, shared from another layer, or None."""
    if quant is None:
        return None
    if isinstance(quant, QuantProxyFromInjector):
        quant.add_tracked_module(layer)
        return quant
    injector = configured_injector(layer, role, quant, overrides)
    return injector.proxy_class(layer, injector, role=role)


def configured_injector(
    layer: nn.Module, role: str, quant: Any, overrides: Mapping[str, Any], shareable: bool = True
) -> type[ExtendedInjector]:
    """``quant`` with ``overrides`` applied, checked to be a quantizer that names its proxy."""
    if not is_injector(quant):
        alternatives = "another layer's proxy to share, or None" if shareable else "or None"
        raise QuantConfigError(
            f"{type(layer).__name__}: {role} must be a quantizer class (an ExtendedInjector subclass), "
            f"{alternatives}; got {quant!r}"
        )
    injector = quant.let(**overrides) if overrides else quant
    if "proxy_class" not in injector:
        raise QuantConfigError(
            f"{type(layer).__name__}: {role}={quant.__name__} declares no proxy_class; "
            "add e.g. `proxy_class = WeightQuantProxyFromInjector` to it"
        )
    _check_proxy_kind(layer, role, quant, injector.proxy_class)
    return injector


_PROXY_KINDS = {
    WeightQuantProxyFromInjector: "a weight quantizer",
    BiasQuantProxyFromInjector: "a bias quantizer",
    ActQuantProxyFromInjector: "an activation quantizer",
}


def _expected_proxy_kind(role: str) -> type[QuantProxyFromInjector]:
    """Which kind of quantizer a role takes: ``*weight_quant``, ``*bias_quant``, else activations."""
    if role.endswith("weight_quant"):
        return WeightQuantProxyFromInjector
    if role.endswith("bias_quant"):
        return BiasQuantProxyFromInjector
    return ActQuantProxyFromInjector


def _check_proxy_kind(layer: nn.Module, role: str, quant: Any, proxy_class: Any) -> None:
    """Refuse e.g. an activation quantizer passed as ``weight_quant`` (it would quietly collect
    activation statistics on the weight)."""
    expected = _expected_proxy_kind(role)
    for kind, description in _PROXY_KINDS.items():
        if inspect.isclass(proxy_class) and issubclass(proxy_class, kind) and kind is not expected:
            raise QuantConfigError(
                f"{type(layer).__name__}: {role}={quant.__name__} is {description} "
                f"(proxy_class={proxy_class.__name__}); {role} takes {_PROXY_KINDS[expected]}"
            )
