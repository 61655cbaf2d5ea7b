"""Building blocks of the catalogue: small injectors, each declaring one aspect of a quantizer.

Catalogue quantizers are these blocks combined by inheritance; nothing here has logic beyond
the ``@value`` choices that follow from other attributes.
"""

from quantwire.core.bit_width import BitWidthConst
from quantwire.core.function_wrapper import (
    OverGroupView,
    OverOutputChannelView,
    OverTensorView,
    OverTokenView,
    TensorClampSte,
)
from quantwire.core.quant import FloatQuant, FloatScaling, IntQuant, PrescaledIntQuant, RescalingIntQuant
from quantwire.core.restrict_val import FloatRestrictValue, PowerOfTwoRestrictValue
from quantwire.core.scaling import (
    ConstScaling,
    IntScaling,
    ParameterFromRuntimeStatsScaling,
    ParameterScaling,
    PowerOfTwoIntScaling,
    StatsScaling,
)
from quantwire.core.stats import (
    MSE,
    AbsMax,
    AbsMinMax,
    AbsPercentile,
    NegativeMinOrZero,
    NegativePercentileOrZero,
    PercentileInterval,
)
from quantwire.core.zero_point import ParameterFromRuntimeStatsZeroPoint, StatsZeroPoint, ZeroZeroPoint
from quantwire.inject import ExtendedInjector, value
from quantwire.proxy import (
    ActQuantProxyFromInjector,
    BiasQuantProxyFromInjector,
    WeightQuantProxyFromInjector,
)

# -- what kind of tensor ------------------------------------------------------------------------


class WeightQuantSolver(ExtendedInjector):
    """Weights: symmetric narrow range (so ``-w`` quantizes to ``-q(w)``), straight-through clamp."""

    proxy_class = WeightQuantProxyFromInjector
    narrow_range = True
    signed = True
    tensor_clamp_impl = TensorClampSte


class ActQuantSolver(ExtendedInjector):
    """Activations: statistics collected over the first training steps (or by calibration)."""

    proxy_class = ActQuantProxyFromInjector
    narrow_range = False
    collect_stats_steps = 300


class BiasQuantSolver(ExtendedInjector):
    """Biases quantized with input scale x weight scale, to add onto the integer accumulator."""

    proxy_class = BiasQuantProxyFromInjector
    tensor_quant = PrescaledIntQuant
    int_quant = IntQuant
    bit_width_impl = BitWidthConst
    requires_input_scale = True
    signed = True
    narrow_range = False


# -- what it quantizes to -----------------------------------------------------------------------


class IntQuantSolver(ExtendedInjector):
    """Uniform integers, ``scale = threshold / int_scaling``, symmetric unless a zero point is set."""

    tensor_quant = RescalingIntQuant
    int_quant = IntQuant
    int_scaling_impl = IntScaling
    zero_point_impl = ZeroZeroPoint
    bit_width_impl = BitWidthConst
    restrict_scaling_impl = FloatRestrictValue
    scaling_min_val = 1e-10


class FloatQuantSolver(ExtendedInjector):
    """Minifloats; the threshold maps to the format's largest finite value."""

    tensor_quant = FloatQuant
    float_scaling_impl = FloatScaling
    restrict_scaling_impl = FloatRestrictValue
    scaling_min_val = 1e-10
    signed = True


class Fp8e4m3Mixin(ExtendedInjector):
    """OCP FP8 E4M3 ("fn"): no infinities, NaN only at the all-ones code, max 448, saturating."""

    exponent_bit_width = 4
    mantissa_bit_width = 3
    exponent_bias = 7
    has_inf = False
    has_nan = True
    saturating = True


class Fp8e5m2Mixin(ExtendedInjector):
    """OCP FP8 E5M2: IEEE-style infinities and NaNs, max 57344, saturating by default."""

    exponent_bit_width = 5
    mantissa_bit_width = 2
    exponent_bias = 15
    has_inf = True
    has_nan = True
    saturating = True


# -- where the scale comes from -----------------------------------------------------------------


class StatsFromWeightScaling(ExtendedInjector):
    """Abs-max of the weight on every call (per tensor, or per output channel when
    ``scaling_per_output_channel``; the layer's ``output_channel_dim`` says which dim that is)."""

    scaling_impl = StatsScaling
    scaling_stats_impl = AbsMax
    scaling_per_output_channel = False

    @value
    def scaling_stats_input_view_shape_impl(scaling_per_output_channel):
        return OverOutputChannelView if scaling_per_output_channel else OverTensorView

    @value
    def channel_dim(module):
        layer = module[0] if isinstance(module, tuple) else module
        return getattr(layer, "output_channel_dim", 0)


class RuntimeStatsScaling(ExtendedInjector):
    """Percentile of |activation| collected for ``collect_stats_steps``, then learned."""

    scaling_impl = ParameterFromRuntimeStatsScaling
    scaling_stats_impl = AbsPercentile
    scaling_stats_input_view_shape_impl = OverTensorView
    high_percentile_q = 99.999
    scaling_shape = ()


class DynamicPerTokenScaling(ExtendedInjector):
    """Abs-max of each token (row of the last dim), recomputed on every call."""

    scaling_impl = StatsScaling
    scaling_stats_impl = AbsMax
    scaling_stats_input_view_shape_impl = OverTokenView


class PerGroupScaling(ExtendedInjector):
    """Abs-max of each block of ``group_size`` input channels of every output channel (the
    layer's ``input_channel_dim`` of the weight: 1 for Linear and Conv, 0 for ConvTranspose)."""

    scaling_impl = StatsScaling
    scaling_stats_impl = AbsMax
    scaling_stats_input_view_shape_impl = OverGroupView
    group_size = 32

    @value
    def group_dim(module):
        layer = module[0] if isinstance(module, tuple) else module
        return getattr(layer, "input_channel_dim", 1)


class MinMaxInitScaling(ExtendedInjector):
    """A learned scale initialised from the ``min_val``/``max_val`` the layer declares (hard-tanh)."""

    scaling_impl = ParameterScaling

    @value
    def scaling_init(min_val, max_val):
        return max(abs(float(min_val)), abs(float(max_val)))


class MSEStats(ExtendedInjector):
    """Clipping threshold that minimises the mean squared quantization error."""

    scaling_stats_impl = MSE


class ConstUnitScaling(ExtendedInjector):
    """A constant scale of 1 (binary and ternary quantizers scale through the weights)."""

    scaling_impl = ConstScaling
    scaling_init = 1.0


class PowerOfTwoScaling(ExtendedInjector):
    """Scales restricted to powers of two (fixed point), ceil of the exponent by default."""

    restrict_scaling_impl = PowerOfTwoRestrictValue
    int_scaling_impl = PowerOfTwoIntScaling


# -- zero points --------------------------------------------------------------------------------


class ShiftedWeightZeroPoint(ExtendedInjector):
    """Asymmetric weights: range ``[min(w, 0), max(w, 0)]``, zero point from its lower end."""

    signed = False
    scaling_stats_impl = AbsMinMax
    zero_point_impl = StatsZeroPoint
    zero_point_stats_impl = NegativeMinOrZero

    @value
    def zero_point_stats_input_view_shape_impl(scaling_per_output_channel):
        return OverOutputChannelView if scaling_per_output_channel else OverTensorView


class ShiftedActZeroPoint(ExtendedInjector):
    """Asymmetric activations: percentile interval for the range, collected lower end for the
    zero point, both learned after collection."""

    signed = False
    scaling_stats_impl = PercentileInterval
    low_percentile_q = 0.001
    zero_point_impl = ParameterFromRuntimeStatsZeroPoint
    zero_point_stats_impl = NegativePercentileOrZero
    zero_point_stats_input_view_shape_impl = OverTensorView
    zero_point_shape = ()
