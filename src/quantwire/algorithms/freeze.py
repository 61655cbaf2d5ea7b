"""Freezing a layer's weight grid: the scale (and zero point) stop following the weight.

Catalogue weight quantizers recompute their scale from the weight on every call (abs-max per
tensor, channel or group). Algorithms that edit weights after choosing the grid (GPTQ, bias
correction, anything that moves weights "onto" a grid) need the grid to stay where it was:
:func:`freeze_weight_quantizer` swaps the scale for a learned :class:`ParameterScaling` (and a
statistics zero point for a :class:`ParameterZeroPoint`) initialised to the current values, by
re-declaring the proxy's quantizer with ``let``, so that the frozen grid lives in the
``state_dict`` and survives rebuilds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from quantwire.core.quant import RescalingIntQuant
from quantwire.core.scaling import ParameterScaling
from quantwire.core.zero_point import ParameterZeroPoint, ZeroZeroPoint
from quantwire.errors import QuantConfigError
from quantwire.function.int_range import max_int, min_int
from quantwire.proxy.weight import WeightQuantProxyFromInjector

__all__ = ["freeze_weight_quantizer", "quantize_weight_tensors"]


def _layer_label(layer: nn.Module) -> str:
    return type(layer).__name__


def _is_kind(module: nn.Module, cls: type) -> bool:
    """``isinstance``, also for a TorchScript module that was copied (``QUANTWIRE_JIT=1``: a
    deep-copied core module is a ``RecursiveScriptModule`` that only keeps its class name)."""
    return isinstance(module, cls) or getattr(module, "original_name", None) == cls.__name__


def _int_weight_proxy(layer: nn.Module) -> WeightQuantProxyFromInjector:
    """The layer's weight proxy, if it is built on :class:`RescalingIntQuant`; else an error."""
    proxy = getattr(layer, "weight_quant", None)
    weight = getattr(layer, "weight", None)
    if proxy is None or not isinstance(weight, Tensor):
        raise QuantConfigError(f"{_layer_label(layer)}: the layer has no weight quantizer")
    if not isinstance(proxy, WeightQuantProxyFromInjector):
        raise QuantConfigError(f"{_layer_label(layer)}: weight_quant is a {type(proxy).__name__}, not a weight proxy")
    if not _is_kind(proxy.tensor_quant, RescalingIntQuant):
        raise QuantConfigError(
            f"{proxy.describe()}: only integer weight quantizers with a scale "
            f"(RescalingIntQuant) have a grid to freeze; this one is "
            f"{getattr(proxy.tensor_quant, 'original_name', type(proxy.tensor_quant).__name__)}"
        )
    if len(proxy.tracked_module_list) > 1:
        raise QuantConfigError(
            f"{proxy.describe()}: the weight quantizer is shared by {len(proxy.tracked_module_list)} layers, "
            "each with its own grid; freezing one layer's grid would move the others'"
        )
    return proxy


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode and without autograd for the body (modes restored afterwards)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def quantize_weight_tensors(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The layer's current weight grid: ``(scale, zero_point, min_int, max_int)``.

    ``scale`` and ``zero_point`` are expanded to the weight's shape (read-only broadcast
    views: clone before writing into them), ``min_int``/``max_int`` are 0-d tensors; a weight
    value ``w`` quantizes to ``(clamp(round(w / scale + zero_point), min_int, max_int) -
    zero_point) * scale``. Signedness, narrow range and bit width are read from the built
    quantizer. Only :class:`RescalingIntQuant` weight quantizers have such a grid
    (:class:`~quantwire.errors.QuantConfigError` otherwise).
    """
    proxy = _int_weight_proxy(layer)
    tensor_quant = proxy.tensor_quant
    weight = proxy.tracked_weight()
    with _eval(tensor_quant):
        _, scale, zero_point, bit_width = tensor_quant(weight)
    int_quant = tensor_quant.int_quant
    low = min_int(int_quant.signed, int_quant.narrow_range, bit_width)
    high = max_int(int_quant.signed, int_quant.narrow_range, bit_width)
    return (
        scale.detach().expand(weight.shape),
        zero_point.detach().expand(weight.shape),
        low.detach().reshape(()),
        high.detach().reshape(()),
    )


def freeze_weight_quantizer(layer: nn.Module) -> None:
    """Fix the grid of ``layer``'s weight quantizer at its current scale and zero point.

    The threshold ``tensor_quant.scaling_impl(weight)`` (shape ``()`` per tensor, ``(C, 1, ...)``
    per channel, the weight's shape per group) becomes the initial value of a
    :class:`ParameterScaling` with the quantizer's own ``restrict_scaling_impl`` (a
    power-of-two quantizer stays power-of-two); a zero point other than
    :class:`ZeroZeroPoint` becomes a :class:`ParameterZeroPoint` whose lower range end is
    ``-zero_point * scale``, which gives back the same zero point. The proxy's injector is
    replaced by that ``let`` and the quantizer rebuilt.

    Afterwards the quantized weight is bit-identical to before (checked; on failure the old
    quantizer is restored and :class:`~quantwire.errors.QuantConfigError` raised), and any
    later edit of the weight is quantized on the same grid. The new scale (and zero point)
    are parameters in the ``state_dict`` (``weight_quant.tensor_quant.scaling_impl.value``):
    a model loading that checkpoint must be frozen the same way first. Freezing twice is
    harmless.

    Raises :class:`~quantwire.errors.QuantConfigError` naming the layer and quantizer if the
    weight quantizer is not a :class:`RescalingIntQuant` (minifloat, binary, ternary), is
    missing, or is shared by several layers.
    """
    proxy = _int_weight_proxy(layer)
    weight = proxy.tracked_weight()
    old_injector, old_tensor_quant = proxy.quant_injector, proxy.tensor_quant
    with _eval(old_tensor_quant):
        before, scale, zero_point, _ = old_tensor_quant(weight)
        threshold = old_tensor_quant.scaling_impl(weight).detach().clone()
    overrides: dict[str, object] = {
        "scaling_impl": ParameterScaling,
        "scaling_init": threshold,
        "scaling_shape": tuple(threshold.shape),
    }
    low = None
    if not _is_kind(old_tensor_quant.zero_point_impl, ZeroZeroPoint):
        low = (-(zero_point * scale)).detach().clone()
        overrides.update(zero_point_impl=ParameterZeroPoint, zero_point_init=low, zero_point_shape=tuple(low.shape))
    try:
        proxy.quant_injector = old_injector.let(**overrides)
        proxy.init_tensor_quant()
        tensor_quant = proxy.tensor_quant
        with torch.no_grad():
            # The injected initial values went through float32; copy the exact ones (float64 weights).
            scaling = tensor_quant.scaling_impl
            restrict = scaling.restrict_clamp.restrict_value_impl
            scaling.value.copy_(restrict.restrict_init_tensor(threshold.to(scaling.value.dtype)))
            if low is not None:
                tensor_quant.zero_point_impl.value.copy_(low)
        with _eval(tensor_quant):
            after, new_scale, new_zero_point, _ = tensor_quant(weight)
        same = (
            torch.equal(after, before)
            and torch.equal(new_scale.expand_as(weight), scale.expand_as(weight))
            and torch.equal(new_zero_point.expand_as(weight), zero_point.expand_as(weight))
        )
        if not same:
            raise QuantConfigError(
                f"{proxy.describe()}: the frozen quantizer does not reproduce the quantized weight "
                f"(its restrict_scaling_impl {type(restrict).__name__} does not round-trip the threshold)"
            )
    except BaseException:
        proxy.quant_injector = old_injector
        proxy.tensor_quant = old_tensor_quant
        proxy.clear_cache()
        raise
    proxy.clear_cache()
