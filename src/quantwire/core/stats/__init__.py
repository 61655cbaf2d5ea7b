"""Statistics that scales and zero points are derived from.

``stats.py`` holds the reductions (each maps a ``(groups, elements)`` matrix to a ``(groups, 1)``
column); ``observers.py`` holds reductions that keep state across calls (running extremes and
histograms, for calibration); ``sources.py`` holds where statistics come from: every call
(:class:`TensorStats`), a running estimate collected in training (:class:`RuntimeStats`), or
collected for a number of steps and then learned (:class:`ParameterFromRuntimeStats`).
"""

from quantwire.core.stats.observers import (
    HistogramEntropy,
    HistogramMSE,
    HistogramPercentile,
    HistogramStats,
    RunningAbsMax,
    RunningAbsMinMax,
    RunningNegativeMinOrZero,
)
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
    "HistogramEntropy",
    "HistogramMSE",
    "HistogramPercentile",
    "HistogramStats",
    "NegativeMinOrZero",
    "NegativePercentileOrZero",
    "ParameterFromRuntimeStats",
    "PercentileInterval",
    "RunningAbsMax",
    "RunningAbsMinMax",
    "RunningNegativeMinOrZero",
    "RuntimeStats",
    "TensorStats",
]
