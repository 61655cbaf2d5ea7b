"""Uniform integer quantization."""

import torch
from torch import Tensor, nn

from quantwire import config
from quantwire.core.function_wrapper.ops import RoundSte, TensorClamp, TensorClampSte
from quantwire.core.quant.delay import DelayWrapper
from quantwire.core.scaling.grad_scale import NoGradScale
from quantwire.core.utils import StatelessBuffer
from quantwire.core.zero_point import ZeroZeroPoint
from quantwire.function.fake_quant import int_fake_quant
from quantwire.function.int_range import max_int, min_int
from quantwire.jit import ScriptModule, script_method

# The clamps whose gradients :func:`~quantwire.function.fake_quant.int_fake_quant` reproduces.
_FUSED_CLAMPS = (TensorClamp, TensorClampSte)


class IntQuant(ScriptModule):
    """Fake-quantize ``x`` to ``scale * (k - zero_point)`` with ``k`` an integer of the range of
    ``bit_width`` (``signed``, ``narrow_range``).

    ``k = clamp(float_to_int(x / scale + zero_point))``: rounding is ``float_to_int_impl``
    (round half to even by default) and clamping ``tensor_clamp_impl`` (gradient 0 outside the
    range by default; :class:`~quantwire.core.function_wrapper.TensorClampSte` passes it).
    """

    def __init__(
        self,
        signed: bool,
        narrow_range: bool = False,
        float_to_int_impl: nn.Module | None = None,
        tensor_clamp_impl: nn.Module | None = None,
        quant_delay_steps: int = 0,
    ) -> None:
        super().__init__()
        self.signed = bool(signed)
        self.narrow_range = bool(narrow_range)
        self.float_to_int_impl = RoundSte() if float_to_int_impl is None else float_to_int_impl
        self.tensor_clamp_impl = TensorClamp() if tensor_clamp_impl is None else tensor_clamp_impl
        self.delay_wrapper = DelayWrapper(quant_delay_steps)

    @script_method
    def to_int(self, scale: Tensor, zero_point: Tensor, bit_width: Tensor, x: Tensor) -> Tensor:
        """The integer codes ``k`` (as a float tensor)."""
        y = x / scale + zero_point
        lower = min_int(self.signed, self.narrow_range, bit_width)
        upper = max_int(self.signed, self.narrow_range, bit_width)
        return self.float_to_int_impl(self.tensor_clamp_impl(y, lower, upper))

    @script_method
    def forward(
        self, scale: Tensor, zero_point: Tensor, bit_width: Tensor, x: Tensor, zero_point_is_zero: bool = False
    ) -> Tensor:
        """``zero_point_is_zero``: the caller knows ``zero_point`` is the constant 0 (a symmetric
        quantizer), so the fused path skips adding and subtracting it (the result differs only
        for an input of ``-0.0``, which stays ``-0.0`` instead of becoming ``+0.0``)."""
        if not torch.jit.is_scripting():
            if self.fusable(bit_width):
                fused = self.fused_forward(scale, None if zero_point_is_zero else zero_point, bit_width, x)
                return self.delay_wrapper(x, fused)
        y = (self.to_int(scale, zero_point, bit_width, x) - zero_point) * scale
        return self.delay_wrapper(x, y)

    @torch.jit.unused
    def fusable(self, bit_width: Tensor) -> bool:
        """Whether :meth:`fused_forward` computes what the composition does: round half to even,
        a clamp with either gradient, a constant bit width, this class's ``to_int``, eager mode
        (``torch.compile`` fuses the composition itself)."""
        return (
            config.FUSED_FAKE_QUANT
            and type(self).to_int is IntQuant.to_int
            and type(self.float_to_int_impl) is RoundSte
            and type(self.tensor_clamp_impl) in _FUSED_CLAMPS
            and not bit_width.requires_grad
            and not torch.compiler.is_compiling()
        )

    @torch.jit.unused
    def fused_forward(self, scale: Tensor, zero_point: Tensor | None, bit_width: Tensor, x: Tensor) -> Tensor:
        """The composition as one autograd node (:func:`quantwire.function.fake_quant.int_fake_quant`;
        ``zero_point=None``: no zero point)."""
        lower, upper = self._range(bit_width)
        clamp_ste = type(self.tensor_clamp_impl) is TensorClampSte
        return int_fake_quant(x, scale, zero_point, lower, upper, clamp_ste)

    @torch.jit.unused
    def _range(self, bit_width: Tensor) -> tuple[Tensor, Tensor]:
        """``(min_int, max_int)`` of a constant bit width, computed once per bit-width tensor."""
        key = (bit_width.data_ptr(), bit_width._version, bit_width.dtype, bit_width.device)
        cached = self.__dict__.get("_range_cache")
        if cached is None or cached[0] != key:
            bounds = (
                min_int(self.signed, self.narrow_range, bit_width),
                max_int(self.signed, self.narrow_range, bit_width),
            )
            cached = (key, bounds)
            self.__dict__["_range_cache"] = cached
        return cached[1]


class PactIntQuant(IntQuant):
    """:class:`IntQuant` whose gradients are those of clipping alone (PACT, Choi et al., 2018):
    the rounding error is a constant to autograd, so the input's gradient is 1 inside the range
    and 0 outside, and the upper clipping bound (the learned ``alpha``, reached through the
    scale) gets the gradient of the inputs above it."""

    @script_method
    def forward(
        self, scale: Tensor, zero_point: Tensor, bit_width: Tensor, x: Tensor, zero_point_is_zero: bool = False
    ) -> Tensor:
        """``zero_point_is_zero`` is accepted for :class:`IntQuant`'s signature; the composition
        here adds the zero point whatever it is."""
        y = (self.to_int(scale, zero_point, bit_width, x) - zero_point) * scale
        lower = (min_int(self.signed, self.narrow_range, bit_width) - zero_point) * scale
        upper = (max_int(self.signed, self.narrow_range, bit_width) - zero_point) * scale
        clipped = torch.minimum(torch.maximum(x, lower), upper)
        return self.delay_wrapper(x, clipped + (y - clipped).detach())


class LearnedRoundIntQuant(IntQuant):
    """:class:`IntQuant` that rounds before it clamps, for a ``float_to_int_impl`` that may round
    past the range's ends (learned rounding adds up to 1 to the floor of an in-range value)."""

    @script_method
    def to_int(self, scale: Tensor, zero_point: Tensor, bit_width: Tensor, x: Tensor) -> Tensor:
        y = self.float_to_int_impl(x / scale + zero_point)
        lower = min_int(self.signed, self.narrow_range, bit_width)
        upper = max_int(self.signed, self.narrow_range, bit_width)
        return self.tensor_clamp_impl(y, lower, upper)


class RescalingIntQuant(ScriptModule):
    """Integer quantization whose scale, zero point and bit width come from sub-modules.

    ``scale = scaling_impl(x) / int_scaling_impl(bit_width)``: the scaling module gives the
    threshold the range's far end maps to. Scale and zero point then pass through
    ``grad_scale_impl(value, x, bit_width)``, which may scale their gradients (LSQ's
    :class:`~quantwire.core.scaling.LsqGradScale`; by default nothing). Returns
    ``(value, scale, zero_point, bit_width)``.
    """

    def __init__(
        self,
        int_quant: nn.Module,
        scaling_impl: nn.Module,
        int_scaling_impl: nn.Module,
        zero_point_impl: nn.Module,
        bit_width_impl: nn.Module,
        grad_scale_impl: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.int_quant = int_quant
        self.scaling_impl = scaling_impl
        self.int_scaling_impl = int_scaling_impl
        self.zero_point_impl = zero_point_impl
        self.msb_clamp_bit_width_impl = bit_width_impl
        self.grad_scale_impl = NoGradScale() if grad_scale_impl is None else grad_scale_impl

    @script_method
    def observe(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(scale, zero_point, bit_width)`` for ``x`` without quantizing it: what calibration
        runs to let the scale and zero point collect their statistics."""
        bit_width = self.msb_clamp_bit_width_impl()
        scale = self.scaling_impl(x) / self.int_scaling_impl(bit_width)
        zero_point = self.zero_point_impl(x, scale, bit_width)
        return scale, zero_point, bit_width

    @script_method
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        scale, zero_point, bit_width = self.observe(x)
        zero_point = self.grad_scale_impl(zero_point, x, bit_width)
        scale = self.grad_scale_impl(scale, x, bit_width)
        if not torch.jit.is_scripting():
            if isinstance(self.int_quant, IntQuant) and type(self.zero_point_impl) is ZeroZeroPoint:
                y = self.int_quant(scale, zero_point, bit_width, x, zero_point_is_zero=True)
                return y, scale, zero_point, bit_width
        y = self.int_quant(scale, zero_point, bit_width, x)
        return y, scale, zero_point, bit_width


class PrescaledIntQuant(ScriptModule):
    """Integer quantization with a scale the caller provides: a bias quantized with
    ``input_scale * weight_scale``, so that it adds exactly onto the integer accumulator.
    Returns ``(value, scale, zero_point=0, bit_width)``."""

    def __init__(self, int_quant: nn.Module, bit_width_impl: nn.Module) -> None:
        super().__init__()
        self.int_quant = int_quant
        self.msb_clamp_bit_width_impl = bit_width_impl
        self.zero_point = StatelessBuffer(torch.tensor(0.0))

    @script_method
    def forward(self, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        bit_width = self.msb_clamp_bit_width_impl()
        zero_point = self.zero_point()
        if not torch.jit.is_scripting():
            if isinstance(self.int_quant, IntQuant):
                y = self.int_quant(scale, zero_point, bit_width, x, zero_point_is_zero=True)
                return y, scale, zero_point, bit_width
        y = self.int_quant(scale, zero_point, bit_width, x)
        return y, scale, zero_point, bit_width
