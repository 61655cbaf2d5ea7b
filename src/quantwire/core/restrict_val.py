"""Restrictions on the values a scale may take, and the domain a learned scale lives in.

A restriction has three faces: ``restrict_init_float``/``restrict_init_tensor`` move a value
into the domain a parameter is stored in (identity, or ``log2``), and ``forward`` maps a
domain value back to an allowed value (identity, ``2^x``, or ``2^round(x)`` for powers of two).
:class:`RestrictClampValue` adds the scale's floor and keeps it positive.
"""

import math

import torch
from torch import Tensor, nn

from quantwire.core.function_wrapper.ops import CeilSte
from quantwire.errors import QuantConfigError
from quantwire.function.ste import abs_binary_sign_grad, scalar_clamp_min_ste, tensor_clamp_ste
from quantwire.jit import ScriptModule, script_method


class FloatRestrictValue(ScriptModule):
    """Any positive float; stored as is."""

    def restrict_init_float(self, x: float) -> float:
        return x

    @script_method
    def restrict_init_tensor(self, x: Tensor) -> Tensor:
        return x

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return x


class LogFloatRestrictValue(ScriptModule):
    """Any positive float; stored as ``log2`` (learning in the log domain)."""

    def restrict_init_float(self, x: float) -> float:
        return math.log2(x)

    @script_method
    def restrict_init_tensor(self, x: Tensor) -> Tensor:
        return torch.log2(x)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return torch.exp2(x)


class PowerOfTwoRestrictValue(ScriptModule):
    """Powers of two only; stored as ``log2`` and rounded to an integer exponent by
    ``restrict_value_float_to_int_impl`` (ceil by default, so a range is never shrunk)."""

    def __init__(self, restrict_value_float_to_int_impl: nn.Module | None = None) -> None:
        super().__init__()
        self.float_to_int_impl = (
            CeilSte() if restrict_value_float_to_int_impl is None else restrict_value_float_to_int_impl
        )

    def restrict_init_float(self, x: float) -> float:
        return math.log2(x)

    @script_method
    def restrict_init_tensor(self, x: Tensor) -> Tensor:
        log = torch.log2(x)
        # Just above a power of two, float32 log2 rounds down onto the integer and ceil would
        # shrink the range by that sliver: step such a log one ulp up.
        return torch.where(torch.exp2(log) < x, torch.nextafter(log, torch.full_like(log, math.inf)), log)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        exponent = self.float_to_int_impl(x)
        # 2^e is inf past the dtype's largest binade (2^127 in float32): a threshold above it
        # would give an inf scale and NaN outputs. Cap the exponent there (straight-through).
        largest = torch.nextafter(
            torch.full((), math.inf, dtype=x.dtype, device=x.device), torch.zeros((), dtype=x.dtype, device=x.device)
        )
        top = (torch.frexp(largest)[1] - 1).to(x.dtype)
        return torch.exp2(tensor_clamp_ste(exponent, torch.full_like(top, -math.inf), top))


class RestrictClampValue(ScriptModule):
    """From a domain value to a usable scale: restrict, make positive, clamp from below.

    The floor ``scaling_min_val`` is itself restricted first (a power-of-two quantizer's floor is
    a power of two), so the result always satisfies the restriction. The floor keeps an
    all-zero channel from giving a zero scale and a division by zero.
    """

    def __init__(self, restrict_value_impl: nn.Module, scaling_min_val: float | None = 1e-10) -> None:
        super().__init__()
        self.restrict_value_impl = restrict_value_impl
        if scaling_min_val is None:
            self.min_val = 0.0
        else:
            if not (math.isfinite(scaling_min_val) and scaling_min_val > 0):
                raise QuantConfigError(f"scaling_min_val must be finite and positive, got {scaling_min_val!r}")
            domain = restrict_value_impl.restrict_init_float(float(scaling_min_val))
            self.min_val = float(restrict_value_impl(torch.tensor(domain)))

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return scalar_clamp_min_ste(abs_binary_sign_grad(self.restrict_value_impl(x)), self.min_val)
