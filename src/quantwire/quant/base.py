"""Building blocks of the catalogue: small injectors, each declaring one aspect of a quantizer.

Catalogue quantizers are these blocks combined by inheritance; nothing here has logic beyond
the ``@value`` choices that follow from other attributes.
"""

from torch import Tensor

from quantwire.core.bit_width import BitWidthConst
from quantwire.core.function_wrapper import (
    OverChannelView,
    OverGroupView,
    OverOutputChannelView,
    OverTensorView,
    OverTokenView,
    TensorClamp,
    TensorClampSte,
)
from quantwire.core.quant import (
    AdaRoundRounding,
    FloatQuant,
    FloatScaling,
    IntQuant,
    LearnedRoundIntQuant,
    PactIntQuant,
    PrescaledIntQuant,
    RescalingIntQuant,
)
from quantwire.core.restrict_val import FloatRestrictValue, PowerOfTwoRestrictValue
from quantwire.core.scaling import (
    ConstScaling,
    IntScaling,
    LsqGradScale,
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
    TensorStats,
)
from quantwire.core.utils import non_finite_kind
from quantwire.core.zero_point import ParameterFromRuntimeStatsZeroPoint, StatsZeroPoint, ZeroZeroPoint
from quantwire.errors import QuantConfigError, QuantInputError
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


class DynamicPerTensorScaling(ExtendedInjector):
    """The abs-max of each tensor, recomputed on every call (dynamic activation quantization,
    gradients)."""

    scaling_impl = StatsScaling
    scaling_stats_impl = AbsMax
    scaling_stats_input_view_shape_impl = OverTensorView


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
    def group_dim(module, group_size):
        layer = module[0] if isinstance(module, tuple) else module
        dim = getattr(layer, "input_channel_dim", 1)
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() <= dim:
            raise QuantConfigError(
                f"per-group scaling groups the input channels of a weight; {type(layer).__name__} has none"
            )
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise QuantConfigError(f"group_size must be a positive integer, got {group_size!r}")
        if weight.shape[dim] % group_size:
            raise QuantConfigError(
                f"group_size={group_size} does not divide the {weight.shape[dim]} input channels of "
                f"{type(layer).__name__}.weight {tuple(weight.shape)}"
            )
        return dim


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


class ParameterFromWeightStatsScaling(ExtendedInjector):
    """A learned weight scale, initialised when the quantizer is built from the statistic of the
    layer's weight that ``scaling_stats_impl`` computes over ``scaling_stats_input_view_shape_impl``
    (per tensor or per output channel). A layer that quantizes something other than its
    ``weight`` (a conv with a folded BatchNorm) says what through ``quant_weight_source()``.
    Rebuilt from the loaded weight on ``load_state_dict``, after which a saved learned scale wins."""

    scaling_impl = ParameterScaling

    @value
    def scaling_init(module, scaling_stats_impl, scaling_stats_input_view_shape_impl):
        layer = module[0] if isinstance(module, tuple) else module
        source = getattr(layer, "quant_weight_source", None)
        weight = source() if callable(source) else getattr(layer, "weight", None)
        if weight is None:
            raise QuantConfigError(f"{type(layer).__name__} has no weight to initialise a learned scale from")
        bad = non_finite_kind(weight)
        if bad is not None:
            raise QuantInputError(
                f"{type(layer).__name__}.weight holds {bad} values; can not initialise a learned scale from it"
            )
        stats = TensorStats(scaling_stats_impl, scaling_stats_input_view_shape_impl)
        return stats(weight.detach().float()).clamp_min(1e-10)

    @value
    def scaling_shape(scaling_init):
        return tuple(scaling_init.shape)


class PerTokenPositionRuntimeStatsScaling(ExtendedInjector):
    """One collected-then-learned scale per token position of ``(batch, num_tokens, features)``
    activations (Torch2Chip's token-wise LSQ): a vision transformer has a fixed ``num_tokens``,
    which the quantizer must be told (``input_num_tokens=197``)."""

    scaling_stats_input_view_shape_impl = OverChannelView
    channel_dim = -2

    @value
    def scaling_shape(num_tokens):
        return (int(num_tokens), 1)  # broadcasts against (batch, tokens, features) and (tokens, features)


# -- QAT and PTQ algorithms ---------------------------------------------------------------------


class LsqGradientScaling(ExtendedInjector):
    """LSQ's gradient scale ``1 / sqrt(N * Qp)`` on the learned scale (and zero point), with
    clipping gradients (0 outside the range) so that the scale gets LSQ's full gradient."""

    grad_scale_impl = LsqGradScale
    tensor_clamp_impl = TensorClamp


class PactClipping(ExtendedInjector):
    """PACT: the scale's threshold is the learned clipping level ``alpha``; gradients are those
    of ``clamp(x, 0, alpha)`` (the rounding error is constant to autograd)."""

    int_quant = PactIntQuant
    tensor_clamp_impl = TensorClamp


class AdaRoundLearnedRounding(ExtendedInjector):
    """AdaRound: per-weight learned rounding up or down (hard decisions, soft while
    :func:`quantwire.algorithms.adaround` or block reconstruction optimises them)."""

    int_quant = LearnedRoundIntQuant
    float_to_int_impl = AdaRoundRounding
    learned_round_zeta = 1.1
    learned_round_gamma = -0.1

    @value
    def learned_round_shape(module):
        layer = module[0] if isinstance(module, tuple) else module
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor):
            raise QuantConfigError(f"learned rounding rounds a weight; {type(layer).__name__} has none")
        return tuple(weight.shape)


class QuantDropMixin(ExtendedInjector):
    """QDrop: in training mode each activation element stays unquantized with probability
    ``quant_drop_prob``."""

    quant_drop_prob = 0.5


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
