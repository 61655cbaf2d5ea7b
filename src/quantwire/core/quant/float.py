"""Minifloat quantization (FP8 E4M3/E5M2, FP6, FP4 and any custom format)."""

import torch
from torch import Tensor, nn

from quantwire.core.function_wrapper.ops import RoundSte
from quantwire.core.quant.delay import DelayWrapper
from quantwire.core.utils import StatelessBuffer, check_bit_width
from quantwire.errors import QuantConfigError
from quantwire.function.minifloat import (
    minifloat_max_value,
    minifloat_min_normal_exponent,
    minifloat_saturate,
    minifloat_step,
)
from quantwire.jit import ScriptModule, script_method


def default_exponent_bias(exponent_bit_width: int) -> int:
    """The IEEE-style bias ``2^(E-1) - 1`` (7 for E4M3, 15 for E5M2, 1 for E2M1)."""
    return 2 ** (int(exponent_bit_width) - 1) - 1


def check_minifloat_format(exponent_bit_width: int, mantissa_bit_width: int, signed: bool) -> tuple[int, int]:
    """Validated ``(exponent_bit_width, mantissa_bit_width)``; the whole code fits 32 bits."""
    exponent = check_bit_width(exponent_bit_width, "exponent_bit_width")
    if isinstance(mantissa_bit_width, bool) or not isinstance(mantissa_bit_width, int) or mantissa_bit_width < 0:
        raise QuantConfigError(f"mantissa_bit_width must be an integer >= 0, got {mantissa_bit_width!r}")
    check_bit_width(exponent + mantissa_bit_width + int(bool(signed)), "total minifloat bit width")
    return exponent, mantissa_bit_width


class FloatQuant(ScriptModule):
    """Fake-quantize ``x / scale`` to a minifloat grid, then multiply back by ``scale``.

    The format has ``exponent_bit_width`` exponent bits, ``mantissa_bit_width`` mantissa bits and
    ``exponent_bias`` (IEEE-style ``2^(E-1) - 1`` by default), with subnormals. ``has_inf`` and
    ``has_nan`` say which top codes are reserved (see :mod:`quantwire.function.minifloat`);
    values beyond the largest finite one saturate when ``saturating`` (else become ``±inf`` or
    NaN as the format encodes them). Rounding is ``float_to_int_impl`` on the mantissa grid
    (round half to even by default: the same as PyTorch's ``float8`` casts).

    ``scale = scaling_impl(x)``, divided by ``float_scaling_impl()`` when one is given (e.g.
    :class:`FloatScaling`, so that the threshold maps to the format's largest value).
    Returns ``(value, scale, zero_point, exponent_bit_width, mantissa_bit_width, exponent_bias)``.
    """

    def __init__(
        self,
        exponent_bit_width: int,
        mantissa_bit_width: int,
        scaling_impl: nn.Module,
        exponent_bias: int | None = None,
        signed: bool = True,
        saturating: bool = True,
        has_inf: bool = False,
        has_nan: bool = True,
        float_scaling_impl: nn.Module | None = None,
        float_to_int_impl: nn.Module | None = None,
        quant_delay_steps: int = 0,
    ) -> None:
        super().__init__()
        exponent, mantissa = check_minifloat_format(exponent_bit_width, mantissa_bit_width, signed)
        bias = default_exponent_bias(exponent) if exponent_bias is None else int(exponent_bias)
        self.signed = bool(signed)
        self.saturating = bool(saturating)
        self.has_inf = bool(has_inf)
        self.has_nan = bool(has_nan)
        self.mantissa_bits = mantissa
        self.min_exponent = minifloat_min_normal_exponent(bias)
        self.max_value = minifloat_max_value(exponent, mantissa, bias, self.has_inf, self.has_nan)
        self.scaling_impl = scaling_impl
        self.float_scaling_impl = float_scaling_impl
        self.float_to_int_impl = RoundSte() if float_to_int_impl is None else float_to_int_impl
        self.delay_wrapper = DelayWrapper(quant_delay_steps)
        self.zero_point = StatelessBuffer(torch.tensor(0.0))
        self.exponent_bit_width = StatelessBuffer(torch.tensor(float(exponent)))
        self.mantissa_bit_width = StatelessBuffer(torch.tensor(float(mantissa)))
        self.exponent_bias = StatelessBuffer(torch.tensor(float(bias)))

    @script_method
    def quantize(self, x: Tensor) -> Tensor:
        """Round an already scaled tensor to the format (no scale involved)."""
        step = minifloat_step(x, self.mantissa_bits, self.min_exponent)
        y = self.float_to_int_impl(x / step) * step
        return minifloat_saturate(y, self.max_value, self.signed, self.saturating, self.has_inf, self.has_nan)

    @script_method
    def observe(self, x: Tensor) -> Tensor:
        """The scale for ``x`` without quantizing it: what calibration runs to let the scale
        collect its statistics."""
        scale = self.scaling_impl(x)
        float_scaling_impl = self.float_scaling_impl
        if float_scaling_impl is not None:
            scale = scale / float_scaling_impl()
        return scale

    @script_method
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        scale = self.observe(x)
        y = self.delay_wrapper(x, self.quantize(x / scale) * scale)
        return (
            y,
            scale,
            self.zero_point(),
            self.exponent_bit_width(),
            self.mantissa_bit_width(),
            self.exponent_bias(),
        )


class FloatScaling(ScriptModule):
    """The largest finite value of a minifloat format, for ``float_scaling_impl``."""

    def __init__(
        self,
        exponent_bit_width: int,
        mantissa_bit_width: int,
        exponent_bias: int | None = None,
        signed: bool = True,
        has_inf: bool = False,
        has_nan: bool = True,
    ) -> None:
        super().__init__()
        exponent, mantissa = check_minifloat_format(exponent_bit_width, mantissa_bit_width, signed)
        bias = default_exponent_bias(exponent) if exponent_bias is None else int(exponent_bias)
        self.max_value = StatelessBuffer(
            torch.tensor(minifloat_max_value(exponent, mantissa, bias, bool(has_inf), bool(has_nan)))
        )

    @script_method
    def forward(self) -> Tensor:
        return self.max_value()
