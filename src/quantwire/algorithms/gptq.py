"""GPTQ: post-training weight quantization with second-order error compensation.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") quantizes a layer's weight one input column at a time and, after
each column, moves the columns not yet quantized so as to compensate the output error just
made, using the inverse of the layer's input Hessian ``H = 2/N sum x x^T``. The updates go
through the Cholesky factor of ``H^-1`` in blocks of ``block_size`` columns (the "lazy batch"
form of the reference implementation).

Here the grid is the layer's own weight quantizer: its scale and zero point are computed from
the original weight and frozen (:func:`~quantwire.algorithms.freeze.freeze_weight_quantizer`),
so per-tensor, per-channel, per-group, power-of-two and asymmetric grids all work (GPTQ's
"static groups"). The result is written into the layer's weight as the dequantized values,
which the frozen quantizer reproduces exactly: the model's quantized forward pass (and
export) then uses GPTQ's rounding decisions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantwire.algorithms._utils import (
    Captured,
    ForwardFn,
    call_model,
    capture,
    eval_mode,
    execution_order,
    progress_bar,
    resolve_modules,
    weight_quant_layers,
)
from quantwire.algorithms.freeze import _int_weight_proxy, freeze_weight_quantizer, quantize_weight_tensors
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.nn.base import QuantWBIOL
from quantwire.proxy.base import plain_value

__all__ = ["gptq", "gptq_quantize_matrix", "input_hessian"]

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _check_options(block_size: int, damp: float) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise QuantInputError(f"gptq: block_size must be a positive int, got {block_size!r}")
    if not (isinstance(damp, int | float) and math.isfinite(damp) and damp >= 0):
        raise QuantInputError(f"gptq: damp must be a finite number >= 0, got {damp!r}")


def _select_layers(
    model: nn.Module, layers: Sequence[str | nn.Module] | None, algorithm: str
) -> list[tuple[str, QuantWBIOL]]:
    """The GPTQ-able layers among ``layers`` (every weight-quantized layer by default).

    Unsupported layer types and disabled weight quantizers are skipped with a warning; an
    explicitly named layer without a weight quantizer, or a quantizer without an integer grid,
    is an error (raised before any layer is changed)."""
    explicit = layers is not None
    candidates = resolve_modules(model, layers) if explicit else weight_quant_layers(model)
    selected = []
    for name, layer in candidates:
        if not isinstance(layer, QuantWBIOL) or layer.weight_quant is None:
            raise QuantInputError(f"{algorithm}: {name} ({type(layer).__name__}) has no weight quantizer")
        if not isinstance(layer, _SUPPORTED):
            warnings.warn(
                f"{algorithm}: skipping {name} ({type(layer).__name__}): only Linear, Conv1d and Conv2d "
                "layers are supported",
                stacklevel=3,
            )
            continue
        if layer.weight_quant.disable_quant:
            warnings.warn(f"{algorithm}: skipping {name}: its weight quantizer is disabled", stacklevel=3)
            continue
        _int_weight_proxy(layer)  # raises QuantConfigError for minifloat, binary, shared quantizers
        selected.append((name, layer))
    return selected


def _unfold_groups(layer: nn.Module, x: Tensor) -> list[Tensor]:
    """The rows the layer's weight multiplies, per group: ``(rows, fan_in)`` matrices whose
    columns are ordered as ``weight.reshape(out_channels, -1)``'s."""
    if isinstance(layer, nn.Linear):
        return [x.reshape(-1, x.shape[-1])]
    spatial = 1 if isinstance(layer, nn.Conv1d) else 2
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    if any(layer._reversed_padding_repeated_twice):
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if spatial == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, kernel[0]), (1, stride[0]), (1, dilation[0])
    per_group = x.shape[1] // layer.groups
    rows = []
    for group in range(layer.groups):
        part = x[:, group * per_group : (group + 1) * per_group]
        columns = F.unfold(part, kernel, dilation=dilation, padding=0, stride=stride)  # (N, fan_in, L)
        rows.append(columns.transpose(1, 2).reshape(-1, columns.shape[1]))
    return rows


def input_hessian(layer: nn.Module, captured: Captured) -> Tensor:
    """``H = 2/N sum x x^T`` over the inputs ``layer`` multiplied on the captured calls, one
    per group: shape ``(groups, fan_in, fan_in)``, float64.

    The inputs go through the layer's ``input_quant`` first (GPTQ then sees what the layer
    actually multiplies); a convolution's inputs are unfolded into its receptive fields (with
    the layer's padding mode), a Linear's flattened over every leading dim.
    """
    groups = getattr(layer, "groups", 1)
    fan_in = layer.weight[0].numel()
    device = layer.weight.device
    hessian = torch.zeros(groups, fan_in, fan_in, dtype=torch.float64, device=device)
    count = 0
    for index in range(len(captured)):
        x = plain_value(captured.first_input(index))
        if layer.input_quant is not None:
            x = layer.input_quant.fake_quant(x)
        x = x.to(device)
        for group, rows in enumerate(_unfold_groups(layer, x)):
            rows = rows.to(torch.float64)
            hessian[group] += rows.T @ rows
            if group == 0:
                count += rows.shape[0]
    if count == 0:
        raise QuantInputError(f"{type(layer).__name__}: no input rows were captured to build the Hessian")
    if not bool(torch.isfinite(hessian).all()):
        raise QuantInputError(f"{type(layer).__name__}: the inputs it receives hold NaN or Inf values")
    return hessian * (2.0 / count)


def _round_to_grid(w: Tensor, scale: Tensor, zero_point: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Integer codes of ``w`` on the grid, as ``IntQuant`` computes them (clamp, round half to even)."""
    return torch.round(torch.clamp(w / scale + zero_point, low, high))


def gptq_quantize_matrix(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    min_int: Tensor,
    max_int: Tensor,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> Tensor:
    """GPTQ on one ``(rows, columns)`` weight matrix: the integer codes (as floats) it chooses.

    ``hessian`` is ``(columns, columns)``; ``scale``/``zero_point`` broadcast to ``weight``
    (a fixed grid, one value per element at most); the dequantized weight is
    ``(codes - zero_point) * scale``. Columns whose Hessian diagonal is 0 (inputs that are
    always zero) get the weight 0, as in the reference implementation. The Hessian is
    dampened by ``damp * mean(diag(H))`` and inverted in float64; the column updates run in
    the weight's dtype if it is float64, else float32.
    """
    _check_options(block_size, damp)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(work).clone()
    scale = scale.detach().expand_as(weight).to(work)
    zero_point = zero_point.detach().expand_as(weight).to(work)
    low, high = min_int.to(work), max_int.to(work)
    H = hessian.detach().to(torch.float64).clone()
    columns = W.shape[1]
    if H.shape != (columns, columns):
        raise QuantInputError(f"gptq: a Hessian of shape {tuple(H.shape)} does not fit {columns} weight columns")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        scale, zero_point = scale[:, perm], zero_point[:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(work)
    except torch.linalg.LinAlgError:
        raise QuantInputError(
            f"gptq: the input Hessian is not positive definite after damping with damp={damp}; increase damp"
        ) from None

    codes = torch.zeros_like(W)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        W1 = W[:, start:end].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            w = W1[:, i]
            s, z = scale[:, column], zero_point[:, column]
            k = _round_to_grid(w, s, z, low, high)
            codes[:, column] = k
            err = (w - (k - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def _gptq_layer(layer: QuantWBIOL, hessian: Tensor, block_size: int, damp: float, act_order: bool) -> None:
    """Freeze the layer's grid, run GPTQ per group and write the dequantized weight."""
    freeze_weight_quantizer(layer)
    scale, zero_point, low, high = quantize_weight_tensors(layer)
    weight = layer.weight
    out_channels = weight.shape[0]
    W = weight.detach().reshape(out_channels, -1)
    S, Z = scale.reshape(out_channels, -1), zero_point.reshape(out_channels, -1)
    groups = hessian.shape[0]
    rows = out_channels // groups
    codes = torch.cat(
        [
            gptq_quantize_matrix(
                W[g * rows : (g + 1) * rows],
                hessian[g],
                S[g * rows : (g + 1) * rows],
                Z[g * rows : (g + 1) * rows],
                low,
                high,
                block_size=block_size,
                damp=damp,
                act_order=act_order,
            )
            for g in range(groups)
        ]
    )
    # Dequantize exactly as the quantizer does, in the weight's dtype and with its own tensors.
    new_weight = ((codes.to(weight.dtype) - Z) * S).reshape(weight.shape)
    with torch.no_grad():
        weight.copy_(new_weight)
    proxy = layer.weight_quant
    proxy.clear_cache()
    with torch.no_grad():
        requantized = proxy.tensor_quant(weight)[0]
    if not torch.equal(requantized, weight):
        raise QuantConfigError(
            f"{proxy.describe()}: the layer's quantizer does not reproduce the weights GPTQ put on its grid "
            f"(largest difference {float((requantized - weight).abs().max()):.3g}); its rounding is not "
            "round-half-to-even on grid points"
        )


def gptq(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    layers: Sequence[str | nn.Module] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    progress: bool = True,
    forward_fn: ForwardFn | None = None,
) -> nn.Module:
    """Quantize the weights of ``model``'s Linear / Conv1d / Conv2d quant layers with GPTQ.

    Layers are processed one after the other in the order the model first calls them on the
    first batch of ``data`` (found with forward pre-hooks; layers never called are skipped
    with a warning). For each layer the inputs it receives in the current model (earlier
    layers already GPTQ-quantized, every quantizer as configured) are captured over
    ``num_batches`` batches of ``data`` (``data`` is iterated once per layer plus once for the
    order: a list or a DataLoader, not a generator), passed through the layer's
    ``input_quant``, and accumulated in float64 into ``H = 2/N sum x x^T`` (per group for
    grouped and depthwise convolutions, over unfolded receptive fields for convolutions).
    Then the layer's weight quantizer is frozen at the grid of the original weight
    (:func:`~quantwire.algorithms.freeze.freeze_weight_quantizer`), its columns are quantized
    with GPTQ (:func:`gptq_quantize_matrix`: ``block_size``, ``damp`` times the mean Hessian
    diagonal, ``act_order`` = columns by descending Hessian diagonal) and the dequantized
    result is written into the weight; the frozen quantizer reproduces it exactly (checked).

    ``layers`` restricts the work to those sub-modules (qualified names or modules);
    by default every weight-quantized layer. ConvTranspose, Conv3d and other layer types and
    layers whose weight quantizer is disabled are skipped with a warning; a weight quantizer
    without an integer grid (minifloat, binary) or shared between layers raises
    :class:`~quantwire.errors.QuantConfigError` before anything changes. A layer called
    several times per forward pass contributes the inputs of its first call only.

    The model runs in eval mode throughout (activation quantizers use their calibrated
    scales: calibrate them first if the layers have input quantizers) and its modes are
    restored afterwards. Deterministic: no randomness is involved. Returns ``model``.
    """
    _check_options(block_size, damp)
    run = forward_fn or call_model
    selected = _select_layers(model, layers, "gptq")
    if not selected:
        return model
    try:
        with eval_mode(model):
            order = execution_order(model, [layer for _, layer in selected], data, run)
            called = set(order)
            for index, (name, _) in enumerate(selected):
                if index not in called:
                    warnings.warn(f"gptq: skipping {name}: the model's forward pass never calls it", stacklevel=2)
            for index in progress_bar(order, desc="gptq", total=len(order), enabled=progress):
                name, layer = selected[index]
                captured = capture(model, layer, data, num_batches, outputs=False, forward_fn=run)
                try:
                    hessian = input_hessian(layer, captured)
                except QuantInputError as error:
                    raise QuantInputError(f"gptq: {name}: {error}") from error
                del captured
                _gptq_layer(layer, hessian, block_size, damp, act_order)
    finally:
        # Quantizers rebuilt in eval mode take their proxy's restored mode.
        for _, layer in selected:
            layer.weight_quant.tensor_quant.train(layer.weight_quant.training)
    return model
