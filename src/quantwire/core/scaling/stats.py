"""Scales derived from statistics of the tensor being quantized."""

from torch import Tensor, nn

from quantwire.core.function_wrapper.view import OverTensorView
from quantwire.core.restrict_val import FloatRestrictValue, RestrictClampValue
from quantwire.core.stats.sources import ParameterFromRuntimeStats, RuntimeStats, TensorStats
from quantwire.jit import ScriptModule, script_method


def _restrict(restrict_scaling_impl: nn.Module | None) -> nn.Module:
    return FloatRestrictValue() if restrict_scaling_impl is None else restrict_scaling_impl


def _view(view: nn.Module | None) -> nn.Module:
    return OverTensorView() if view is None else view


class StatsScaling(ScriptModule):
    """A scale computed from the input on every call: weights (the statistic follows the
    parameter as it trains) and dynamic activation quantization (per token, per sample)."""

    def __init__(
        self,
        scaling_stats_impl: nn.Module,
        scaling_stats_input_view_shape_impl: nn.Module | None = None,
        restrict_scaling_impl: nn.Module | None = None,
        scaling_min_val: float | None = 1e-10,
    ) -> None:
        super().__init__()
        restrict = _restrict(restrict_scaling_impl)
        self.stats = TensorStats(scaling_stats_impl, _view(scaling_stats_input_view_shape_impl))
        self.restrict_value_impl = restrict
        self.restrict_clamp = RestrictClampValue(restrict, scaling_min_val)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return self.restrict_clamp(self.restrict_value_impl.restrict_init_tensor(self.stats(x)))


class RuntimeStatsScaling(ScriptModule):
    """A scale from activation statistics tracked in training (moving average with
    ``scaling_stats_momentum``) and frozen in eval; see :class:`~quantwire.core.stats.RuntimeStats`."""

    def __init__(
        self,
        scaling_stats_impl: nn.Module,
        scaling_stats_input_view_shape_impl: nn.Module | None = None,
        scaling_shape: tuple[int, ...] = (),
        scaling_stats_momentum: float | None = 0.1,
        restrict_scaling_impl: nn.Module | None = None,
        scaling_min_val: float | None = 1e-10,
    ) -> None:
        super().__init__()
        restrict = _restrict(restrict_scaling_impl)
        self.stats = RuntimeStats(
            scaling_stats_impl, _view(scaling_stats_input_view_shape_impl), scaling_shape, scaling_stats_momentum
        )
        self.restrict_value_impl = restrict
        self.restrict_clamp = RestrictClampValue(restrict, scaling_min_val)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return self.restrict_clamp(self.restrict_value_impl.restrict_init_tensor(self.stats(x)))


class ParameterFromRuntimeStatsScaling(ScriptModule):
    """A learned scale initialised from activation statistics collected over the first
    ``collect_stats_steps`` training steps; see
    :class:`~quantwire.core.stats.ParameterFromRuntimeStats`. While collecting, the scale is
    the batch statistic passed through the same restriction, so a power-of-two quantizer's
    scale is a power of two at every step."""

    def __init__(
        self,
        collect_stats_steps: int,
        scaling_stats_impl: nn.Module,
        scaling_stats_input_view_shape_impl: nn.Module | None = None,
        scaling_shape: tuple[int, ...] = (),
        scaling_stats_momentum: float | None = None,
        restrict_scaling_impl: nn.Module | None = None,
        scaling_min_val: float | None = 1e-10,
    ) -> None:
        super().__init__()
        restrict = _restrict(restrict_scaling_impl)
        self.stats = ParameterFromRuntimeStats(
            collect_stats_steps,
            scaling_stats_impl,
            _view(scaling_stats_input_view_shape_impl),
            restrict,
            scaling_shape,
            scaling_stats_momentum,
            init_min_val=scaling_min_val,
        )
        self.restrict_clamp = RestrictClampValue(restrict, scaling_min_val)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return self.restrict_clamp(self.stats(x))
