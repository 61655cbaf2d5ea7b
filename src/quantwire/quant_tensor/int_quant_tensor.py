"""``IntQuantTensor``: values on the integer grid ``scale * (k - zero_point)``, with ``k`` a
``bit_width``-bit integer (signed or unsigned), and the arithmetic that stays on such a grid.

Besides the shape ops every QuantTensor keeps (:mod:`quantwire.quant_tensor.shape_ops`),
two IntQuantTensors keep their metadata when added with equal scales, multiplied with zero
zero points, or concatenated with identical per-tensor metadata.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from quantwire.function import max_int, min_int, round_ste
from quantwire.quant_tensor.base import (
    QuantTensor,
    TorchFunctionTable,
    as_tensor_like,
    cat_keeping_metadata,
    equal_after_broadcast,
)
from quantwire.quant_tensor.shape_ops import METADATA_PRESERVING_OPS

__all__ = ["IntQuantTensor"]

# How far ``value / scale + zero_point`` may sit from an integer: 1e-3, plus the rounding error
# a value of the tensor's dtype carries at the bit width's magnitude (so float32 tensors with
# 16-bit codes, and their sums and products, are not rejected for float32's own rounding).
_INTEGER_ATOL = 1e-3
_DTYPE_ROUNDING_FACTOR = 4.0


class IntQuantTensor(QuantTensor):
    """A fake-quantized integer tensor: ``value = scale * (k - zero_point)`` with ``k`` in the
    integer range of ``bit_width`` bits (signed: ``[-2^(b-1), 2^(b-1) - 1]``, unsigned:
    ``[0, 2^b - 1]``).

    ``value``, ``scale``, ``zero_point`` and ``bit_width`` are tensors; ``scale`` and
    ``zero_point`` broadcast against ``value``. ``signed`` and ``training`` are plain bools.
    """

    __slots__ = ("bit_width",)

    _FIELDS: ClassVar[tuple[str, ...]] = ("value", "scale", "zero_point", "bit_width", "signed", "training")
    _TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("value", "scale", "zero_point", "bit_width")

    bit_width: Tensor

    def __init__(
        self,
        value: Tensor,
        scale: Tensor | float,
        zero_point: Tensor | float,
        bit_width: Tensor | int,
        signed: bool,
        training: bool,
    ) -> None:
        super().__init__(value, scale, zero_point, signed, training)
        self.bit_width = as_tensor_like(bit_width, value, torch.float32)

    def _pre_round_int(self) -> Tensor:
        """``value / scale + zero_point`` in float64 (codes of up to 32 bits stay exact)."""
        return self.value.double() / self.scale.double() + self.zero_point.double()

    @property
    def is_valid(self) -> bool:
        """Whether every element is ``scale * (k - zero_point)`` for an integer ``k`` in the
        (non-narrow: narrow range cannot be told from the data) range of the bit width.

        A signed 1-bit tensor is binary: its codes are ``-1`` and ``+1``. Bit widths up to 64 are
        accepted (integer accumulators grow past 32 bits before they are requantized).

        Requires ``scale > 0`` everywhere, ``bit_width`` an integer in ``[1, 64]``, an
        integer-valued ``zero_point``, and ``value / scale + zero_point`` within
        ``1e-3 + 4 * eps(value.dtype) * 2^bit_width`` of such a ``k``.
        """
        with torch.no_grad():
            bit_width = self.bit_width.double()
            zero_point = self.zero_point.double()
            if not bool(((bit_width == bit_width.round()) & (bit_width >= 1) & (bit_width <= _MAX_BIT_WIDTH)).all()):
                return False
            if not bool((self.scale > 0).all()) or not bool((zero_point == zero_point.round()).all()):
                return False
            codes = self._pre_round_int()
            nearest = torch.round(codes)
            eps = torch.finfo(self.value.dtype).eps if self.value.dtype.is_floating_point else 0.0
            atol = _INTEGER_ATOL + _DTYPE_ROUNDING_FACTOR * eps * 2.0**bit_width
            on_grid = (codes - nearest).abs() <= atol
            in_range = (nearest >= min_int(self.signed, False, bit_width)) & (
                nearest <= max_int(self.signed, False, bit_width)
            )
            if self.signed:
                in_range = torch.where(bit_width == 1, nearest.abs() == 1, in_range)
            return bool((on_grid & in_range).all())

    def int(self, float_datatype: bool = False) -> Tensor:
        """The integer codes ``round(value / scale + zero_point)``: int32 (int64 when the bit
        width exceeds 31), or in the value's float dtype with a straight-through gradient when
        ``float_datatype``."""
        codes = round_ste(self._pre_round_int())
        if float_datatype:
            return codes.to(self.value.dtype)
        return codes.to(torch.int64 if bool((self.bit_width > 31).any()) else torch.int32)


_MAX_BIT_WIDTH = 64


def _code_range(qt: IntQuantTensor) -> tuple[Tensor, Tensor]:
    """The (non-narrow) integer range of ``qt``'s codes, in float64."""
    bit_width = qt.bit_width.double()
    return min_int(qt.signed, False, bit_width), max_int(qt.signed, False, bit_width)


def _bit_width_for_range(low: Tensor, high: Tensor, signed: bool) -> Tensor:
    """The fewest bits whose (non-narrow) integer range holds ``[low, high]``."""
    if signed:
        magnitude_bits = torch.maximum(torch.log2(high + 1), torch.log2(torch.clamp_min(-low, 1)))
        return 1 + torch.ceil(magnitude_bits)
    return torch.ceil(torch.log2(high + 1))


def _add(input: Any, other: Any, *, alpha: Any = 1, out: Any = None) -> Any:
    """``input + other`` of two IntQuantTensors with equal scales (``torch.equal`` after
    broadcasting) keeps metadata: ``scale * (a - za) + scale * (b - zb) = scale * ((a + b) -
    (za + zb))``. The result has the scale (the mean of the two equal scales, so both get a
    gradient), zero point ``za + zb``, signedness "either signed", and the fewest bits holding
    the exact integer range of ``a + b`` (``max(bit widths) + 1`` for equal signedness).
    Anything else (``alpha != 1``, ``out=``, different scales, plain tensors) falls back."""
    if out is not None or not (isinstance(alpha, (int, float)) and alpha == 1):
        return NotImplemented
    if not (isinstance(input, IntQuantTensor) and isinstance(other, IntQuantTensor)):
        return NotImplemented
    if not equal_after_broadcast(input.scale, other.scale):
        return NotImplemented
    signed = input.signed or other.signed
    input_low, input_high = _code_range(input)
    other_low, other_high = _code_range(other)
    bit_width_dtype = torch.promote_types(input.bit_width.dtype, other.bit_width.dtype)
    return IntQuantTensor(
        input.value + other.value,
        (input.scale + other.scale) / 2,
        input.zero_point + other.zero_point,
        _bit_width_for_range(input_low + other_low, input_high + other_high, signed).to(bit_width_dtype),
        signed,
        input.training or other.training,
    )


def _mul(input: Any, other: Any, *, out: Any = None) -> Any:
    """``input * other`` of two IntQuantTensors whose zero points are all zero keeps metadata:
    ``(sa * a) * (sb * b) = (sa * sb) * (a * b)``. The result has scale ``sa * sb``, zero point
    zero, bit width ``bwa + bwb`` (enough for every product, including ``-2^(b-1) * -2^(c-1)``)
    and signedness "either signed". Anything else falls back."""
    if out is not None or not (isinstance(input, IntQuantTensor) and isinstance(other, IntQuantTensor)):
        return NotImplemented
    if not (bool((input.zero_point == 0).all()) and bool((other.zero_point == 0).all())):
        return NotImplemented
    return IntQuantTensor(
        input.value * other.value,
        input.scale * other.scale,
        input.zero_point + other.zero_point,
        input.bit_width + other.bit_width,
        input.signed or other.signed,
        input.training or other.training,
    )


def _same_int_metadata(t: IntQuantTensor, first: IntQuantTensor) -> bool:
    return (
        t.signed == first.signed
        and equal_after_broadcast(t.scale, first.scale)
        and equal_after_broadcast(t.zero_point, first.zero_point)
        and equal_after_broadcast(t.bit_width, first.bit_width)
    )


def _cat(tensors: Any, dim: int = 0, *, axis: int | None = None, out: Any = None) -> Any:
    """``torch.cat``/``concat``/``concatenate`` of IntQuantTensors whose scales and zero points
    are per-tensor (single-element) and equal, with equal bit widths and signedness, keeps the
    first one's metadata (``training`` if any is training). Per-channel metadata, differing
    metadata or plain tensors in the list fall back."""
    if out is not None:
        return NotImplemented
    return cat_keeping_metadata(tensors, dim if axis is None else axis, IntQuantTensor, _same_int_metadata)


_INT_TORCH_FUNCTIONS: TorchFunctionTable = {
    **METADATA_PRESERVING_OPS,
    # add: every spelling; add commutes, so __radd__ shares the handler.
    torch.add: _add,
    Tensor.add: _add,
    Tensor.__add__: _add,
    Tensor.__radd__: _add,
    # mul: every spelling; mul commutes, so __rmul__ shares the handler.
    torch.mul: _mul,
    Tensor.mul: _mul,
    Tensor.__mul__: _mul,
    Tensor.__rmul__: _mul,
    # concatenation
    torch.cat: _cat,
    torch.concat: _cat,
    torch.concatenate: _cat,
}
IntQuantTensor._TORCH_FUNCTIONS = _INT_TORCH_FUNCTIONS
