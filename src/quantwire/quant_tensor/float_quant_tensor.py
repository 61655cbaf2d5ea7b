"""``FloatQuantTensor``: values on a scaled minifloat grid (FP8 E4M3/E5M2, FP6, FP4, or any
format of ``exponent_bit_width`` exponent and ``mantissa_bit_width`` mantissa bits).

It keeps its metadata through the shape ops every QuantTensor keeps
(:mod:`quantwire.quant_tensor.shape_ops`) and through concatenation with identical formats
and scales; arithmetic falls back to plain tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from quantwire.function import (
    minifloat_max_value,
    minifloat_min_normal_exponent,
    minifloat_saturate,
    minifloat_step,
)
from quantwire.quant_tensor.base import (
    QuantTensor,
    TorchFunctionTable,
    as_tensor_like,
    cat_keeping_metadata,
    equal_after_broadcast,
)
from quantwire.quant_tensor.shape_ops import METADATA_PRESERVING_OPS

__all__ = ["FloatQuantTensor"]

# How far (relative) ``value / scale`` may sit from its re-quantized self: a few units of the
# value dtype's rounding, which dividing by a scale that is not a power of two introduces.
_DTYPE_ROUNDING_FACTOR = 4.0


def _scalar_int(t: Tensor) -> int | None:
    """The single integer ``t`` holds, else ``None``."""
    if t.numel() != 1:
        return None
    x = float(t.item())
    return int(x) if x.is_integer() else None


class FloatQuantTensor(QuantTensor):
    """A fake-quantized minifloat tensor: ``value / scale`` is a number of the format with
    ``exponent_bit_width`` exponent bits, ``mantissa_bit_width`` mantissa bits and bias
    ``exponent_bias`` (subnormals included); ``has_inf``/``has_nan`` say which top codes are
    reserved and ``saturating`` whether the quantizer clamps overflow (see
    :mod:`quantwire.function.minifloat`).

    ``value``, ``scale``, ``zero_point`` and the three format fields are tensors; the flags are
    plain bools. ``zero_point`` is carried for symmetry with :class:`IntQuantTensor` (minifloat
    quantizers produce 0).
    """

    __slots__ = (
        "exponent_bit_width",
        "mantissa_bit_width",
        "exponent_bias",
        "saturating",
        "has_inf",
        "has_nan",
    )

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "value",
        "scale",
        "zero_point",
        "exponent_bit_width",
        "mantissa_bit_width",
        "exponent_bias",
        "saturating",
        "has_inf",
        "has_nan",
        "signed",
        "training",
    )
    _TENSOR_FIELDS: ClassVar[tuple[str, ...]] = (
        "value",
        "scale",
        "zero_point",
        "exponent_bit_width",
        "mantissa_bit_width",
        "exponent_bias",
    )

    exponent_bit_width: Tensor
    mantissa_bit_width: Tensor
    exponent_bias: Tensor
    saturating: bool
    has_inf: bool
    has_nan: bool

    def __init__(
        self,
        value: Tensor,
        scale: Tensor | float,
        zero_point: Tensor | float,
        exponent_bit_width: Tensor | int,
        mantissa_bit_width: Tensor | int,
        exponent_bias: Tensor | int,
        saturating: bool,
        has_inf: bool,
        has_nan: bool,
        signed: bool,
        training: bool,
    ) -> None:
        super().__init__(value, scale, zero_point, signed, training)
        self.exponent_bit_width = as_tensor_like(exponent_bit_width, value, torch.float32)
        self.mantissa_bit_width = as_tensor_like(mantissa_bit_width, value, torch.float32)
        self.exponent_bias = as_tensor_like(exponent_bias, value, torch.float32)
        self.saturating = bool(saturating)
        self.has_inf = bool(has_inf)
        self.has_nan = bool(has_nan)

    def minifloat(self) -> Tensor:
        """``value / scale``: the numbers of the format the value encodes."""
        return self.value / self.scale

    def _same_format(self, other: FloatQuantTensor) -> bool:
        return (
            (self.saturating, self.has_inf, self.has_nan, self.signed)
            == (other.saturating, other.has_inf, other.has_nan, other.signed)
            and equal_after_broadcast(self.exponent_bit_width, other.exponent_bit_width)
            and equal_after_broadcast(self.mantissa_bit_width, other.mantissa_bit_width)
            and equal_after_broadcast(self.exponent_bias, other.exponent_bias)
        )

    @property
    def is_valid(self) -> bool:
        """Whether ``scale > 0`` everywhere and re-quantizing ``value / scale`` to the format
        (round half to even on the mantissa grid, then the format's saturation) leaves it
        unchanged, up to a few units of the value dtype's rounding. NaN is valid when the format
        has NaN, ``±inf`` when it has infinities."""
        exponent = _scalar_int(self.exponent_bit_width)
        mantissa = _scalar_int(self.mantissa_bit_width)
        bias = _scalar_int(self.exponent_bias)
        if exponent is None or mantissa is None or bias is None or exponent < 1 or mantissa < 0:
            return False
        with torch.no_grad():
            if not bool((self.scale > 0).all()):
                return False
            x = self.value.double() / self.scale.double()
            step = minifloat_step(x, mantissa, minifloat_min_normal_exponent(bias))
            max_value = minifloat_max_value(exponent, mantissa, bias, self.has_inf, self.has_nan)
            requantized = minifloat_saturate(
                torch.round(x / step) * step,
                max_value,
                self.signed,
                self.saturating,
                self.has_inf,
                self.has_nan,
            )
            eps = torch.finfo(self.value.dtype).eps if self.value.dtype.is_floating_point else 0.0
            # x.abs() scales the tolerance, so infinities must be excluded here and allowed below.
            tolerance = _DTYPE_ROUNDING_FACTOR * eps * x.abs()
            unchanged = torch.isfinite(x) & ((requantized - x).abs() <= tolerance)
            special = torch.zeros_like(unchanged)
            if self.has_nan:
                special |= torch.isnan(x)
            if self.has_inf:
                special |= torch.isinf(x) & ((x > 0) | self.signed)
            return bool((unchanged | special).all())


def _cat(tensors: Any, dim: int = 0, *, axis: int | None = None, out: Any = None) -> Any:
    """``torch.cat``/``concat``/``concatenate`` of FloatQuantTensors with identical formats
    (widths, bias, flags, signedness) and equal per-tensor (single-element) scales and zero
    points keeps the first one's metadata (``training`` if any is training). Anything else falls
    back."""
    if out is not None:
        return NotImplemented
    return cat_keeping_metadata(tensors, dim if axis is None else axis, FloatQuantTensor, _same_float_metadata)


def _same_float_metadata(t: FloatQuantTensor, first: FloatQuantTensor) -> bool:
    return (
        t._same_format(first)
        and equal_after_broadcast(t.scale, first.scale)
        and equal_after_broadcast(t.zero_point, first.zero_point)
    )


_FLOAT_TORCH_FUNCTIONS: TorchFunctionTable = {
    **METADATA_PRESERVING_OPS,
    torch.cat: _cat,
    torch.concat: _cat,
    torch.concatenate: _cat,
}
FloatQuantTensor._TORCH_FUNCTIONS = _FLOAT_TORCH_FUNCTIONS
