"""ONNX export of a fake-quantized model in QCDQ form, checked with onnxruntime.

Every integer quantizer of the model becomes ``QuantizeLinear -> Clip -> DequantizeLinear``
(QCDQ, as Brevitas exports it): ONNX ``QuantizeLinear`` only knows the full int8 / uint8
ranges, so a ``Clip`` in the integer domain restricts the codes to the quantizer's
``[min_int, max_int]`` whenever that is narrower (bit width below 8, or narrow range). A scale
per output channel (weights) or per channel of an activation becomes the ``axis`` attribute;
a scale per group of input channels (weights) or per token (dynamic activations) quantizes
the tensor reshaped to one row per group or token, with ``axis=0``. Everything else (Conv,
MatMul, Add, Softmax, LayerNorm, GELU, ...) stays a float ONNX op.

Exporter. This module uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``)
with a ``torch.autograd.Function`` whose ``symbolic`` emits the QCDQ nodes. The dynamo
exporter would need a ``torch.library`` custom op plus an onnxscript translation, and
onnxscript is not a dependency of quantwire (not installed here: ``dynamo=True`` fails with
``ModuleNotFoundError: onnxscript``). The TorchScript exporter is deprecated but present in
torch 2.x up to opset 20, needs nothing beyond ``onnx``, and traces the eager forward as it
is, so the quant layers need no export-specific code. Its deprecation warnings are silenced
for the duration of the call.

How a quantizer is exported. While exporting, every enabled proxy's ``tensor_quant`` is
replaced by a stand-in (:func:`onnx_export_mode`, which always puts the originals back). The
stand-in first runs the model once on the example input (the *probe*), recording what each
call of each quantizer computes, and plans that call:

- weights and biases (constants): their fake-quantized value is the float initializer in
  front of the QCDQ nodes, so that the codes ONNX computes are exactly the quantizer's,
  whatever produced them (rounding, AdaRound, pruning, folded BatchNorm). Binary and ternary
  weights export this way too (codes clipped to ``[-1, 1]``);
- quantizers of more than 8 bits on constants (an int16 / int32 bias) are exported as their
  float fake-quantized constant, without QCDQ (ONNX ``QuantizeLinear`` has no int32 type);
- activations with a fixed (calibrated or learned) scale and zero point: QCDQ with constant
  scale and zero point;
- dynamic activations (scale computed from each tensor, per tensor or per token): the
  quantizer's own scale computation is traced into float ONNX ops feeding QCDQ;
- FP8 E4M3 / E5M2 (OCP ``fn`` / IEEE-style, saturating): ``QuantizeLinear`` to
  ``float8e4m3fn`` / ``float8e5m2`` and back (opset 19, chosen automatically).

Each plan is checked against the quantizer on the probe input, bit for bit (except, with a
nonzero zero point, one code at exact ties: ONNX rounds ``x / scale`` half to even and then
adds the zero point, quantwire adds it first); a quantizer whose values QCDQ can not reproduce
raises :class:`ExportError` naming the layer: binary or ternary activations, other minifloat
formats, activations of more than 8 bits, rounding modes other than round-half-to-even on
activations, activation quantizers that were never calibrated. Nothing is ever silently
exported differently. Quantizer calls whose result feeds no output (a BERT pooler when only
the hidden states are returned) leave no nodes.

The model must be in eval mode; a model in training mode is refused (not switched), since
training mode changes what quantizers compute (statistics, QDrop, delays).

onnxruntime. Run as written (graph optimizations off, as the ``check`` of
:func:`export_onnx` runs it), the graph computes what the PyTorch model computes. The default
session optimizations of onnxruntime (measured with 1.32) rewrite QDQ graphs and change
results: ``WeightBiasQuantization`` quantizes the float bias of a Conv / Gemm whose inputs are
dequantized to int32 on the input x weight scale (visible at low bit widths: 6e-3 on a W4A4
CNN whose outputs reach 0.26; quantize biases with ``Int32Bias`` and PyTorch computes the
same, and the default session matches to 1e-8), int8 kernels replace float ones, and
``ReluQuantRewrite`` drops a ReLU in front of an FP8 ``QuantizeLinear`` (an onnxruntime bug:
FP8 codes are signed); ``GraphOptimizationLevel.ORT_DISABLE_ALL`` (or
``disabled_optimizers=["ReluQuantRewrite"]``) avoids the last.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantwire.core.function_wrapper import (
    OverBatchOverTensorView,
    OverChannelView,
    OverGroupView,
    OverTensorView,
    OverTokenView,
)
from quantwire.core.quant import (
    BinaryQuant,
    ClampedBinaryQuant,
    FloatQuant,
    PrescaledIntQuant,
    RescalingIntQuant,
    TernaryQuant,
)
from quantwire.core.scaling import StatsScaling
from quantwire.core.stats.sources import RuntimeStats
from quantwire.core.zero_point import StatsZeroPoint
from quantwire.errors import ExportError
from quantwire.files import atomic_write
from quantwire.function.int_range import max_int, min_int
from quantwire.proxy import ActQuantProxyFromInjector, QuantProxyFromInjector, WeightQuantProxyFromInjector

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportSession",
    "export_onnx",
    "max_abs_error",
    "onnx_export_mode",
    "run_onnxruntime",
]

DEFAULT_OPSET = 17
"""Opset used when none is given (19 when the model has FP8 quantizers)."""
_MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
_FLOAT8_OPSET = 19  # float8 QuantizeLinear / DequantizeLinear
_MAX_OPSET = 20  # the TorchScript exporter's newest opset

_SIGN_QUANTS = (BinaryQuant, ClampedBinaryQuant, TernaryQuant)
_INT_QUANTS = (RescalingIntQuant, PrescaledIntQuant)
# Minifloat formats ONNX has: (exponent bits, mantissa bits, bias, has_inf, has_nan) -> dtype.
_FLOAT8_FORMATS = {
    (4, 3, 7, False, True): torch.float8_e4m3fn,
    (5, 2, 15, True, True): torch.float8_e5m2,
}
_CODE_TYPES = {
    "int8": torch.int8,
    "uint8": torch.uint8,
    "float8e4m3fn": torch.float8_e4m3fn,
    "float8e5m2": torch.float8_e5m2,
}
_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


# -- the QCDQ op ----------------------------------------------------------------------------------


def _along(t: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """A 0-d or 1-d quantization parameter shaped to broadcast against ``x`` along ``axis``."""
    if axis is None:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


class _QCDQFunction(torch.autograd.Function):
    """``DequantizeLinear(Clip(QuantizeLinear(x)))``: computed in PyTorch with ONNX's
    semantics (so that tracing sees the exported values), emitted as the three ONNX nodes."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, low: float, high: float, code_type: str, axis: Any
    ) -> Tensor:
        s = _along(scale, x, axis)
        if code_type.startswith("float8"):
            codes = torch.clamp(x / s, low, high).to(_CODE_TYPES[code_type])
            return codes.to(x.dtype) * s
        z = _along(zero_point, x, axis).to(x.dtype)
        codes = torch.clamp(torch.round(x / s) + z, low, high)
        return (codes - z) * s

    @staticmethod
    def symbolic(
        g: Any, x: Any, scale: Any, zero_point: Any, low: float, high: float, code_type: str, axis: Any
    ) -> Any:
        attributes = {} if axis is None else {"axis_i": axis}
        codes = g.op("QuantizeLinear", x, scale, zero_point, **attributes)
        if code_type in _INT_RANGES and (low, high) != _INT_RANGES[code_type]:
            dtype = _CODE_TYPES[code_type]
            bounds = [g.op("Constant", value_t=torch.tensor(int(v), dtype=dtype)) for v in (low, high)]
            codes = g.op("Clip", codes, *bounds)
        return g.op("DequantizeLinear", codes, scale, zero_point, **attributes)


@dataclass(frozen=True)
class _Codes:
    """The ONNX type a quantizer's codes take and the range they are clipped to."""

    code_type: str
    low: float
    high: float

    @property
    def is_float8(self) -> bool:
        return self.code_type.startswith("float8")


@dataclass(frozen=True)
class _Layout:
    """How the scale lies over the tensor: one value (``axis`` None), one per index of
    ``axis``, or (``group`` set) one per row of ``group`` consecutive elements along ``axis``
    (per-group weights, per-token activations), exported with the tensor reshaped to rows."""

    axis: int | None = None
    group: int | None = None

    @property
    def onnx_axis(self) -> int | None:
        if self.axis is None:
            return None
        return 0 if self.group is not None else self.axis

    def rows(self, x: Tensor) -> Tensor:
        """``x`` as the QCDQ nodes see it."""
        if self.group is None:
            return x
        # Non-negative dims: the TorchScript exporter writes negative ones into Transpose's perm.
        return x.movedim(self.axis, x.dim() - 1).reshape(-1, self.group)

    def unrows(self, y: Tensor, x: Tensor) -> Tensor:
        """The QCDQ output back in ``x``'s shape."""
        if self.group is None:
            return y
        last = x.dim() - 1
        return y.reshape(x.movedim(self.axis, last).shape).movedim(last, self.axis)

    def parameter(self, t: Tensor, x: Tensor) -> Tensor:
        """A scale or zero point (broadcasting against ``x``) as the 0-d or 1-d ONNX input."""
        if self.axis is None:
            return t.reshape(())
        if self.group is None:
            target = [1] * x.dim()
            target[self.axis] = x.shape[self.axis]
            return t.expand(target).reshape(-1)
        return self.rows(t.expand(x.shape))[:, 0]


def _qcdq(x: Tensor, scale: Tensor, zero_point: Tensor, codes: _Codes, layout: _Layout) -> Tensor:
    """``x`` through QCDQ with ``scale`` and ``zero_point`` (broadcasting against ``x``)."""
    s = layout.parameter(scale.to(x.dtype), x)
    z = layout.parameter(zero_point.to(x.dtype), x)
    # ONNX zero points are typed like the codes; a minifloat's is always 0.
    z = (torch.zeros_like(z) if codes.is_float8 else torch.round(z)).to(_CODE_TYPES[codes.code_type])
    y = _QCDQFunction.apply(layout.rows(x), s, z, codes.low, codes.high, codes.code_type, layout.onnx_axis)
    return layout.unrows(y, x)


# -- what each quantizer exports to ----------------------------------------------------------------


def _int_codes(tensor_quant: nn.Module, bit_width: Tensor) -> _Codes | None:
    """Integer codes of an integer quantizer, None when wider than 8 bits."""
    int_quant = tensor_quant.int_quant
    if float(bit_width) > 8:
        return None
    low = float(min_int(int_quant.signed, int_quant.narrow_range, bit_width))
    high = float(max_int(int_quant.signed, int_quant.narrow_range, bit_width))
    return _Codes("int8" if int_quant.signed else "uint8", low, high)


def _float8_codes(tensor_quant: FloatQuant, outputs: tuple[Tensor, ...], where: str) -> _Codes:
    """FP8 codes of a minifloat quantizer whose format ONNX has, else :class:`ExportError`."""
    exponent, mantissa, bias = (int(t) for t in outputs[3:6])
    key = (exponent, mantissa, bias, tensor_quant.has_inf, tensor_quant.has_nan)
    dtype = _FLOAT8_FORMATS.get(key)
    if dtype is None or not tensor_quant.signed or not tensor_quant.saturating:
        raise ExportError(
            f"{where}: minifloat E{exponent}M{mantissa} (bias {bias}, has_inf={tensor_quant.has_inf}, "
            f"has_nan={tensor_quant.has_nan}, signed={tensor_quant.signed}, saturating={tensor_quant.saturating}) "
            "has no ONNX type; only saturating OCP FP8 E4M3 (fn) and E5M2 export"
        )
    code_type = "float8e4m3fn" if dtype == torch.float8_e4m3fn else "float8e5m2"
    limit = torch.finfo(dtype).max
    return _Codes(code_type, -limit, limit)


def _codes(tensor_quant: nn.Module, outputs: tuple[Tensor, ...], constant: bool, where: str) -> _Codes | None:
    """The codes one quantizer exports to (None: a constant wider than 8 bits, exported as
    its float value); :class:`ExportError` for quantizers with no QCDQ equivalent."""
    if isinstance(tensor_quant, _INT_QUANTS):
        codes = _int_codes(tensor_quant, outputs[3])
        if codes is None and not constant:
            raise ExportError(
                f"{where}: {int(outputs[3])}-bit activations have no ONNX QuantizeLinear type (at most 8 bits)"
            )
        return codes
    if isinstance(tensor_quant, FloatQuant):
        return _float8_codes(tensor_quant, outputs, where)
    if isinstance(tensor_quant, _SIGN_QUANTS):
        if not constant:
            raise ExportError(
                f"{where}: {type(tensor_quant).__name__} on activations (a sign threshold) has no QuantizeLinear "
                "equivalent; binary and ternary quantizers export on weights only"
            )
        return _Codes("int8", -1.0, 1.0)
    raise ExportError(f"{where}: quantizer core {type(tensor_quant).__name__} has no QCDQ export")


def _stats_views(tensor_quant: nn.Module) -> list[nn.Module]:
    """The views of the statistics a quantizer computes from its input on every call."""
    return [m.stats.view for m in tensor_quant.modules() if isinstance(m, StatsScaling | StatsZeroPoint)]


def _check_calibrated(tensor_quant: nn.Module, where: str) -> None:
    """:class:`ExportError` if an activation statistic was never collected (in eval mode the
    quantizer would then take the statistic of each input)."""
    for module in tensor_quant.modules():
        if isinstance(module, RuntimeStats):
            module.sync_counter()
            if module.counter == 0:
                raise ExportError(
                    f"{where}: the activation quantizer has collected no statistics; run "
                    "quantwire.calibrate(model, batches) (or train) before exporting"
                )


def _static_layout(outputs: tuple[Tensor, ...], x: Tensor, tensor_quant: nn.Module, where: str) -> _Layout:
    """The layout of a fixed scale and zero point, read from their shapes."""
    scale, zero_point = outputs[1], outputs[2]
    if scale.numel() == 1 and zero_point.numel() == 1:
        return _Layout()
    try:
        shape = torch.broadcast_shapes(scale.shape, zero_point.shape)
        if len(shape) > x.dim() or torch.broadcast_shapes(shape, x.shape) != x.shape:
            raise RuntimeError
    except RuntimeError:
        raise ExportError(
            f"{where}: scale {tuple(scale.shape)} / zero point {tuple(zero_point.shape)} do not broadcast "
            f"onto the tensor {tuple(x.shape)}"
        ) from None
    shape = (1,) * (x.dim() - len(shape)) + tuple(shape)
    varying = [dim for dim, size in enumerate(shape) if size > 1]
    if len(varying) == 1:
        return _Layout(axis=varying[0])
    groups = [m for m in tensor_quant.modules() if isinstance(m, OverGroupView)]
    if groups:
        return _Layout(axis=groups[0].group_dim % x.dim(), group=groups[0].group_size)
    raise ExportError(f"{where}: a scale of shape {tuple(scale.shape)} has no QuantizeLinear layout")


def _view_layout(view: nn.Module, x: Tensor) -> _Layout:
    """The layout of a scale computed over ``view`` of each input (dynamic quantization)."""
    if isinstance(view, OverTensorView):
        return _Layout()
    if isinstance(view, OverTokenView):
        return _Layout(axis=x.dim() - 1, group=x.shape[-1])
    if isinstance(view, OverGroupView):
        return _Layout(axis=view.group_dim % x.dim(), group=view.group_size)
    if isinstance(view, OverBatchOverTensorView):
        return _Layout(axis=0)
    if isinstance(view, OverChannelView):
        return _Layout(axis=view.channel_dim % x.dim())
    raise ValueError(type(view).__name__)


def _dynamic_layout(tensor_quant: nn.Module, x: Tensor, where: str) -> _Layout:
    """The layout shared by a dynamic quantizer's scale and zero point."""
    if isinstance(tensor_quant, torch.jit.ScriptModule):
        raise ExportError(
            f"{where}: a dynamic quantizer compiled by TorchScript (QUANTWIRE_JIT=1) can not be traced by the ONNX "
            "exporter; export with QUANTWIRE_JIT unset"
        )
    try:
        layouts = {_view_layout(view, x) for view in _stats_views(tensor_quant)} - {_Layout()}
    except ValueError as error:
        raise ExportError(f"{where}: dynamic statistics over {error} have no QuantizeLinear layout") from None
    if len(layouts) > 1:
        raise ExportError(f"{where}: the dynamic scale and zero point vary over different dimensions")
    return layouts.pop() if layouts else _Layout()


def _near_ties(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Where ``x / scale`` is within float rounding of a half-integer: there ONNX (round, then
    add the zero point) and quantwire (add, then round) may round a tie differently."""
    y = x / scale
    tolerance = 1e-6 * (1.0 + (y + zero_point).abs())
    return ((y - torch.floor(y)) - 0.5).abs() <= tolerance


class _Plan:
    """How one call of a quantizer is exported.

    ``codes`` None: the recorded ``value`` (a constant), as it is. Otherwise QCDQ of ``value``
    (a constant: the fake-quantized weight) or, when ``value`` is None, of the traced input,
    with the recorded scale and zero point, or (``dynamic``) with those the original
    quantizer computes in the trace. ``metadata`` are the quantizer's other outputs on the
    probe (scale, zero point, bit width...), ``shape`` the shape of its input.
    """

    def __init__(
        self,
        outputs: tuple[Tensor, ...],
        shape: tuple[int, ...],
        codes: _Codes | None,
        layout: _Layout,
        constant: bool = False,
        dynamic: bool = False,
    ) -> None:
        self.value = outputs[0].detach().clone() if constant else None
        self.metadata = tuple(t.detach().clone() for t in outputs[1:])
        self.shape = shape
        self.codes = codes
        self.layout = layout
        self.dynamic = dynamic

    def run(self, x: Tensor, original: nn.Module, extra: tuple[Any, ...]) -> tuple[Tensor, ...]:
        """The quantizer's outputs, with the value computed through QCDQ."""
        if self.codes is None:
            return (self.value, *self.metadata)
        metadata = original(x, *extra)[1:] if self.dynamic else self.metadata
        source = x if self.value is None else self.value
        return (_qcdq(source, metadata[0], metadata[1], self.codes, self.layout), *metadata)

    def verify(self, x: Tensor, outputs: tuple[Tensor, ...], where: str) -> None:
        """:class:`ExportError` unless QCDQ gives the quantizer's value ``outputs[0]`` on the
        probe input ``x``, bit for bit except one code at exact or near ties of an integer
        quantizer (see :func:`_near_ties`)."""
        expected, scale, zero_point = outputs[:3]
        source = x if self.value is None else self.value
        got = _qcdq(source, scale, zero_point, self.codes, self.layout)
        same = (got == expected) | (torch.isnan(got) & torch.isnan(expected))
        if not self.codes.is_float8 and not bool(same.all()):
            same |= ((got - expected).abs() <= 1.001 * scale) & _near_ties(source, scale, zero_point)
        if not bool(same.all()):
            wrong = int((~same).sum())
            worst = float((got - expected).abs().nan_to_num(float("inf")).max())
            raise ExportError(
                f"{where}: QuantizeLinear/DequantizeLinear can not reproduce this quantizer ({wrong} of "
                f"{expected.numel()} values differ on the example input, by up to {worst:.3g}); its rounding or "
                "range has no ONNX equivalent"
            )


class _StandIn(nn.Module):
    """Takes the place of one proxy's ``tensor_quant`` while exporting.

    While ``probing`` it returns what the original computes and plans each call; afterwards
    each call (in the same order: a forward pre-hook on the model rewinds ``position``) is
    exported as planned.
    """

    def __init__(self, proxy: QuantProxyFromInjector, name: str) -> None:
        super().__init__()
        self.original = proxy.tensor_quant
        self.where = f"{name} ({proxy.describe()})"
        self.constant = not isinstance(proxy, ActQuantProxyFromInjector)
        self.dynamic = not self.constant and bool(_stats_views(self.original))
        self.probing = True
        self.plans: list[_Plan] = []
        self.position = 0

    def forward(self, x: Tensor, *extra: Any) -> tuple[Tensor, ...]:
        if self.probing:
            outputs = self.original(x, *extra)
            self.plans.append(self._plan(x, outputs))
            return outputs
        return self._next_plan(x).run(x, self.original, extra)

    def _next_plan(self, x: Tensor) -> _Plan:
        """The plan of this call, checked to be the call the probe saw."""
        if self.position >= len(self.plans):
            raise ExportError(
                f"{self.where}: called more often while tracing than on the example input ({len(self.plans)} times)"
            )
        plan = self.plans[self.position]
        if tuple(x.shape) != plan.shape:
            raise ExportError(
                f"{self.where}: call {self.position} quantizes a tensor of shape {tuple(x.shape)} while tracing "
                f"but {plan.shape} on the example input"
            )
        self.position += 1
        return plan

    def _plan(self, x: Tensor, outputs: tuple[Tensor, ...]) -> _Plan:
        """Plan one call (:class:`ExportError` when it has no QCDQ form) and verify it."""
        codes = _codes(self.original, outputs, self.constant, self.where)
        if self.dynamic:
            layout = _dynamic_layout(self.original, x, self.where)
        else:
            if not self.constant:
                _check_calibrated(self.original, self.where)
            layout = _static_layout(outputs, x, self.original, self.where)
        plan = _Plan(outputs, tuple(x.shape), codes, layout, constant=self.constant, dynamic=self.dynamic)
        if codes is not None:
            plan.verify(x, outputs, self.where)
        return plan

    def finish_probe(self) -> None:
        """From now on, export the calls as planned."""
        self.probing = False
        self.position = 0


# -- export mode ----------------------------------------------------------------------------------

# What export mode changes on each proxy, put back on exit: the quantizer, the gradient
# quantizer (an autograd function the exporter can not trace; no gradient flows in export),
# the weight cache and the last QuantTensor an activation proxy returned.
_PROXY_MODULES = ("tensor_quant", "grad_tensor_quant")
_PROXY_ATTRIBUTES = ("_last", "_cache", "_cache_key", "_state_tensors", "cache_inference_quant_weight")


@dataclass
class ExportSession:
    """What :func:`onnx_export_mode` yields: the model's output on the example input (computed
    by the real quantizers) and the stand-in of each quantizer, by proxy name."""

    reference: Any
    stand_ins: dict[str, _StandIn]

    def rewind(self) -> None:
        """Start a forward pass: each quantizer's next call is its first."""
        for stand_in in self.stand_ins.values():
            stand_in.position = 0

    def qcdq_calls(self) -> dict[str, int]:
        """How many QCDQ node triples each quantizer exports to, by proxy name (calls of
        quantizers exported as constants are not counted)."""
        calls = {name: sum(p.codes is not None for p in s.plans) for name, s in self.stand_ins.items()}
        return {name: count for name, count in calls.items() if count}

    def check_calls(self) -> None:
        """:class:`ExportError` unless the trace called every quantizer as often as the probe."""
        for stand_in in self.stand_ins.values():
            if stand_in.position != len(stand_in.plans):
                raise ExportError(
                    f"{stand_in.where}: called {stand_in.position} times while tracing but "
                    f"{len(stand_in.plans)} times on the example input"
                )


def _require_eval(model: nn.Module) -> None:
    """:class:`ExportError` naming a module in training mode, if any."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ExportError(
            f"export needs the model in eval mode, but {training[0]!r} (and {len(training) - 1} other modules) "
            "is in training mode; call model.eval() (after calibration) first"
        )


def _enabled_proxies(model: nn.Module) -> list[tuple[str, QuantProxyFromInjector]]:
    """The proxies that quantize (not disabled), by qualified name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, QuantProxyFromInjector) and not m.disable_quant and m.tensor_quant is not None
    ]


def _as_args(example_input: Any) -> tuple[Any, ...]:
    """The example input as the positional arguments of the model's forward."""
    return tuple(example_input) if isinstance(example_input, tuple | list) else (example_input,)


def _snapshot(proxy: QuantProxyFromInjector) -> tuple[dict[str, Any], dict[str, Any]]:
    """The proxy's modules and attributes that export mode changes."""
    modules = {key: proxy._modules[key] for key in _PROXY_MODULES if key in proxy._modules}
    attributes = {key: proxy.__dict__[key] for key in _PROXY_ATTRIBUTES if key in proxy.__dict__}
    return modules, attributes


def _restore(proxy: QuantProxyFromInjector, modules: dict[str, Any], attributes: dict[str, Any]) -> None:
    """Put back what :func:`_snapshot` saved, in place (state dict keys keep their order)."""
    proxy._modules.update(modules)
    for key in _PROXY_ATTRIBUTES:
        proxy.__dict__.pop(key, None)
    proxy.__dict__.update(attributes)


def _install(proxy: QuantProxyFromInjector, stand_in: _StandIn) -> None:
    """Route the proxy's quantization through ``stand_in``, uncached."""
    if isinstance(proxy, WeightQuantProxyFromInjector):
        proxy.cache_inference_quant_weight = False
    proxy.clear_cache()
    proxy._modules["tensor_quant"] = stand_in
    if "grad_tensor_quant" in proxy._modules:
        proxy._modules["grad_tensor_quant"] = None


@contextlib.contextmanager
def onnx_export_mode(model: nn.Module, example_input: Any) -> Iterator[ExportSession]:
    """Within this context, ``model``'s quantizers trace as QCDQ ONNX nodes.

    On entry the model (eval mode required, else :class:`ExportError`) runs once on
    ``example_input`` (a tensor or a tuple of positional arguments) with its real quantizers,
    and every quantizer call is planned and verified (:class:`ExportError` naming the layer
    when it has no QCDQ form). On exit, however the body ends, every quantizer, cache and hook
    is put back: the model computes exactly what it computed before, with the same state.
    """
    _require_eval(model)
    saved: list[tuple[QuantProxyFromInjector, dict[str, Any], dict[str, Any]]] = []
    hook = None
    try:
        stand_ins = {}
        for name, proxy in _enabled_proxies(model):
            stand_in = _StandIn(proxy, name)
            saved.append((proxy, *_snapshot(proxy)))
            _install(proxy, stand_in)
            stand_ins[name] = stand_in
        with torch.no_grad():
            reference = model(*_as_args(example_input))
        for stand_in in stand_ins.values():
            stand_in.finish_probe()
        session = ExportSession(reference, stand_ins)
        hook = model.register_forward_pre_hook(lambda module, args: session.rewind())
        yield session
    finally:
        if hook is not None:
            hook.remove()
        for proxy, modules, attributes in reversed(saved):
            _restore(proxy, modules, attributes)


# -- export_onnx ----------------------------------------------------------------------------------


def _flatten(output: Any) -> list[Tensor]:
    """The tensors of a model output (tensor, tuple, list, dict, HF ModelOutput), in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in _flatten(item)]
    return []


def _opset(model: nn.Module, opset_version: int | None) -> int:
    """The opset to export with: the default (19 with FP8), or the one asked for if it can."""
    has_float8 = any(isinstance(p.tensor_quant, FloatQuant) for _, p in _enabled_proxies(model))
    needed = _FLOAT8_OPSET if has_float8 else _MIN_OPSET
    if opset_version is None:
        return max(DEFAULT_OPSET, needed)
    if not needed <= opset_version <= _MAX_OPSET:
        what = "FP8 QuantizeLinear" if has_float8 else "per-axis QuantizeLinear"
        raise ExportError(
            f"opset_version={opset_version}: {what} needs opset >= {needed}, and the TorchScript exporter "
            f"goes up to {_MAX_OPSET}"
        )
    return opset_version


def _names(given: Sequence[str] | None, count: int, stem: str) -> list[str]:
    """``given`` (checked to name ``count`` tensors), or ``stem`` / ``stem_0``, ``stem_1``, ..."""
    if given is not None:
        if len(given) != count:
            raise ExportError(f"{len(given)} {stem} names given for {count} {stem}s")
        return list(given)
    return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]


def _trace(model: nn.Module, args: tuple[Any, ...], target: Path, opset: int, names: dict[str, Any]) -> None:
    """``torch.onnx.export`` with the TorchScript exporter, its deprecation noise silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(model, args, str(target), dynamo=False, opset_version=opset, **names)


def _constants_to_initializers(path: Path) -> None:
    """Move the graph's constant tensors (weights, scales, zero points, clip bounds) from
    ``Constant`` nodes, where the tracer puts them, to initializers, where tools expect them."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    kept = []
    for node in graph.node:
        value = [a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
        if node.op_type == "Constant" and len(node.attribute) == 1 and value:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(model, str(path))


def run_onnxruntime(path: str | os.PathLike[str], args: Any) -> list[Any]:
    """onnxruntime's outputs for ``args`` (a tensor or a tuple, fed to the graph's inputs in
    order), with graph optimizations off: the graph as written (see the module doc)."""
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - onnxruntime is an optional dependency
        raise ExportError("checking the export needs onnxruntime (pip install 'quantwire[onnx]')") from error
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tensors = [a for a in _as_args(args) if isinstance(a, Tensor)]
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), tensors, strict=False)}
    return session.run(None, feeds)


def _paired(expected: Any, got: Sequence[Any]) -> list[tuple[Tensor, Tensor]]:
    """PyTorch's output tensors (any nesting) paired with onnxruntime's, as float64."""
    tensors = _flatten(expected)
    if len(tensors) != len(got):
        raise ExportError(f"the ONNX graph has {len(got)} outputs, PyTorch gave {len(tensors)}")
    return [(t.detach().cpu().double(), torch.as_tensor(g).double()) for t, g in zip(tensors, got, strict=True)]


def max_abs_error(expected: Any, got: Sequence[Any]) -> float:
    """The largest absolute difference between a PyTorch output (any nesting) and
    onnxruntime's list of outputs; :class:`ExportError` if they do not pair up."""
    return max((float((g - t).abs().max()) for t, g in _paired(expected, got) if t.numel()), default=0.0)


def _check(expected: Any, got: Sequence[Any], atol: float, rtol: float, path: Path) -> None:
    """:class:`ExportError` unless every output is within ``atol + rtol * max|output|``."""
    for index, (t, g) in enumerate(_paired(expected, got)):
        if not t.numel():
            continue
        error, allowed = float((g - t).abs().max()), atol + rtol * float(t.abs().max())
        if not error <= allowed:
            raise ExportError(
                f"onnxruntime's output {index} differs from PyTorch's by up to {error:.3g}, more than "
                f"atol + rtol * max|output| = {allowed:.3g} (atol={atol:g}, rtol={rtol:g}); {str(path)!r} was not "
                "written"
            )


def export_onnx(
    qmodel: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    opset_version: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 0.1,
) -> Path:
    """Export the eval-mode fake-quantized ``qmodel`` to ONNX at ``path``, in QCDQ form.

    ``example_input`` is a tensor or a tuple of the forward's positional arguments.
    ``opset_version`` defaults to :data:`DEFAULT_OPSET` (19 when FP8 quantizers are present).
    ``dynamic_batch`` makes dimension 0 of every input and output symbolic.

    With ``check``, onnxruntime runs the exported graph on ``example_input`` (graph
    optimizations off) and :class:`ExportError` is raised, ``path`` left untouched, when an
    output differs from PyTorch's by more than ``atol + rtol * max|output|``. A graph that
    reproduces the model differs by float rounding (~1e-7 relative) until a different float
    accumulation order (onnxruntime's Conv, Gemm, BatchNormalization kernels against
    PyTorch's) moves a value across a rounding boundary of a quantizer: that code then
    differs by one, and in a deep network the difference spreads through later quantizers.
    On a random ResNet-18 at W8A8 this reaches 8% of the output range, as much as PyTorch
    differs from itself run in float64 (8.4%); the default ``rtol`` allows it. Errors of the
    export itself are caught per quantizer, bit for bit, before tracing.

    The file is written next to ``path`` and moved there atomically. Returns ``path``.
    """
    path = Path(path)
    args = _as_args(example_input)
    settings = _ExportSettings(
        path, _opset(qmodel, opset_version), input_names, output_names, dynamic_batch, check, atol, rtol
    )
    try:
        atomic_write(path, lambda temporary: _write_checked(qmodel, args, temporary, settings))
    except OSError as error:
        raise ExportError(f"can not write the ONNX file {str(path)!r}: {error}") from error
    return path


@dataclass(frozen=True)
class _ExportSettings:
    """The arguments of one :func:`export_onnx` call that say what to write and how to check it."""

    path: Path
    opset: int
    input_names: Sequence[str] | None
    output_names: Sequence[str] | None
    dynamic_batch: bool
    check: bool
    atol: float
    rtol: float


def _write_checked(qmodel: nn.Module, args: tuple[Any, ...], target: Path, settings: _ExportSettings) -> None:
    """Trace ``qmodel`` into the ONNX file ``target`` (the temporary file that becomes
    ``settings.path``) and, if asked, compare onnxruntime's outputs on ``args`` with PyTorch's
    (:class:`ExportError` when they differ too much)."""
    with onnx_export_mode(qmodel, args) as session:
        inputs = _names(settings.input_names, len(args), "input")
        outputs = _names(settings.output_names, len(_flatten(session.reference)), "output")
        axes = {name: {0: "batch"} for name in [*inputs, *outputs]} if settings.dynamic_batch else None
        names = {"input_names": inputs, "output_names": outputs, "dynamic_axes": axes}
        _trace(qmodel, args, target, settings.opset, names)
        session.check_calls()
    _constants_to_initializers(target)
    if settings.check:
        reference, got = session.reference, run_onnxruntime(target, args)
        _check(reference, got, settings.atol, settings.rtol, settings.path)
