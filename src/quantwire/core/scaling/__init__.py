"""Scaling: modules that return the threshold (the float value the integer range's far end maps
to) a quantizer divides by its ``int_scaling_impl`` to get its scale.

Every scaling module takes the tensor being quantized and returns a positive tensor that
broadcasts against it. The value is restricted (``restrict_scaling_impl``) and clamped from
below (``scaling_min_val``) by :class:`~quantwire.core.restrict_val.RestrictClampValue`.
"""

from quantwire.core.scaling.grad_scale import LsqGradScale, NoGradScale
from quantwire.core.scaling.int_scaling import IntScaling, PowerOfTwoIntScaling
from quantwire.core.scaling.standalone import ConstScaling, ParameterScaling
from quantwire.core.scaling.stats import ParameterFromRuntimeStatsScaling, RuntimeStatsScaling, StatsScaling

__all__ = [
    "ConstScaling",
    "IntScaling",
    "LsqGradScale",
    "NoGradScale",
    "ParameterFromRuntimeStatsScaling",
    "ParameterScaling",
    "PowerOfTwoIntScaling",
    "RuntimeStatsScaling",
    "StatsScaling",
]
