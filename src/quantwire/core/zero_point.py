"""Zero points: the integer that the float value zero maps to (asymmetric quantization).

Every zero-point module is called as ``zero_point_impl(x, scale, bit_width)`` and returns an
integer-valued float tensor that broadcasts against ``x``, within the quantizer's integer range.
Statistics-based ones take the (non-positive) lower end of the range, ``low``, and return
``round(-low / scale)``: the code that ``low`` then lands on is the range's lowest.
"""

from typing import Any

import torch
from torch import Tensor, nn

from quantwire.core.function_wrapper.ops import RoundSte
from quantwire.core.function_wrapper.view import OverTensorView
from quantwire.core.restrict_val import FloatRestrictValue
from quantwire.core.stats.sources import ParameterFromRuntimeStats, RuntimeStats, TensorStats
from quantwire.core.utils import StatelessBuffer, check_shape
from quantwire.function.int_range import max_int, min_int
from quantwire.function.ste import tensor_clamp_ste
from quantwire.jit import ScriptModule, script_method


def _view(view: nn.Module | None) -> nn.Module:
    return OverTensorView() if view is None else view


class ZeroZeroPoint(ScriptModule):
    """Zero: symmetric quantization."""

    def __init__(self) -> None:
        super().__init__()
        self.zero_point = StatelessBuffer(torch.tensor(0.0))

    @script_method
    def forward(self, x: Tensor, scale: Tensor, bit_width: Tensor) -> Tensor:
        return self.zero_point()


class LowToZeroPoint(ScriptModule):
    """``clamp(round(-low / scale), min_int, max_int)``, with straight-through gradients."""

    def __init__(self, signed: bool, narrow_range: bool) -> None:
        super().__init__()
        self.signed = bool(signed)
        self.narrow_range = bool(narrow_range)
        self.float_to_int_impl = RoundSte()

    @script_method
    def forward(self, low: Tensor, scale: Tensor, bit_width: Tensor) -> Tensor:
        zero_point = self.float_to_int_impl(-low / scale)
        lower = min_int(self.signed, self.narrow_range, bit_width)
        upper = max_int(self.signed, self.narrow_range, bit_width)
        return tensor_clamp_ste(zero_point, lower, upper)


class StatsZeroPoint(ScriptModule):
    """From the lower end of the input's range on every call (weights, dynamic activations)."""

    def __init__(
        self,
        signed: bool,
        narrow_range: bool,
        zero_point_stats_impl: nn.Module,
        zero_point_stats_input_view_shape_impl: nn.Module | None = None,
    ) -> None:
        super().__init__()
        view = _view(zero_point_stats_input_view_shape_impl)
        self.stats = TensorStats(zero_point_stats_impl, view)
        self.to_zero_point = LowToZeroPoint(signed, narrow_range)

    @script_method
    def forward(self, x: Tensor, scale: Tensor, bit_width: Tensor) -> Tensor:
        return self.to_zero_point(self.stats(x), scale, bit_width)


class RuntimeStatsZeroPoint(ScriptModule):
    """From the lower end of activations tracked in training, frozen in eval."""

    def __init__(
        self,
        signed: bool,
        narrow_range: bool,
        zero_point_stats_impl: nn.Module,
        zero_point_stats_input_view_shape_impl: nn.Module | None = None,
        zero_point_shape: tuple[int, ...] = (),
        zero_point_stats_momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        view = _view(zero_point_stats_input_view_shape_impl)
        self.stats = RuntimeStats(zero_point_stats_impl, view, zero_point_shape, zero_point_stats_momentum)
        self.to_zero_point = LowToZeroPoint(signed, narrow_range)

    @script_method
    def forward(self, x: Tensor, scale: Tensor, bit_width: Tensor) -> Tensor:
        return self.to_zero_point(self.stats(x), scale, bit_width)


class ParameterZeroPoint(ScriptModule):
    """A learned lower range end (float domain, as LSQ+ learns its offset), initialised to
    ``zero_point_init`` (broadcast to ``zero_point_shape``)."""

    def __init__(
        self,
        signed: bool,
        narrow_range: bool,
        zero_point_init: Any = 0.0,
        zero_point_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        init = torch.as_tensor(zero_point_init, dtype=torch.float32).detach().clone()
        if zero_point_shape is not None:
            init = init.expand(check_shape(zero_point_shape, "zero_point_shape")).clone()
        self.value = nn.Parameter(init)
        self.to_zero_point = LowToZeroPoint(signed, narrow_range)

    @script_method
    def forward(self, x: Tensor, scale: Tensor, bit_width: Tensor) -> Tensor:
        return self.to_zero_point(self.value, scale, bit_width)


class ParameterFromRuntimeStatsZeroPoint(ScriptModule):
    """A learned lower range end initialised from activation statistics collected over the
    first ``collect_stats_steps`` training steps."""

    def __init__(
        self,
        signed: bool,
        narrow_range: bool,
        collect_stats_steps: int,
        zero_point_stats_impl: nn.Module,
        zero_point_stats_input_view_shape_impl: nn.Module | None = None,
        zero_point_shape: tuple[int, ...] = (),
        zero_point_stats_momentum: float | None = None,
    ) -> None:
        super().__init__()
        view = _view(zero_point_stats_input_view_shape_impl)
        self.stats = ParameterFromRuntimeStats(
            collect_stats_steps,
            zero_point_stats_impl,
            view,
            FloatRestrictValue(),
            zero_point_shape,
            zero_point_stats_momentum,
        )
        self.to_zero_point = LowToZeroPoint(signed, narrow_range)

    @script_method
    def forward(self, x: Tensor, scale: Tensor, bit_width: Tensor) -> Tensor:
        return self.to_zero_point(self.stats(x), scale, bit_width)
