"""Minifloat (small floating-point format) helpers.

A minifloat with ``E`` exponent bits, ``M`` mantissa bits and exponent bias ``B`` represents
``(-1)^s * 2^(e - B) * (1 + m / 2^M)`` for normal codes and ``2^(1 - B) * (m / 2^M)`` for
subnormal ones. Which codes at the top of the exponent range are reserved depends on the format:

* ``has_inf=True``: IEEE style, the top exponent code is all infinity and NaN (OCP E5M2);
* ``has_inf=False, has_nan=True``: only the all-ones code is NaN (OCP E4M3, "fn");
* neither: every code is a finite number (OCP E2M1, FP4).
"""

import torch
from torch import Tensor

from quantwire.function.ste import tensor_clamp


def minifloat_max_value(
    exponent_bit_width: int, mantissa_bit_width: int, exponent_bias: int, has_inf: bool, has_nan: bool
) -> float:
    """The largest finite value of the format (448.0 for E4M3, 57344.0 for E5M2, 6.0 for E2M1)."""
    top_exponent_code = 2**exponent_bit_width - 1
    top_mantissa_code = 2**mantissa_bit_width - 1
    if has_inf:
        top_exponent_code -= 1
    elif has_nan:
        top_mantissa_code -= 1
        if top_mantissa_code < 0:
            # No mantissa bits: the NaN code is the whole top exponent, the binade below is full.
            top_exponent_code -= 1
            top_mantissa_code = 2**mantissa_bit_width - 1
    if top_exponent_code == 0:
        # Only subnormals remain (a format with no room for normal numbers).
        return 2.0 ** (1 - exponent_bias) * top_mantissa_code / 2**mantissa_bit_width
    return 2.0 ** (top_exponent_code - exponent_bias) * (1 + top_mantissa_code / 2**mantissa_bit_width)


def minifloat_min_normal_exponent(exponent_bias: int) -> int:
    """The exponent of the smallest normal number, which subnormals share."""
    return 1 - exponent_bias


def minifloat_step(x: Tensor, mantissa_bit_width: int, min_exponent: int) -> Tensor:
    """The spacing of the minifloat grid around each element of ``x`` (detached).

    ``frexp`` gives the binary exponent exactly, so values just below a power of two never get
    the coarser step of the binade above (as ``floor(log2(x))`` can in float32).
    """
    _, exponent = torch.frexp(x.detach())
    exponent = torch.clamp_min(exponent.to(torch.int32) - 1, min_exponent)
    return torch.pow(2.0, (exponent - mantissa_bit_width).to(x.dtype))


def minifloat_saturate(
    x: Tensor, max_value: float, signed: bool, saturating: bool, has_inf: bool, has_nan: bool
) -> Tensor:
    """Bring values that overflowed the format back into it.

    Saturating formats clamp to ``±max_value`` (gradient 0 outside). Non-saturating ones map an
    overflow to ``±inf`` when the format has infinities, else to NaN when it has NaN, and clamp
    when it has neither (there is nothing else to map to). Unsigned formats map negatives (and -0.0) to +0.0.
    """
    if not signed:
        # Unsigned formats have no sign bit: negatives and -0.0 become +0.0.
        x = torch.where(x <= 0, torch.zeros_like(x), x)
    upper = torch.full_like(x, max_value)
    lower = -upper if signed else torch.zeros_like(x)
    if saturating or not (has_inf or has_nan):
        return tensor_clamp(x, lower, upper)
    overflow = torch.abs(x) > max_value
    if has_inf:
        special = torch.where(x > 0, torch.full_like(x, float("inf")), torch.full_like(x, float("-inf")))
    else:
        special = torch.full_like(x, float("nan"))
    return torch.where(overflow, special, x)
