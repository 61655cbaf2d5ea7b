"""The integer backend's operators: exact integer products and fixed-point rescaling.

Integer tensors travel as float64 tensors holding integers: float64 represents every integer up
to ``2**53`` exactly, so a sum of products of 8-bit (or 16-bit) codes is exact as long as the
sum of the products' magnitudes stays below ``2**53`` (checked when the operator is built;
PyTorch's float64 convolutions and matrix products are then exact, unlike float32 ones, which
lose bits once sums pass ``2**24``). Rescaling happens in int64.

- :class:`IntMatMul`: matrix product / linear / convolution of integer codes; tracks the largest
  accumulator and detects overflow of the configured accumulator width (int32 by default).
- :class:`MulShift`: ``(acc * M + B) * 2**-sfl``: rescale and bias, output kept at high precision.
- :class:`MulQuant`: ``clamp(round_half_even((acc * M + B) / 2**sfl) + zero_point)``: rescale,
  bias, round and clamp onto the next quantizer's grid (its codes).
- :class:`Quantize`: a real tensor onto a quantizer's grid (the model's input, and after a
  nonlinearity kept in floating point).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantwire.backend.fixed_point import BackendError, FixedPoint, rounding_right_shift

__all__ = ["AccumulatorOverflowError", "IntMatMul", "MulQuant", "MulShift", "Quantize", "integer_range"]

_EXACT_FLOAT64 = 2**53

_PRODUCTS = {
    "matmul": lambda x, w, kw: torch.matmul(x, w),
    "linear": lambda x, w, kw: F.linear(x, w),
    "conv1d": lambda x, w, kw: F.conv1d(x, w, **kw),
    "conv2d": lambda x, w, kw: F.conv2d(x, w, **kw),
    "conv3d": lambda x, w, kw: F.conv3d(x, w, **kw),
    "conv_transpose1d": lambda x, w, kw: F.conv_transpose1d(x, w, **kw),
    "conv_transpose2d": lambda x, w, kw: F.conv_transpose2d(x, w, **kw),
}


class AccumulatorOverflowError(BackendError):
    """An integer product's sums do not fit the configured accumulator width."""


class IntMatMul(nn.Module):
    """The integer product ``op`` (``matmul``, ``linear``, ``conv2d``, ...) of two integer-valued
    tensors, computed exactly; ``weight`` (a buffer) is the second operand when given.

    ``accumulator_bits``: the width of the hardware accumulator (signed); a sum outside it is
    an overflow, handled as ``overflow`` says: ``"raise"`` (:class:`AccumulatorOverflowError`),
    ``"wrap"`` (two's-complement wrap-around, as the hardware would) or ``"ignore"``. The
    largest magnitude seen is kept in :attr:`max_abs_accumulator` either way.
    """

    def __init__(
        self,
        op: str,
        weight: Tensor | None = None,
        accumulator_bits: int = 32,
        overflow: str = "raise",
        name: str = "",
        **op_kwargs: Any,
    ) -> None:
        super().__init__()
        if op not in _PRODUCTS:
            raise BackendError(f"IntMatMul {name}: unknown op {op!r} (one of {', '.join(_PRODUCTS)})")
        if overflow not in ("raise", "wrap", "ignore"):
            raise BackendError(f"IntMatMul {name}: overflow must be 'raise', 'wrap' or 'ignore', got {overflow!r}")
        self.op = op
        self.op_kwargs = op_kwargs
        self.accumulator_bits = accumulator_bits
        self.overflow = overflow
        self.name = name
        self.max_abs_accumulator = 0.0
        self.register_buffer("weight", None if weight is None else weight.detach().double())

    def check_exact(self, max_abs_input: float, max_abs_weight: float, terms: int) -> None:
        """Refuse operands whose sums float64 could not hold exactly."""
        if max_abs_input * max_abs_weight * terms >= _EXACT_FLOAT64:
            raise BackendError(
                f"IntMatMul {self.name}: {terms} products of |codes| up to {max_abs_input:g} x {max_abs_weight:g} "
                "exceed 2**53: float64 can not sum them exactly"
            )

    def forward(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        w = self.weight if w is None else w
        accumulator = _PRODUCTS[self.op](x.double(), w.double(), self.op_kwargs)
        return self._overflow(accumulator)

    def _overflow(self, accumulator: Tensor) -> Tensor:
        if accumulator.numel() == 0:
            return accumulator
        largest = float(accumulator.abs().max())
        self.max_abs_accumulator = max(self.max_abs_accumulator, largest)
        limit = 2.0 ** (self.accumulator_bits - 1)
        if largest < limit or self.overflow == "ignore":
            return accumulator
        if self.overflow == "raise":
            raise AccumulatorOverflowError(
                f"IntMatMul {self.name} ({self.op}): a sum reached {largest:.0f}, which does not fit a "
                f"{self.accumulator_bits}-bit accumulator (|sum| < {limit:.0f}); widen accumulator_bits or "
                "use overflow='wrap' to emulate the wrap-around"
            )
        span = 2.0**self.accumulator_bits
        return torch.remainder(accumulator + limit, span) - limit

    def extra_repr(self) -> str:
        return f"op={self.op}, accumulator_bits={self.accumulator_bits}, overflow={self.overflow}"


def _channel_view(tensor: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """A per-channel (or scalar) tensor shaped to broadcast along ``channel_dim`` of ``like``."""
    if tensor.numel() == 1:
        return tensor.reshape(())
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return tensor.reshape(shape)


class _Rescale(nn.Module):
    """``acc * M + B`` in int64, with ``M`` and ``B`` fixed-point integers sharing ``sfl``."""

    def __init__(self, multiplier: FixedPoint, bias: FixedPoint | None, channel_dim: int, name: str) -> None:
        super().__init__()
        if bias is not None and bias.sfl != multiplier.sfl:
            raise BackendError(f"{name}: multiplier and bias must share sfl ({multiplier.sfl} vs {bias.sfl})")
        self.sfl = multiplier.sfl
        self.swl = multiplier.swl
        self.channel_dim = channel_dim
        self.name = name
        self.register_buffer("multiplier", multiplier.value)
        self.register_buffer("bias", None if bias is None else bias.value)
        # The real multiplier and bias the integers approximate: for measuring the rescale's
        # error (:meth:`exact`), not used by forward.
        real_multiplier = multiplier.real() if multiplier.source is None else multiplier.source
        self.register_buffer("real_multiplier", real_multiplier.reshape(-1).clone(), persistent=False)
        real_bias = None if bias is None else (bias.real() if bias.source is None else bias.source)
        self.register_buffer(
            "real_bias", None if real_bias is None else real_bias.reshape(-1).clone(), persistent=False
        )
        self._largest_multiplier = int(multiplier.value.abs().max()) if multiplier.value.numel() else 0
        self._largest_bias = int(bias.value.abs().max()) if bias is not None and bias.value.numel() else 0

    def scaled(self, accumulator: Tensor) -> Tensor:
        acc = accumulator.round().to(torch.int64)
        if acc.numel():
            bound = int(acc.abs().max()) * self._largest_multiplier + self._largest_bias
            if bound >= 2**63:
                raise BackendError(f"{self.name}: accumulator x multiplier overflows int64; lower sfl")
        out = acc * _channel_view(self.multiplier, acc, self.channel_dim)
        if self.bias is not None:
            out = out + _channel_view(self.bias, acc, self.channel_dim)
        return out

    def exact(self, accumulator: Tensor) -> Tensor:
        """``acc * m + b`` with the real multiplier and bias (float64): what the fixed point
        approximates."""
        out = accumulator.double() * _channel_view(self.real_multiplier, accumulator, self.channel_dim)
        if self.real_bias is not None:
            out = out + _channel_view(self.real_bias, accumulator, self.channel_dim)
        return out

    def extra_repr(self) -> str:
        return f"swl={self.swl}, sfl={self.sfl}, rounding=half-to-even"


class MulShift(_Rescale):
    """``(acc * M + B) * 2**-sfl``: the accumulator rescaled and biased, kept at high precision
    (float64: exact while ``|acc * M + B| < 2**53``)."""

    def forward(self, accumulator: Tensor) -> Tensor:
        return self.scaled(accumulator).double() * 2.0**-self.sfl


class MulQuant(_Rescale):
    """``clamp(round_half_even((acc * M + B) / 2**sfl) + zero_point, qmin, qmax)``: the next
    quantizer's codes, computed in integers."""

    def __init__(
        self,
        multiplier: FixedPoint,
        bias: FixedPoint | None,
        zero_point: Tensor,
        qmin: int,
        qmax: int,
        channel_dim: int,
        name: str,
    ) -> None:
        super().__init__(multiplier, bias, channel_dim, name)
        self.register_buffer("zero_point", zero_point.detach().round().to(torch.int64))
        self.qmin, self.qmax = int(qmin), int(qmax)

    def forward(self, accumulator: Tensor) -> Tensor:
        codes = rounding_right_shift(self.scaled(accumulator), self.sfl)
        codes = codes + _channel_view(self.zero_point, codes, self.channel_dim)
        return codes.clamp(self.qmin, self.qmax).double()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, range=[{self.qmin}, {self.qmax}]"


class Quantize(nn.Module):
    """A real tensor onto a quantizer's grid: ``round_half_even(clamp(x / scale + zero_point))``
    computed in the input's dtype, exactly as the fake-quantized model computes it (so the
    integer model's first codes are the fake-quantized model's)."""

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, name: str = "") -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale.to(x.dtype)
        y = x / scale + self.zero_point.to(x.dtype)
        return torch.round(y.clamp(self.qmin, self.qmax)).double()

    def extra_repr(self) -> str:
        return f"range=[{self.qmin}, {self.qmax}]"


def integer_range(signed: bool, narrow_range: bool, bit_width: int) -> tuple[int, int]:
    """The codes a quantizer of ``bit_width`` bits uses."""
    if signed:
        return -(2 ** (bit_width - 1)) + int(narrow_range), 2 ** (bit_width - 1) - 1
    return 0, 2**bit_width - 1 - int(narrow_range)


def magnitude_bound(qmin: int, qmax: int, zero_point: float = 0.0) -> float:
    """The largest ``|code - zero_point|``."""
    return max(abs(qmin - zero_point), abs(qmax - zero_point))
