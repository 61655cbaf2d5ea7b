"""Calibration observers for activation quantizers: how the statistic a scale starts from is
gathered over the calibration batches (the ``collect_stats_steps`` first training steps).

Each mixin goes in front of an activation quantizer, ``class Q(EntropyObserver,
Int8ActPerTensorFloat)``, and replaces its ``scaling_stats_impl`` (and how batches are
combined, ``scaling_stats_momentum``):

- cross-batch observers (:class:`~quantwire.core.stats.RunningAbsMax`, the histogram ones) keep
  their own state and answer for every batch seen so far, so the running value just keeps their
  latest answer (``scaling_stats_momentum = 1.0``);
- per-batch statistics are averaged exactly over the batches (``None``) or smoothed (a float).
"""

from quantwire.core.stats import (
    MSE,
    AbsMax,
    AbsPercentile,
    HistogramEntropy,
    HistogramMSE,
    HistogramPercentile,
    RunningAbsMax,
    RunningAbsMinMax,
    RunningNegativeMinOrZero,
)
from quantwire.inject import ExtendedInjector
from quantwire.quant.scaled_int import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from quantwire.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloat

__all__ = [
    "AsymmetricMinMaxObserver",
    "EmaMinMaxObserver",
    "EntropyObserver",
    "HistogramObserver",
    "HistogramPercentileObserver",
    "Int8ActPerTensorFloatEntropy",
    "Int8ActPerTensorFloatHistogram",
    "Int8ActPerTensorFloatMinMax",
    "MSEObserver",
    "MinMaxObserver",
    "PercentileObserver",
    "ShiftedUint8ActPerTensorFloatMinMax",
    "Uint8ActPerTensorFloatEntropy",
    "Uint8ActPerTensorFloatHistogram",
    "Uint8ActPerTensorFloatMinMax",
]


# -- mixins -------------------------------------------------------------------------------------


class MinMaxObserver(ExtendedInjector):
    """Abs-max over every calibration batch."""

    scaling_stats_impl = RunningAbsMax
    scaling_stats_momentum = 1.0


class EmaMinMaxObserver(ExtendedInjector):
    """Abs-max of each batch, smoothed with an exponential moving average (momentum 0.01)."""

    scaling_stats_impl = AbsMax
    scaling_stats_momentum = 0.01


class PercentileObserver(ExtendedInjector):
    """The 99.99th percentile of ``|x|`` of each batch, averaged over the batches."""

    scaling_stats_impl = AbsPercentile
    high_percentile_q = 99.99
    scaling_stats_momentum = None


class MSEObserver(ExtendedInjector):
    """The threshold of each batch that minimises its quantization MSE, averaged over the batches."""

    scaling_stats_impl = MSE
    scaling_stats_momentum = None


class EntropyObserver(ExtendedInjector):
    """TensorRT's entropy (KL) calibration on a histogram of ``|x|`` over every batch
    (``histogram_num_bins``, ``entropy_stride``, ``entropy_ignore_zero_bin`` may be overridden)."""

    scaling_stats_impl = HistogramEntropy
    scaling_stats_momentum = 1.0


class HistogramObserver(ExtendedInjector):
    """The bin edge of a histogram of ``|x|`` over every batch that minimises the expected
    quantization MSE (``histogram_num_bins`` may be overridden)."""

    scaling_stats_impl = HistogramMSE
    scaling_stats_momentum = 1.0


class HistogramPercentileObserver(ExtendedInjector):
    """The 99.99th percentile of a histogram of ``|x|`` over every batch (unlike
    :class:`PercentileObserver`, a percentile of all the data, not an average of per-batch ones)."""

    scaling_stats_impl = HistogramPercentile
    high_percentile_q = 99.99
    scaling_stats_momentum = 1.0


class AsymmetricMinMaxObserver(ExtendedInjector):
    """For zero-point quantizers (``ShiftedUint8ActPerTensorFloat``): the range
    ``[min(x), max(x)]`` (with zero) over every batch; its width gives the scale and its lower
    end the zero point."""

    scaling_stats_impl = RunningAbsMinMax
    scaling_stats_momentum = 1.0
    zero_point_stats_impl = RunningNegativeMinOrZero
    zero_point_stats_momentum = 1.0


# -- ready quantizers ---------------------------------------------------------------------------


class Int8ActPerTensorFloatMinMax(MinMaxObserver, Int8ActPerTensorFloat):
    """8-bit signed activations; the scale starts from the abs-max over the calibration batches."""


class Uint8ActPerTensorFloatMinMax(MinMaxObserver, Uint8ActPerTensorFloat):
    """8-bit unsigned activations; the scale starts from the max over the calibration batches."""


class Int8ActPerTensorFloatEntropy(EntropyObserver, Int8ActPerTensorFloat):
    """8-bit signed activations; the scale starts from TensorRT's entropy calibration."""


class Uint8ActPerTensorFloatEntropy(EntropyObserver, Uint8ActPerTensorFloat):
    """8-bit unsigned activations; the scale starts from TensorRT's entropy calibration."""


class Int8ActPerTensorFloatHistogram(HistogramObserver, Int8ActPerTensorFloat):
    """8-bit signed activations; the scale starts from the histogram's MSE-optimal threshold."""


class Uint8ActPerTensorFloatHistogram(HistogramObserver, Uint8ActPerTensorFloat):
    """8-bit unsigned activations; the scale starts from the histogram's MSE-optimal threshold."""


class ShiftedUint8ActPerTensorFloatMinMax(AsymmetricMinMaxObserver, ShiftedUint8ActPerTensorFloat):
    """8-bit unsigned activations with a zero point; range and zero point start from the min and
    max over the calibration batches."""
