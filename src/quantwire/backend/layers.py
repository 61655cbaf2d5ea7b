"""Integer twins of quantwire's quant layers.

Each twin computes its matrix product as an :class:`~quantwire.backend.ops.IntMatMul` on the
integer codes of its (frozen) quantizers and rescales the accumulator with fixed-point
integers (:class:`~quantwire.backend.ops.MulShift`, or :class:`~quantwire.backend.ops.MulQuant`
when the layer quantizes its output). Between twins, tensors are real numbers in float64 (the
rescaled high-precision outputs): the modules around them (reshapes, float nonlinearities,
the forward of a converted block) run unchanged. A twin keeps the call signature of the layer
it replaces, so no model needs its own conversion code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quantwire.backend.fixed_point import BackendError, FixedPoint, fixed_point, fractional_bits_for
from quantwire.backend.ops import IntMatMul, MulQuant, MulShift, Quantize, integer_range
from quantwire.proxy.base import QuantProxyFromInjector
from quantwire.quant_tensor import IntQuantTensor

_EXACT_FLOAT32 = 2**24

__all__ = ["FixedPointSpec", "Grid", "IntegerAdd", "IntegerWBIOL", "activation_grid", "fixed_rescale", "integer_wbiol"]


@dataclass(frozen=True)
class FixedPointSpec:
    """How rescales become fixed point: ``swl`` total bits; ``sfl`` fractional bits (None:
    the most that fit ``swl`` for each layer's multipliers and bias)."""

    swl: int = 32
    sfl: int | None = None
    accumulator_bits: int = 32
    overflow: str = "raise"


@dataclass(frozen=True)
class Grid:
    """A static integer grid: ``real = scale * (code - zero_point)``, codes in ``[qmin, qmax]``."""

    scale: Tensor
    zero_point: Tensor
    bit_width: int
    signed: bool
    qmin: int
    qmax: int

    def quantize(self, name: str, codes_dtype: torch.dtype = torch.float64) -> Quantize:
        return Quantize(self.scale, self.zero_point, self.qmin, self.qmax, name, codes_dtype)

    @property
    def codes_dtype(self) -> torch.dtype:
        """The narrowest floating dtype holding every code and every code minus the zero point
        exactly: float32 while they are integers within ``2**24``, float64 otherwise."""
        integer_zero_point = bool(torch.equal(self.zero_point, self.zero_point.round()))
        within = max(abs(self.qmin), abs(self.qmax), self.largest_code) <= _EXACT_FLOAT32
        return torch.float32 if integer_zero_point and within else torch.float64

    @property
    def largest_code(self) -> float:
        """The largest ``|code - zero_point|``."""
        zero = self.zero_point.double()
        return float(torch.maximum((self.qmin - zero).abs(), (self.qmax - zero).abs()).max())

    @property
    def exact_scale(self) -> bool:
        """Whether every scale is a power of two."""
        scale = self.scale.double()
        return bool(torch.equal(torch.exp2(torch.log2(scale).round()), scale))


def _narrow_range(proxy: QuantProxyFromInjector) -> bool:
    int_quant = getattr(proxy.tensor_quant, "int_quant", None)
    return bool(getattr(int_quant, "narrow_range", False))


def _grid_from(quant: Any, proxy: QuantProxyFromInjector, name: str) -> Grid:
    if not isinstance(quant, IntQuantTensor):
        raise BackendError(
            f"{name}: {proxy.describe()} does not quantize to integers ({type(quant).__name__}); "
            "the integer backend runs integer quantizers only"
        )
    bit_width = int(quant.bit_width)
    qmin, qmax = integer_range(bool(quant.signed), _narrow_range(proxy), bit_width)
    return Grid(
        quant.scale.detach().double(), quant.zero_point.detach().double(), bit_width, bool(quant.signed), qmin, qmax
    )


def activation_grid(proxy: QuantProxyFromInjector, name: str, probe: Tensor | None = None) -> Grid:
    """The static grid of an activation quantizer (frozen after calibration). A quantizer whose
    scale follows each input (dynamic quantization) has no static grid: refused."""
    if proxy.training:
        raise BackendError(f"{name}: {proxy.describe()} is in training mode; call model.eval() first")
    if probe is None:
        probe = torch.zeros(1)
    with torch.no_grad():
        first = proxy(probe)
        second = proxy(probe + 1000.0 * torch.randn_like(probe))
    grid = _grid_from(first, proxy, name)
    if not torch.equal(first.scale, second.scale) or not torch.equal(first.zero_point, second.zero_point):
        raise BackendError(
            f"{name}: {proxy.describe()} computes its scale from each input (dynamic quantization); the integer "
            "backend needs static scales (calibrate a static quantizer instead)"
        )
    return grid


def fixed_rescale(
    multiplier: Tensor, bias: Tensor | None, spec: FixedPointSpec, name: str
) -> tuple[FixedPoint, FixedPoint]:
    """Multiplier and bias as fixed point sharing one ``sfl``.

    The multiplier is a ``swl``-bit integer (``sfl=None``: the most fractional bits with which
    the largest multiplier fits). The bias is added to the product ``acc * M``, in the product's
    register (int64), so it takes the same ``sfl`` and up to 63 bits: a large bias does not cost
    the multiplier its precision."""
    bias = torch.zeros(()) if bias is None else bias
    sfl = spec.sfl if spec.sfl is not None else fractional_bits_for(multiplier, spec.swl)
    return (
        fixed_point(multiplier, spec.swl, sfl, f"{name} multiplier"),
        fixed_point(bias, _PRODUCT_BITS, sfl, f"{name} bias"),
    )


_PRODUCT_BITS = 63
"""Signed bits of the register holding ``acc * M + B`` (int64)."""


class IntegerWBIOL(nn.Module):
    """The integer twin of a Linear / Conv quant layer: ``Quantize`` (input codes),
    ``IntMatMul`` (exact integer product with the weight codes), then ``MulShift`` (real output,
    BatchNorm folded in when one follows) or ``MulQuant`` + dequantization when the layer
    quantizes its output. The codes travel as float32 when the input grid fits it (the product
    then runs in float32, see :class:`~quantwire.backend.ops.IntMatMul`); real values in the
    input's dtype (float64 in a converted model)."""

    def __init__(
        self,
        name: str,
        input_grid: Grid,
        matmul: IntMatMul,
        rescale: MulShift | MulQuant,
        output_grid: Grid | None,
        channel_dim: int,
    ) -> None:
        super().__init__()
        self.name = name
        self.quantize = input_grid.quantize(f"{name}.quantize", input_grid.codes_dtype)
        self.register_buffer("input_zero_point", input_grid.zero_point.clone())
        # static: a grid without zero point needs no subtraction (and no pass over the codes)
        self.zero_point_free = not bool(input_grid.zero_point.any())
        self.matmul = matmul
        self.rescale = rescale
        self.channel_dim = channel_dim
        self.output_grid = output_grid
        self.input_grid = input_grid

    def codes(self, x: Tensor) -> Tensor:
        """The integer codes this layer's product consumes (zero point removed), in the
        quantizer's codes dtype."""
        codes = self.quantize(x)
        if self.zero_point_free:
            return codes
        return codes - self.input_zero_point.to(codes.dtype)

    def forward(self, x: Tensor) -> Tensor:
        accumulator = self.matmul(self.codes(x))
        out = self.rescale(accumulator)
        if self.output_grid is None:
            return out
        scale = _view(self.output_grid.scale, out, self.channel_dim)
        if not self.output_grid.zero_point.any():
            return out * scale
        zero = _view(self.output_grid.zero_point, out, self.channel_dim)
        return (out - zero).mul_(scale)


def _view(tensor: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    if tensor.numel() == 1:
        return tensor.reshape(())
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return tensor.reshape(shape)


_OPS = {
    "QuantLinear": "linear",
    "QuantConv1d": "conv1d",
    "QuantConv2d": "conv2d",
    "QuantConv3d": "conv3d",
}


def integer_wbiol(
    layer: nn.Module, name: str, spec: FixedPointSpec, batch_norm: nn.Module | None = None
) -> IntegerWBIOL:
    """The integer twin of ``layer`` (a frozen QuantLinear / QuantConv*), with ``batch_norm``
    (an eval-mode BatchNorm fed only by this layer) folded into the rescale."""
    op = next((op for cls, op in _OPS.items() if any(c.__name__ == cls for c in type(layer).__mro__)), None)
    if op is None:
        raise BackendError(f"{name}: no integer twin for {type(layer).__name__}")
    if layer.input_quant is None or layer.weight_quant is None:
        raise BackendError(
            f"{name}: {type(layer).__name__} needs an input and a weight quantizer to run on integers "
            f"(input_quant={layer.input_quant is not None}, weight_quant={layer.weight_quant is not None})"
        )
    input_grid = activation_grid(layer.input_quant, f"{name}.input_quant")
    with torch.no_grad():
        weight = layer.quant_weight()
    weight_grid = _grid_from(weight, layer.weight_quant, f"{name}.weight_quant")
    weight_scale = layer.output_channel_scale(weight.scale)
    if weight_scale is None:
        raise BackendError(f"{name}: a weight scale that varies along the sum (per group) has no integer rescale")
    weight_codes = weight.int(float_datatype=True).double() - weight.zero_point.double()
    if input_grid.scale.numel() != 1:
        raise BackendError(f"{name}: the integer backend needs a per-tensor input scale")
    kwargs = {}
    if op.startswith("conv"):
        kwargs = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
        if layer.padding_mode != "zeros":
            raise BackendError(f"{name}: padding_mode={layer.padding_mode!r} is not supported (zeros only)")
        if input_grid.zero_point.abs().max() > 0:
            raise BackendError(f"{name}: zero padding of an input with a zero point is not supported")
    matmul = IntMatMul(
        op,
        weight_codes,
        spec.accumulator_bits,
        spec.overflow,
        name=f"{name}.matmul",
        input_bound=input_grid.largest_code,
        **kwargs,
    )
    terms = weight_codes[0].numel() if op != "linear" else weight_codes.shape[-1]
    matmul.check_exact(input_grid.largest_code, weight_grid.largest_code, terms)
    # the largest accumulator of each output channel: lets the rescale prove float64 exact
    accumulator_bound = matmul.channel_bounds()

    multiplier = (input_grid.scale.reshape(()) * weight_scale.double()).reshape(-1)
    bias = None
    if layer.bias is not None:
        bias = _layer_bias(layer, input_grid, weight_scale)
    if batch_norm is not None:
        multiplier, bias = _fold_batch_norm(multiplier, bias, batch_norm)
    channel_dim = -1 if op == "linear" else 1
    output_grid = None
    if layer.output_quant is not None:
        output_grid = activation_grid(layer.output_quant, f"{name}.output_quant")
        if output_grid.scale.numel() != 1:
            raise BackendError(f"{name}: the integer backend needs a per-tensor output scale")
        multiplier = multiplier / output_grid.scale.reshape(())
        bias = None if bias is None else bias / output_grid.scale.reshape(())
        fixed_multiplier, fixed_bias = fixed_rescale(multiplier, bias, spec, name)
        rescale: MulShift | MulQuant = MulQuant(
            fixed_multiplier,
            fixed_bias,
            output_grid.zero_point,
            output_grid.qmin,
            output_grid.qmax,
            channel_dim,
            f"{name}.rescale",
            accumulator_bound,
        )
    else:
        fixed_multiplier, fixed_bias = fixed_rescale(multiplier, bias, spec, name)
        rescale = MulShift(fixed_multiplier, fixed_bias, channel_dim, f"{name}.rescale", accumulator_bound)
    return IntegerWBIOL(name, input_grid, matmul, rescale, output_grid, channel_dim)


def _layer_bias(layer: nn.Module, input_grid: Grid, weight_scale: Tensor) -> Tensor:
    """The bias the fake-quantized layer adds (its quantized value when it has a bias quantizer)."""
    with torch.no_grad():
        if layer.bias_quant is None:
            return layer.bias.detach().double()
        quant = layer.bias_quant(layer.bias, input_grid.scale.float(), weight_scale.float())
    value = quant.value if hasattr(quant, "value") else quant
    return value.detach().double()


def _fold_batch_norm(multiplier: Tensor, bias: Tensor | None, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``bn(m * acc + b)`` = ``(m * k) * acc + (b - mean) * k + beta`` with ``k = gamma / sqrt(var + eps)``."""
    if bn.training or bn.running_mean is None:
        raise BackendError(f"{type(bn).__name__}: fold a BatchNorm in eval mode with running statistics")
    k = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.detach().double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(k)
    bias = torch.zeros_like(k) if bias is None else bias
    return multiplier * k, (bias - bn.running_mean.double()) * k + beta


class IntegerAdd(nn.Module):
    """The integer twin of :class:`~quantwire.nn.QuantEltwiseAdd`: both operands onto the
    shared grid, added as integers, the sum returned as a real number."""

    def __init__(self, name: str, grid: Grid) -> None:
        super().__init__()
        self.name = name
        self.grid = grid
        self.quantize = grid.quantize(f"{name}.quantize")
        self.register_buffer("scale", grid.scale.reshape(()))
        self.register_buffer("zero_point", grid.zero_point.reshape(()))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        codes = self.quantize(a) + self.quantize(b)
        if self.zero_point.any():
            # integers well inside float64: subtracting both zero points from the sum is exact
            codes -= 2 * self.zero_point
        return codes.mul_(self.scale)
