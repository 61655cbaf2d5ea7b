"""Empirical bias correction: fold the mean output error of weight quantization into the bias.

Quantizing a weight shifts the expected output of each output channel by
``E[(W - Q(W)) x]``, a bias that later layers (and batch statistics) do not expect. Bias
correction (Nagel et al., 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction"; Finkelstein et al., 2019) adds that shift back to the bias. The data-free variant
estimates ``E[x]`` from batch-norm statistics; this is the empirical variant, which measures
the shift on calibration data.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from quantwire.algorithms._utils import (
    ForwardFn,
    call_model,
    capture,
    eval_mode,
    execution_order,
    progress_bar,
    resolve_modules,
    weight_quant_layers,
)
from quantwire.errors import QuantInputError
from quantwire.nn.base import QuantWBIOL
from quantwire.proxy.base import QuantProxyFromInjector, plain_value

__all__ = ["bias_correction"]


@contextlib.contextmanager
def _proxies_disabled(proxies: dict[QuantProxyFromInjector | None, bool]) -> Iterator[None]:
    """Set ``disable_quant`` of each proxy to the given value for the body (None keys ignored)."""
    present = {proxy: state for proxy, state in proxies.items() if proxy is not None}
    before = {proxy: proxy.disable_quant for proxy in present}
    try:
        for proxy, state in present.items():
            proxy.disable_quant = state
        yield
    finally:
        for proxy, state in before.items():
            proxy.disable_quant = state


def _channel_dim(layer: QuantWBIOL, output: Tensor) -> int:
    """Where the output channels are in ``output`` (an unbatched convolution has them first)."""
    if isinstance(layer, nn.modules.conv._ConvNd) and output.dim() == layer.weight.dim() - 1:
        return 0
    return layer.output_feature_dim


def _mean_output_error(layer: QuantWBIOL, args: tuple, kwargs: dict) -> tuple[Tensor, int]:
    """Per output channel: the sum over every other dim of (output with the float weight -
    output with the quantized weight), in float64, and how many values each sum holds.

    Both outputs are taken before the output quantizer and with the bias unquantized (it
    cancels in the difference); the input goes through the layer's input quantizer in both.
    """
    common = {layer.output_quant: True, layer.bias_quant: True}
    with _proxies_disabled({**common, layer.weight_quant: False}):
        quantized = plain_value(layer(*args, **kwargs))
    with _proxies_disabled({**common, layer.weight_quant: True}):
        reference = plain_value(layer(*args, **kwargs))
    difference = (reference.to(torch.float64) - quantized.to(torch.float64)).movedim(_channel_dim(layer, quantized), -1)
    difference = difference.reshape(-1, difference.shape[-1])
    return difference.sum(dim=0), difference.shape[0]


def _select_layers(model: nn.Module, layers: Sequence[str | nn.Module] | None) -> list[tuple[str, QuantWBIOL]]:
    explicit = layers is not None
    candidates = resolve_modules(model, layers) if explicit else weight_quant_layers(model)
    selected = []
    for name, layer in candidates:
        if not isinstance(layer, QuantWBIOL) or layer.weight_quant is None:
            raise QuantInputError(f"bias_correction: {name} ({type(layer).__name__}) has no weight quantizer")
        if layer.weight_quant.disable_quant:
            continue  # a float weight makes no error to correct
        selected.append((name, layer))
    return selected


def _add_to_bias(name: str, layer: QuantWBIOL, correction: Tensor) -> None:
    """``bias += correction``; a zero bias is created first if the layer has none."""
    weight = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(correction.shape[0], device=weight.device, dtype=weight.dtype))
    bias = layer.bias
    if bias.shape != correction.shape:
        warnings.warn(
            f"bias_correction: skipping {name}: its bias of shape {tuple(bias.shape)} is not one value per "
            f"output channel ({correction.shape[0]})",
            stacklevel=4,
        )
        return
    with torch.no_grad():
        bias.add_(correction.to(device=bias.device, dtype=bias.dtype))
    if layer.bias_quant is not None:
        layer.bias_quant.init_tensor_quant()


def bias_correction(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    layers: Sequence[str | nn.Module] | None = None,
    progress: bool = True,
    forward_fn: ForwardFn | None = None,
) -> nn.Module:
    """Empirical bias correction of every weight-quantized layer of ``model`` (or of ``layers``).

    Layers are corrected one after the other, in the order the model first calls them on the
    first batch of ``data``. For each layer, the inputs it receives in the current quantized
    model (earlier layers already corrected) are captured over ``num_batches`` batches; on
    them, the mean over batch and spatial / token positions of
    ``output(float weight) - output(quantized weight)`` is computed per output channel, both
    outputs taken before the output quantizer, with the same (input-quantized) input and the
    bias unquantized, and added to the bias. A layer without a bias gets a zero bias
    Parameter first (on the weight's device and dtype); a bias quantizer is rebuilt afterwards
    (only that one: rebuilding the layer's other quantizers would discard calibrated
    activation scales). Layers whose weight quantizer is disabled are left untouched.

    Why this error and these inputs: comparing the float and quantized *weight* on the *same
    quantized input* isolates this layer's own weight-quantization error, which is what its
    bias can absorb; the error coming from upstream layers and activation quantizers is
    corrected where it arises (earlier layers were corrected first and the inputs come from
    the corrected model), so corrections do not double count. It needs no second (float)
    copy of the model and no BatchNorm statistics, so it works for any architecture. After
    correction the mean per-channel output error on the calibration data is zero up to the
    bias quantizer's rounding (without a bias quantizer, up to float rounding).

    The model runs in eval mode and under ``torch.no_grad()``; modes are restored.
    ``data`` is iterated once per layer plus once for the order (a list or a DataLoader).
    A layer called several times per forward pass is corrected on its first call's inputs.
    Returns ``model``.
    """
    run = forward_fn or call_model
    selected = _select_layers(model, layers)
    if not selected:
        return model
    try:
        _correct(model, data, num_batches, selected, progress, run)
    finally:
        # A bias quantizer rebuilt in eval mode takes its proxy's restored mode.
        for _, layer in selected:
            if layer.bias_quant is not None:
                layer.bias_quant.tensor_quant.train(layer.bias_quant.training)
    return model


def _correct(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None,
    selected: list[tuple[str, QuantWBIOL]],
    progress: bool,
    run: ForwardFn,
) -> None:
    with eval_mode(model), torch.no_grad():
        order = execution_order(model, [layer for _, layer in selected], data, run)
        called = set(order)
        for index, (name, _) in enumerate(selected):
            if index not in called:
                warnings.warn(
                    f"bias_correction: skipping {name}: the model's forward pass never calls it", stacklevel=3
                )
        for index in progress_bar(order, desc="bias correction", total=len(order), enabled=progress):
            name, layer = selected[index]
            captured = capture(model, layer, data, num_batches, outputs=False, forward_fn=run)
            total: Tensor | None = None
            count = 0
            for args, kwargs in zip(captured.args, captured.kwargs, strict=True):
                sums, n = _mean_output_error(layer, args, kwargs)
                total = sums if total is None else total + sums
                count += n
            if total is None or count == 0:
                raise QuantInputError(f"bias_correction: {name}: no outputs to measure the error on")
            if not bool(torch.isfinite(total).all()):
                raise QuantInputError(f"bias_correction: {name}: the output error holds NaN or Inf values")
            _add_to_bias(name, layer, total / count)
