"""Statistics that scales and zero points are derived from.

``stats.py`` holds the reductions (each maps a ``(groups, elements)`` matrix to a ``(groups, 1)``
column); ``sources.py`` holds where statistics come from: every call (:class:`TensorStats`),
a running estimate collected in training (:class:`RuntimeStats`), or collected for a number of
steps and then learned (:class:`ParameterFromRuntimeStats`).
"""

from quantwire.core.stats.sources import ParameterFromRuntimeStats, RuntimeStats, TensorStats
from quantwire.core.stats.stats import (
    MSE,
    AbsMax,
    AbsMinMax,
    AbsPercentile,
    NegativeMinOrZero,
    NegativePercentileOrZero,
    PercentileInterval,
)

__all__ = [
    "MSE",
    "AbsMax",
    "AbsMinMax",
    "AbsPercentile",
    "NegativeMinOrZero",
    "NegativePercentileOrZero",
    "ParameterFromRuntimeStats",
    "PercentileInterval",
    "RuntimeStats",
    "TensorStats",
]
