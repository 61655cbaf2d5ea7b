"""Scales that do not look at the input: a constant, or a learned parameter."""

from typing import Any

from torch import Tensor, nn

from quantwire.core.restrict_val import FloatRestrictValue, RestrictClampValue
from quantwire.core.utils import StatelessBuffer, check_shape, positive_finite_tensor
from quantwire.errors import QuantConfigError
from quantwire.jit import ScriptModule, script_method


def _initial_scale(scaling_init: Any, scaling_shape: tuple[int, ...] | None) -> Tensor:
    """``scaling_init`` as a positive tensor of ``scaling_shape`` (broadcast if needed)."""
    init = positive_finite_tensor(scaling_init, "scaling_init")
    if scaling_shape is None:
        return init
    shape = check_shape(scaling_shape, "scaling_shape")
    try:
        return init.expand(shape).clone() if init.shape != shape else init
    except RuntimeError:
        raise QuantConfigError(
            f"scaling_init of shape {tuple(init.shape)} can not broadcast to scaling_shape {shape}"
        ) from None


class ConstScaling(ScriptModule):
    """A constant scale (not learned, not saved: it is part of the quantizer's declaration)."""

    def __init__(
        self,
        scaling_init: Any,
        restrict_scaling_impl: nn.Module | None = None,
        scaling_min_val: float | None = 1e-10,
    ) -> None:
        super().__init__()
        restrict = FloatRestrictValue() if restrict_scaling_impl is None else restrict_scaling_impl
        clamp = RestrictClampValue(restrict, scaling_min_val)
        value = clamp(restrict.restrict_init_tensor(_initial_scale(scaling_init, None))).detach()
        self.value = StatelessBuffer(value)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return self.value()


class ParameterScaling(ScriptModule):
    """A learned scale, initialised to ``scaling_init`` (broadcast to ``scaling_shape`` if given)
    and stored in the domain of ``restrict_scaling_impl`` (``value`` in the state dict)."""

    def __init__(
        self,
        scaling_init: Any,
        scaling_shape: tuple[int, ...] | None = None,
        restrict_scaling_impl: nn.Module | None = None,
        scaling_min_val: float | None = 1e-10,
    ) -> None:
        super().__init__()
        restrict = FloatRestrictValue() if restrict_scaling_impl is None else restrict_scaling_impl
        self.restrict_clamp = RestrictClampValue(restrict, scaling_min_val)
        init = restrict.restrict_init_tensor(_initial_scale(scaling_init, scaling_shape))
        self.value = nn.Parameter(init)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return self.restrict_clamp(self.value)
