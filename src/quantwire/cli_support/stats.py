"""Per-layer statistics of a quantized model: what ``quantwire inspect`` prints and the demo plots.

Everything here reads a model made of quantwire layers without changing it: weight quantizers
are asked for their quantized weight, activation quantizers are observed on one batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantwire.algorithms._utils import call_model, eval_mode
from quantwire.function.int_range import max_int, min_int
from quantwire.proxy.act import ActQuantProxyFromInjector
from quantwire.proxy.weight import WeightQuantProxyFromInjector
from quantwire.quant_tensor import QuantTensor

__all__ = ["LayerRow", "WeightGrid", "activation_sqnr", "layer_rows", "sqnr_db", "weight_grid"]


def sqnr_db(reference: Tensor, quantized: Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``quantized`` against ``reference``, in dB
    (``inf`` when they are equal)."""
    reference, quantized = reference.detach().double(), quantized.detach().double()
    noise = (reference - quantized).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(max(signal, 1e-300) / noise)).item()


@dataclass(frozen=True)
class LayerRow:
    """One weight-quantized layer: its quantizer, bit width, scale range and weight SQNR."""

    layer: str
    quantizer: str
    bit_width: str
    scale_min: float
    scale_max: float
    weight_sqnr: float


def _weight_proxies(model: nn.Module) -> list[tuple[str, WeightQuantProxyFromInjector]]:
    """The enabled weight quantizers of ``model`` with the name of the layer that owns them."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, WeightQuantProxyFromInjector) and module.is_quant_enabled:
            found.append((name.rpartition(".")[0] or name, module))
    return found


def _bit_width_text(bit_width: Tensor) -> str:
    """``"8"``, or ``"4-8"`` for a quantizer whose bit width varies."""
    low, high = int(bit_width.min()), int(bit_width.max())
    return str(low) if low == high else f"{low}-{high}"


def layer_rows(model: nn.Module) -> list[LayerRow]:
    """One :class:`LayerRow` per weight-quantized layer of ``model``, in module order."""
    rows = []
    with torch.no_grad():
        for layer, proxy in _weight_proxies(model):
            weight = proxy.tracked_weight()
            quant = proxy.quant_output()
            rows.append(
                LayerRow(
                    layer=layer,
                    quantizer=proxy.quant_injector.__name__,
                    bit_width=_bit_width_text(quant.bit_width),
                    scale_min=float(quant.scale.min()),
                    scale_max=float(quant.scale.max()),
                    weight_sqnr=sqnr_db(weight, quant.value),
                )
            )
    return rows


@contextlib.contextmanager
def _recording_activations(model: nn.Module) -> Iterator[dict[str, list[float]]]:
    """Within the block, every enabled activation quantizer of ``model`` appends the SQNR of its
    output against its input to ``sqnrs[name]`` (the layer's name, or ``name.quantizer``)."""
    sqnrs: dict[str, list[float]] = {}
    patched = []

    def wrap(name: str, proxy: ActQuantProxyFromInjector, method: str) -> None:
        original = getattr(proxy, method)

        def recorded(x):
            y = original(x)
            plain = x.value if isinstance(x, QuantTensor) else x
            out = y.value if isinstance(y, QuantTensor) else y
            sqnrs.setdefault(name, []).append(sqnr_db(plain, out))
            return y

        setattr(proxy, method, recorded)
        patched.append((proxy, method))

    for name, module in model.named_modules():
        if isinstance(module, ActQuantProxyFromInjector) and module.is_quant_enabled:
            for method in ("fake_quant", "forward"):
                wrap(name, module, method)
    try:
        yield sqnrs
    finally:
        for proxy, method in patched:
            delattr(proxy, method)


def activation_sqnr(model: nn.Module, batch: object) -> dict[str, float]:
    """SQNR (dB) of every activation quantizer of ``model`` on ``batch``, averaged over the
    calls, keyed by the quantizer's module name."""
    with eval_mode(model), torch.no_grad(), _recording_activations(model) as sqnrs:
        call_model(model, batch)
    return {name: sum(values) / len(values) for name, values in sqnrs.items()}


@dataclass(frozen=True)
class WeightGrid:
    """The weights of one output channel of a layer and the grid its quantizer puts them on."""

    layer: str
    channel: int
    weights: Tensor
    levels: Tensor
    bit_width: int


def weight_grid(model: nn.Module, layer: str, channel: int = 0) -> WeightGrid:
    """Weights of output ``channel`` of ``layer`` and every value its quantizer can produce."""
    proxies = dict(_weight_proxies(model))
    if layer not in proxies:
        raise ValueError(f"{layer!r} is not a weight-quantized layer; known: {', '.join(proxies)}")
    proxy = proxies[layer]
    with torch.no_grad():
        weight = proxy.tracked_weight()
        quant = proxy.quant_output()
        scale = quant.scale.expand_as(weight)[channel].flatten()[0]
        zero_point = quant.zero_point.expand_as(weight)[channel].flatten()[0]
        bit_width = quant.bit_width.max()
        codes = torch.arange(
            int(min_int(quant.signed, False, bit_width)), int(max_int(quant.signed, False, bit_width)) + 1
        )
    return WeightGrid(layer, channel, weight[channel].detach().flatten(), (codes - zero_point) * scale, int(bit_width))
