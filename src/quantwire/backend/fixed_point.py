"""Fixed-point numbers for the integer backend's rescaling: scales and biases as integers.

A real multiplier ``m`` becomes the integer ``M = round(m * 2**sfl)`` of ``swl`` bits (sign
included) and a bias ``b`` the integer ``B = round(b * 2**sfl)`` (added in the product's 64-bit
register, so it may use more than ``swl`` bits); a rescale ``acc * m + b`` becomes
``(acc * M + B) >> sfl``, where the right shift
rounds **half to even** (the rounding ``torch.round`` uses, so that an exact fixed point
reproduces the fake-quantized model's rounding bit for bit).

Error bound. With ``|M / 2**sfl - m| <= 2**-(sfl+1)`` and the same for ``B``, the value before
rounding is off by at most ``e = (|acc| + 1) * 2**-(sfl+1)`` output steps, so the rounded output
code differs from the exact one by at most ``floor(e) + 1`` steps when ``e > 0`` (1 step as long
as ``(|acc| + 1) < 2**(sfl+1)``), and not at all when the multipliers are exact
(:func:`requant_error_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from quantwire.errors import QuantwireError

__all__ = [
    "ROUNDING",
    "BackendError",
    "FixedPoint",
    "fixed_point",
    "is_exact",
    "fractional_bits_for",
    "requant_error_bound",
    "rounding_right_shift",
]

ROUNDING = "half-to-even"
"""How every rescale rounds: to the nearest integer, ties to the even one."""

# int64 carries the rescale's products: |acc * M + B| must stay below 2**63.
_RESCALE_BITS = 63


class BackendError(QuantwireError, ValueError):
    """A model, a fixed-point format or an input the integer backend can not run exactly."""


@dataclass(frozen=True)
class FixedPoint:
    """Integers ``value`` standing for ``value * 2**-sfl``, each of ``swl`` bits (signed)."""

    value: Tensor
    swl: int
    sfl: int
    source: Tensor | None = None
    """The real numbers this fixed point approximates (float64), when known."""

    def real(self) -> Tensor:
        """The real numbers represented (float64)."""
        return self.value.double() * 2.0**-self.sfl


def fractional_bits_for(values: Tensor, swl: int) -> int:
    """The most fractional bits with which every one of ``values`` fits ``swl`` signed bits."""
    largest = float(values.detach().double().abs().max()) if values.numel() else 0.0
    if largest == 0.0:
        return swl - 1
    # |v| * 2**sfl <= 2**(swl-1) - 1 (after rounding): leave the integer part its bits
    integer_bits = math.floor(math.log2(largest)) + 1
    sfl = swl - 1 - integer_bits
    while sfl > -64 and round(largest * 2.0**sfl) > 2 ** (swl - 1) - 1:
        sfl -= 1
    return sfl


def fixed_point(values: Tensor, swl: int, sfl: int, what: str) -> FixedPoint:
    """``values`` as ``swl``-bit integers with ``sfl`` fractional bits (round half to even).
    Raises :class:`BackendError` naming ``what`` when a value does not fit or is not finite."""
    if not 2 <= swl <= _RESCALE_BITS:
        raise BackendError(f"{what}: swl must be in [2, {_RESCALE_BITS}], got {swl}")
    values = values.detach().double()
    if not torch.isfinite(values).all():
        raise BackendError(f"{what}: can not represent non-finite values in fixed point")
    scaled = torch.round(values * 2.0**sfl)
    limit = 2 ** (swl - 1) - 1
    if scaled.numel() and float(scaled.abs().max()) > limit:
        largest = float(values.abs().max())
        raise BackendError(
            f"{what}: {largest:.6g} needs more than swl={swl} bits with sfl={sfl} fractional bits "
            f"(at most {limit * 2.0**-sfl:.6g}); lower sfl or raise swl"
        )
    return FixedPoint(scaled.to(torch.int64), swl, sfl, values)


def is_exact(values: Tensor, point: FixedPoint) -> bool:
    """Whether the fixed point represents ``values`` without rounding."""
    return bool(torch.equal(point.real(), values.detach().double()))


def rounding_right_shift(x: Tensor, shift: int) -> Tensor:
    """``x / 2**shift`` rounded half to even, for int64 ``x`` (a left shift when ``shift < 0``)."""
    if shift <= 0:
        return x * (1 << -shift)
    floor = torch.div(x, 1 << shift, rounding_mode="floor")
    remainder = x - floor * (1 << shift)
    half = 1 << (shift - 1)
    round_up = (remainder > half) | ((remainder == half) & (floor % 2 == 1))
    return floor + round_up.to(x.dtype)


def requant_error_bound(max_abs_accumulator: float, sfl: int, exact: bool = False) -> int:
    """The most output steps a rescale with ``sfl`` fractional bits can differ from the exact
    rescale, for accumulators up to ``max_abs_accumulator`` in magnitude (0 when the fixed-point
    multiplier and bias are exact)."""
    if exact:
        return 0
    error = (max_abs_accumulator + 1) * 2.0 ** -(sfl + 1)
    return math.floor(error) + 1
