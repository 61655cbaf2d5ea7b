"""One instance of every core module class, each with example inputs and a call protocol.

``zoo()`` returns ``(name, factory)`` pairs. ``factory()`` seeds the global RNG, builds the
module and returns ``(module, make_inputs)``; ``make_inputs(step)`` returns the positional
inputs of the ``step``-th call (a tuple of tensors, fresh each time, the same on every run).
Every class is the top-level module of at least one entry (``test_jit.py`` checks this against
the classes found under ``quantwire.core``); several appear in more than one configuration (per
tensor / per channel / per group, signed / unsigned, saturating / not, delayed, stochastic).

``run_protocol(module, make_inputs)`` is the call sequence every test uses: eval first (state
not yet collected), then training steps (running statistics, delayed quantization, collection
of a learned parameter's initial value), then eval again. Each call is made with the global
RNG reseeded (stochastic rounding), floating inputs requiring grad, and is followed by a
backward pass (uneven upstream gradient); it returns the outputs, the input gradients and the
parameter gradients.

This file is imported both by the tests and by a subprocess that runs with ``QUANTWIRE_JIT=1``
(where every module built here is a ``torch.jit.ScriptModule``), so it must not build any
module at import time.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from quantwire.core.bit_width import BitWidthConst, BitWidthParameter
from quantwire.core.function_wrapper import (
    BinarySignSte,
    CeilSte,
    FloorSte,
    Identity,
    OverBatchOverTensorView,
    OverChannelView,
    OverGroupView,
    OverOutputChannelView,
    OverTensorView,
    OverTokenView,
    RoundSte,
    RoundToZeroSte,
    ScalarClampMinSte,
    StochasticRoundSte,
    TensorClamp,
    TensorClampSte,
    TernarySignSte,
)
from quantwire.core.pruning import MagnitudeMask, NMMask
from quantwire.core.quant import (
    AdaRoundRounding,
    BinaryQuant,
    ClampedBinaryQuant,
    DelayWrapper,
    FloatQuant,
    FloatScaling,
    IntQuant,
    LearnedRoundIntQuant,
    PactIntQuant,
    PrescaledIntQuant,
    RescalingIntQuant,
    TernaryQuant,
)
from quantwire.core.restrict_val import (
    FloatRestrictValue,
    LogFloatRestrictValue,
    PowerOfTwoRestrictValue,
    RestrictClampValue,
)
from quantwire.core.scaling import (
    ConstScaling,
    IntScaling,
    LsqGradScale,
    NoGradScale,
    ParameterFromRuntimeStatsScaling,
    ParameterScaling,
    PowerOfTwoIntScaling,
    RuntimeStatsScaling,
    StatsScaling,
)
from quantwire.core.stats import (
    MSE,
    AbsMax,
    AbsMinMax,
    AbsPercentile,
    HistogramEntropy,
    HistogramMSE,
    HistogramPercentile,
    HistogramStats,
    NegativeMinOrZero,
    NegativePercentileOrZero,
    ParameterFromRuntimeStats,
    PercentileInterval,
    RunningAbsMax,
    RunningAbsMinMax,
    RunningNegativeMinOrZero,
    RuntimeStats,
    TensorStats,
)
from quantwire.core.utils import StatelessBuffer
from quantwire.core.zero_point import (
    LowToZeroPoint,
    ParameterFromRuntimeStatsZeroPoint,
    ParameterZeroPoint,
    RuntimeStatsZeroPoint,
    StatsZeroPoint,
    ZeroZeroPoint,
)

SEED = 20240611

Inputs = tuple[Tensor, ...]
MakeInputs = Callable[[int], Inputs]
Factory = Callable[[], tuple[nn.Module, MakeInputs]]

# (training mode, step) of every call of the protocol: eval before any statistic was collected,
# three training steps (enough to get past quant_delay_steps=2 and collect_stats_steps=2),
# then eval twice (frozen statistics, learned parameters).
PROTOCOL: tuple[tuple[bool, int], ...] = ((False, 0), (True, 1), (True, 2), (True, 3), (False, 4), (False, 5))


# ---------------------------------------------------------------------------------------------
# Inputs


def _gen(step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + 1009 * step + salt)


def _randn(g: torch.Generator, *shape: int, std: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=g) * std


def _with_specials(x: Tensor, step: int) -> Tensor:
    """Puts exact zeros and halves (rounding ties at scale 1/8) into ``x``, and makes the
    magnitude vary with ``step`` so that running statistics change from call to call."""
    flat = x.flatten().clone()
    n = flat.numel()
    flat[0] = 0.0
    if n > 4:
        flat[1] = 0.5
        flat[2] = -1.5
        flat[3] = 2.5 / 8
    return (flat * (1.0 + 0.25 * step)).reshape(x.shape)


def _inputs(build: Callable[[torch.Generator, int], Inputs]) -> MakeInputs:
    def make_inputs(step: int) -> Inputs:
        return build(_gen(step), step)

    return make_inputs


def _x(*shape: int, std: float = 1.0) -> MakeInputs:
    """One input tensor of ``shape``."""
    return _inputs(lambda g, step: (_with_specials(_randn(g, *shape, std=std), step),))


def _positive(*shape: int) -> MakeInputs:
    """One strictly positive input (statistics, scales, restriction domains)."""
    return _inputs(lambda g, step: (torch.rand(*shape, generator=g) * (1.0 + step) + 1e-3,))


def _none() -> MakeInputs:
    return lambda step: ()


WEIGHT = (4, 3, 3, 3)  # a conv weight: output channels first
ACT = (2, 4, 3, 3)  # an NCHW activation
TOKENS = (2, 5, 8)  # (batch, tokens, features)
MATRIX = (4, 40)  # a (groups, elements) matrix, as views produce


# ---------------------------------------------------------------------------------------------
# Factories


def _seeded(build: Callable[[], tuple[nn.Module, MakeInputs]]) -> Factory:
    def factory() -> tuple[nn.Module, MakeInputs]:
        torch.manual_seed(SEED)
        return build()

    return factory


def _clamp_inputs(g: torch.Generator, step: int) -> Inputs:
    x = _with_specials(_randn(g, 3, 8, std=2.0), step)
    low = -torch.rand(3, 1, generator=g) - 0.5
    high = torch.rand(1, 8, generator=g) + 0.5
    return x, low, high


def _zero_point_inputs(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> MakeInputs:
    """``(x, scale, bit_width)``, as a quantizer calls its zero-point module."""

    def build(g: torch.Generator, step: int) -> Inputs:
        x = _with_specials(_randn(g, *shape) + 0.5, step)
        scale = torch.rand(scale_shape, generator=g) * 0.05 + 0.01
        return x, scale, torch.tensor(8.0)

    return _inputs(build)


def _int_quant_inputs(g: torch.Generator, step: int) -> Inputs:
    """``(scale, zero_point, bit_width, x)`` with values on ties of the grid and beyond the range."""
    scale = torch.tensor([[0.125], [0.25], [0.5]])
    zero_point = torch.tensor([[0.0], [3.0], [-2.0]])
    codes = torch.randint(-200, 200, (3, 16), generator=g).float() / 2.0  # halves: rounding ties
    x = (codes - zero_point) * scale * (1.0 + step % 2)
    return scale, zero_point, torch.tensor(4.0), x


def _bias_inputs(g: torch.Generator, step: int) -> Inputs:
    """``(x, scale)``: a bias and the product of input and weight scales it is quantized with."""
    x = _with_specials(_randn(g, 6, std=4.0), step)
    return x, torch.rand(6, generator=g) * 0.1 + 0.01


def _bit_width_input(step: int) -> Inputs:
    return (torch.tensor(float(2 + step)),)


def _pruning_mask(mask: nn.Module, *shape: int) -> tuple[nn.Module, MakeInputs]:
    """``mask`` initialised from a fixed weight of ``shape``, called on weights of that shape."""
    mask.init_mask(_randn(_gen(0, salt=17), *shape))
    return mask, _x(*shape)


def _delay_inputs(g: torch.Generator, step: int) -> Inputs:
    x = _randn(g, 3, 5)
    return x, torch.round(x * 4) / 4


def zoo() -> list[tuple[str, Factory]]:
    """Every core module class, some in several configurations: ``(name, factory)`` pairs."""
    entries: list[tuple[str, Callable[[], tuple[nn.Module, MakeInputs]]]] = [
        # --- utils
        ("StatelessBuffer", lambda: (StatelessBuffer(torch.arange(6.0).reshape(2, 3)), _none())),
        # --- bit_width
        ("BitWidthConst", lambda: (BitWidthConst(5), _none())),
        ("BitWidthParameter", lambda: (BitWidthParameter(4, min_bit_width=2, max_bit_width=8), _none())),
        # --- function_wrapper.ops
        ("Identity", lambda: (Identity(), _x(3, 7))),
        ("RoundSte", lambda: (RoundSte(), _x(3, 7, std=4.0))),
        ("FloorSte", lambda: (FloorSte(), _x(3, 7, std=4.0))),
        ("CeilSte", lambda: (CeilSte(), _x(3, 7, std=4.0))),
        ("RoundToZeroSte", lambda: (RoundToZeroSte(), _x(3, 7, std=4.0))),
        ("StochasticRoundSte", lambda: (StochasticRoundSte(), _x(3, 7, std=4.0))),
        (
            "StochasticRoundSte/stochastic_inference",
            lambda: (StochasticRoundSte(deterministic_inference=False), _x(3, 7, std=4.0)),
        ),
        ("BinarySignSte", lambda: (BinarySignSte(), _x(3, 7))),
        ("TernarySignSte", lambda: (TernarySignSte(), _x(3, 7))),
        ("TensorClamp", lambda: (TensorClamp(), _inputs(_clamp_inputs))),
        ("TensorClampSte", lambda: (TensorClampSte(), _inputs(_clamp_inputs))),
        ("ScalarClampMinSte", lambda: (ScalarClampMinSte(-0.25), _x(3, 7))),
        # --- function_wrapper.view (forward; restore is exercised through TensorStats below)
        ("OverTensorView", lambda: (OverTensorView(), _x(*ACT))),
        ("OverChannelView", lambda: (OverChannelView(1), _x(*ACT))),
        ("OverChannelView/last", lambda: (OverChannelView(-1), _x(*TOKENS))),
        ("OverOutputChannelView", lambda: (OverOutputChannelView(), _x(*WEIGHT))),
        ("OverTokenView", lambda: (OverTokenView(), _x(*TOKENS))),
        ("OverBatchOverTensorView", lambda: (OverBatchOverTensorView(), _x(*ACT))),
        ("OverGroupView", lambda: (OverGroupView(4), _x(*TOKENS))),
        ("OverGroupView/dim1", lambda: (OverGroupView(2, group_dim=1), _x(*ACT))),
        # --- stats.stats (on a (groups, elements) matrix)
        ("AbsMax", lambda: (AbsMax(), _x(*MATRIX))),
        ("AbsMinMax", lambda: (AbsMinMax(), _x(*MATRIX))),
        ("NegativeMinOrZero", lambda: (NegativeMinOrZero(), _x(*MATRIX))),
        ("AbsPercentile", lambda: (AbsPercentile(95.0), _x(*MATRIX))),
        ("NegativePercentileOrZero", lambda: (NegativePercentileOrZero(5.0), _x(*MATRIX))),
        ("PercentileInterval", lambda: (PercentileInterval(2.0, 98.0), _x(*MATRIX))),
        ("MSE", lambda: (MSE(4, num_candidates=25), _x(*MATRIX))),
        (
            "MSE/unsigned_narrow",
            lambda: (MSE(3, signed=False, narrow_range=True, num_candidates=7), _x(*MATRIX)),
        ),
        # --- stats.sources
        ("TensorStats/tensor", lambda: (TensorStats(AbsMax(), OverTensorView()), _x(*ACT))),
        ("TensorStats/channel", lambda: (TensorStats(AbsMax(), OverOutputChannelView()), _x(*WEIGHT))),
        ("TensorStats/channel_last", lambda: (TensorStats(AbsMinMax(), OverChannelView(-1)), _x(*TOKENS))),
        ("TensorStats/token", lambda: (TensorStats(AbsMax(), OverTokenView()), _x(*TOKENS))),
        ("TensorStats/batch", lambda: (TensorStats(AbsMax(), OverBatchOverTensorView()), _x(*ACT))),
        ("TensorStats/group", lambda: (TensorStats(AbsMax(), OverGroupView(4)), _x(*TOKENS))),
        ("TensorStats/group_dim1", lambda: (TensorStats(NegativeMinOrZero(), OverGroupView(2, 1)), _x(*ACT))),
        ("RuntimeStats/ema", lambda: (RuntimeStats(AbsMax(), OverTensorView(), (), 0.1), _x(*ACT))),
        (
            "RuntimeStats/average_per_channel",
            lambda: (RuntimeStats(AbsMinMax(), OverChannelView(1), (1, 4, 1, 1), None), _x(*ACT)),
        ),
        (
            "ParameterFromRuntimeStats",
            lambda: (
                ParameterFromRuntimeStats(2, AbsMax(), OverTensorView(), FloatRestrictValue()),
                _x(*ACT),
            ),
        ),
        (
            "ParameterFromRuntimeStats/log_per_channel",
            lambda: (
                ParameterFromRuntimeStats(
                    2, AbsPercentile(90.0), OverChannelView(1), LogFloatRestrictValue(), (1, 4, 1, 1), 0.5
                ),
                _x(*ACT),
            ),
        ),
        # --- stats.observers (state across calls, kept out of the state dict)
        ("RunningAbsMax", lambda: (RunningAbsMax(), _x(*MATRIX))),
        ("RunningAbsMinMax", lambda: (RunningAbsMinMax(), _x(*MATRIX))),
        ("RunningNegativeMinOrZero", lambda: (RunningNegativeMinOrZero(), _x(*MATRIX))),
        ("HistogramStats", lambda: (HistogramStats(64), _x(*MATRIX))),
        ("HistogramEntropy", lambda: (HistogramEntropy(4, histogram_num_bins=64), _x(*MATRIX))),
        (
            "HistogramEntropy/unsigned_narrow_stride",
            lambda: (HistogramEntropy(3, False, True, 64, 5, False), _x(*MATRIX)),
        ),
        ("HistogramMSE", lambda: (HistogramMSE(4, histogram_num_bins=64), _x(*MATRIX))),
        ("HistogramMSE/unsigned_narrow", lambda: (HistogramMSE(3, False, True, 64), _x(*MATRIX))),
        ("HistogramPercentile", lambda: (HistogramPercentile(95.0, 64), _x(*MATRIX))),
        (
            "RuntimeStats/histogram_observer",
            lambda: (RuntimeStats(HistogramEntropy(4, histogram_num_bins=64), OverTensorView(), (), 1.0), _x(*ACT)),
        ),
        (
            "ParameterFromRuntimeStatsScaling/running_max",
            lambda: (ParameterFromRuntimeStatsScaling(2, RunningAbsMax(), scaling_stats_momentum=1.0), _x(*ACT)),
        ),
        # --- restrict_val
        ("FloatRestrictValue", lambda: (FloatRestrictValue(), _positive(3, 4))),
        ("LogFloatRestrictValue", lambda: (LogFloatRestrictValue(), _x(3, 4, std=3.0))),
        ("PowerOfTwoRestrictValue", lambda: (PowerOfTwoRestrictValue(), _x(3, 4, std=3.0))),
        ("PowerOfTwoRestrictValue/round", lambda: (PowerOfTwoRestrictValue(RoundSte()), _x(3, 4, std=3.0))),
        ("RestrictClampValue/float", lambda: (RestrictClampValue(FloatRestrictValue(), 0.2), _x(3, 4))),
        ("RestrictClampValue/log", lambda: (RestrictClampValue(LogFloatRestrictValue(), 0.2), _x(3, 4))),
        ("RestrictClampValue/po2", lambda: (RestrictClampValue(PowerOfTwoRestrictValue(), 0.2), _x(3, 4))),
        ("RestrictClampValue/no_floor", lambda: (RestrictClampValue(FloatRestrictValue(), None), _x(3, 4))),
        # --- scaling
        ("IntScaling/signed", lambda: (IntScaling(True, False), _bit_width_input)),
        ("IntScaling/signed_narrow", lambda: (IntScaling(True, True), _bit_width_input)),
        ("IntScaling/unsigned", lambda: (IntScaling(False, False), _bit_width_input)),
        ("PowerOfTwoIntScaling/signed", lambda: (PowerOfTwoIntScaling(True), _bit_width_input)),
        ("PowerOfTwoIntScaling/unsigned", lambda: (PowerOfTwoIntScaling(False), _bit_width_input)),
        ("ConstScaling", lambda: (ConstScaling(0.3), _x(*ACT))),
        ("ConstScaling/po2", lambda: (ConstScaling([0.3, 0.7], PowerOfTwoRestrictValue()), _x(3, 2))),
        ("ParameterScaling", lambda: (ParameterScaling(0.3), _x(*ACT))),
        (
            "ParameterScaling/log_per_channel",
            lambda: (ParameterScaling(0.3, (4, 1, 1, 1), LogFloatRestrictValue(), 1e-4), _x(*WEIGHT)),
        ),
        ("StatsScaling/tensor", lambda: (StatsScaling(AbsMax()), _x(*WEIGHT))),
        (
            "StatsScaling/channel_po2",
            lambda: (StatsScaling(AbsMax(), OverOutputChannelView(), PowerOfTwoRestrictValue()), _x(*WEIGHT)),
        ),
        (
            "StatsScaling/token_log",
            lambda: (StatsScaling(AbsMax(), OverTokenView(), LogFloatRestrictValue()), _x(*TOKENS)),
        ),
        ("RuntimeStatsScaling", lambda: (RuntimeStatsScaling(AbsPercentile(99.0)), _x(*ACT))),
        (
            "RuntimeStatsScaling/channel_po2",
            lambda: (
                RuntimeStatsScaling(AbsMax(), OverChannelView(1), (1, 4, 1, 1), None, PowerOfTwoRestrictValue()),
                _x(*ACT),
            ),
        ),
        (
            "ParameterFromRuntimeStatsScaling",
            lambda: (ParameterFromRuntimeStatsScaling(2, AbsMax()), _x(*ACT)),
        ),
        (
            "ParameterFromRuntimeStatsScaling/channel_log",
            lambda: (
                ParameterFromRuntimeStatsScaling(
                    2, AbsMax(), OverChannelView(-1), (1, 1, 8), 0.3, LogFloatRestrictValue()
                ),
                _x(*TOKENS),
            ),
        ),
        # --- zero_point
        ("ZeroZeroPoint", lambda: (ZeroZeroPoint(), _zero_point_inputs(ACT, ()))),
        (
            "LowToZeroPoint/unsigned",
            lambda: (LowToZeroPoint(False, False), _zero_point_inputs((3, 1), (3, 1))),
        ),
        (
            "LowToZeroPoint/signed_narrow",
            lambda: (LowToZeroPoint(True, True), _zero_point_inputs((3, 1), ())),
        ),
        (
            "StatsZeroPoint",
            lambda: (StatsZeroPoint(False, False, NegativeMinOrZero()), _zero_point_inputs(ACT, ())),
        ),
        (
            "StatsZeroPoint/channel",
            lambda: (
                StatsZeroPoint(False, False, NegativePercentileOrZero(10.0), OverOutputChannelView()),
                _zero_point_inputs(WEIGHT, (4, 1, 1, 1)),
            ),
        ),
        (
            "RuntimeStatsZeroPoint",
            lambda: (RuntimeStatsZeroPoint(False, False, NegativeMinOrZero()), _zero_point_inputs(ACT, ())),
        ),
        (
            "RuntimeStatsZeroPoint/channel_average",
            lambda: (
                RuntimeStatsZeroPoint(False, True, NegativeMinOrZero(), OverChannelView(1), (1, 4, 1, 1), None),
                _zero_point_inputs(ACT, (1, 4, 1, 1)),
            ),
        ),
        ("ParameterZeroPoint", lambda: (ParameterZeroPoint(False, False, -0.3), _zero_point_inputs(ACT, ()))),
        (
            "ParameterZeroPoint/channel",
            lambda: (
                ParameterZeroPoint(True, False, -0.3, (4, 1, 1, 1)),
                _zero_point_inputs(WEIGHT, (4, 1, 1, 1)),
            ),
        ),
        (
            "ParameterFromRuntimeStatsZeroPoint",
            lambda: (
                ParameterFromRuntimeStatsZeroPoint(False, False, 2, NegativeMinOrZero()),
                _zero_point_inputs(ACT, ()),
            ),
        ),
        (
            "ParameterFromRuntimeStatsZeroPoint/channel_ema",
            lambda: (
                ParameterFromRuntimeStatsZeroPoint(
                    False, False, 2, NegativeMinOrZero(), OverChannelView(1), (1, 4, 1, 1), 0.5
                ),
                _zero_point_inputs(ACT, (1, 4, 1, 1)),
            ),
        ),
        # --- quant
        ("DelayWrapper", lambda: (DelayWrapper(2), _inputs(_delay_inputs))),
        ("DelayWrapper/none", lambda: (DelayWrapper(0), _inputs(_delay_inputs))),
        ("IntQuant", lambda: (IntQuant(True), _inputs(_int_quant_inputs))),
        (
            "IntQuant/unsigned_narrow_floor_ste_delay",
            lambda: (IntQuant(False, True, FloorSte(), TensorClampSte(), 2), _inputs(_int_quant_inputs)),
        ),
        (
            "IntQuant/stochastic",
            lambda: (IntQuant(True, False, StochasticRoundSte()), _inputs(_int_quant_inputs)),
        ),
        (
            "PrescaledIntQuant",
            lambda: (PrescaledIntQuant(IntQuant(True), BitWidthConst(8)), _inputs(_bias_inputs)),
        ),
        (
            "PrescaledIntQuant/narrow_learned_bits_delay",
            lambda: (
                PrescaledIntQuant(IntQuant(True, True, quant_delay_steps=2), BitWidthParameter(4, 2, 8)),
                _inputs(_bias_inputs),
            ),
        ),
        ("RescalingIntQuant/weight_per_channel", _weight_per_channel_quant),
        ("RescalingIntQuant/weight_asymmetric", _weight_asymmetric_quant),
        ("RescalingIntQuant/act_runtime_po2", _act_runtime_po2_quant),
        ("RescalingIntQuant/act_learned", _act_learned_quant),
        ("RescalingIntQuant/act_parameter", _act_parameter_quant),
        ("RescalingIntQuant/dynamic_token_mse", _dynamic_token_mse_quant),
        ("RescalingIntQuant/group", _group_quant),
        ("BinaryQuant", lambda: (BinaryQuant(StatsScaling(AbsMax())), _x(*WEIGHT))),
        ("BinaryQuant/const_delay", lambda: (BinaryQuant(ConstScaling(0.5), quant_delay_steps=2), _x(*ACT))),
        ("ClampedBinaryQuant", lambda: (ClampedBinaryQuant(ParameterScaling(0.7)), _x(*ACT))),
        (
            "ClampedBinaryQuant/ste_channel",
            lambda: (
                ClampedBinaryQuant(StatsScaling(AbsMax(), OverOutputChannelView()), True, TensorClampSte()),
                _x(*WEIGHT),
            ),
        ),
        ("TernaryQuant", lambda: (TernaryQuant(StatsScaling(AbsMax())), _x(*WEIGHT))),
        (
            "TernaryQuant/runtime_delay",
            lambda: (TernaryQuant(RuntimeStatsScaling(AbsMax()), 0.3, quant_delay_steps=2), _x(*ACT)),
        ),
        ("FloatScaling/e4m3", lambda: (FloatScaling(4, 3), _none())),
        ("FloatScaling/e5m2", lambda: (FloatScaling(5, 2, has_inf=True), _none())),
        ("FloatScaling/e2m1", lambda: (FloatScaling(2, 1, has_nan=False), _none())),
        ("FloatQuant/e4m3_per_channel", _fp8_e4m3_per_channel_quant),
        ("FloatQuant/e5m2_non_saturating", _fp8_e5m2_non_saturating_quant),
        ("FloatQuant/e4m3_non_saturating_nan", _fp8_e4m3_non_saturating_nan_quant),
        ("FloatQuant/e2m1_runtime", _fp4_runtime_quant),
        ("FloatQuant/unsigned_stochastic_delay", _float_unsigned_stochastic_quant),
        # --- algorithms' building blocks
        ("NoGradScale", lambda: (NoGradScale(), _inputs(_grad_scale_inputs))),
        ("LsqGradScale", lambda: (LsqGradScale(True, False), _inputs(_grad_scale_inputs))),
        ("LsqGradScale/unsigned_narrow", lambda: (LsqGradScale(False, True), _inputs(_grad_scale_inputs))),
        ("PactIntQuant", lambda: (PactIntQuant(False), _inputs(_int_quant_inputs))),
        (
            "PactIntQuant/signed_delay",
            lambda: (PactIntQuant(True, True, quant_delay_steps=2), _inputs(_int_quant_inputs)),
        ),
        ("AdaRoundRounding", lambda: (AdaRoundRounding((3, 7)), _x(3, 7, std=4.0))),
        (
            "LearnedRoundIntQuant",
            lambda: (LearnedRoundIntQuant(True, True, AdaRoundRounding((3, 16))), _inputs(_int_quant_inputs)),
        ),
        ("RescalingIntQuant/lsq_act", _lsq_act_quant),
        ("RescalingIntQuant/adaround_weight", _adaround_weight_quant),
        # --- pruning
        ("MagnitudeMask", lambda: _pruning_mask(MagnitudeMask(0.6), *WEIGHT)),
        ("MagnitudeMask/uninitialised", lambda: (MagnitudeMask(0.5), _x(*WEIGHT))),
        ("NMMask", lambda: _pruning_mask(NMMask(2, 4, 1), 4, 8)),
        ("NMMask/conv_transpose_1of4", lambda: _pruning_mask(NMMask(1, 4, 0), *WEIGHT)),
    ]
    return [(name, _seeded(build)) for name, build in entries]


# --- full quantizers


def weight_per_channel_quant() -> RescalingIntQuant:
    """A signed narrow-range 4-bit weight quantizer, abs-max per output channel."""
    return RescalingIntQuant(
        IntQuant(True, True),
        StatsScaling(AbsMax(), OverOutputChannelView()),
        IntScaling(True, True),
        ZeroZeroPoint(),
        BitWidthConst(4),
    )


def fp8_e4m3_quant() -> FloatQuant:
    """FP8 E4M3 (OCP "fn") with a per-channel abs-max scale mapped to the format's maximum."""
    return FloatQuant(
        4,
        3,
        StatsScaling(AbsMax(), OverOutputChannelView()),
        float_scaling_impl=FloatScaling(4, 3),
    )


def _weight_per_channel_quant() -> tuple[nn.Module, MakeInputs]:
    return weight_per_channel_quant(), _x(*WEIGHT)


def _grad_scale_inputs(g: torch.Generator, step: int) -> Inputs:
    """``(value, x, bit_width)``: a per-channel scale, the activation it scales, its bit width."""
    return torch.rand(1, 4, 1, 1, generator=g) + 0.1, _randn(g, *ACT), torch.tensor(4.0)


def _lsq_act_quant() -> tuple[nn.Module, MakeInputs]:
    quant = RescalingIntQuant(
        IntQuant(False, False),
        ParameterFromRuntimeStatsScaling(2, AbsMax()),
        IntScaling(False, False),
        ParameterFromRuntimeStatsZeroPoint(False, False, 2, NegativeMinOrZero()),
        BitWidthConst(4),
        LsqGradScale(False, False),
    )
    return quant, _x(*ACT)


def _adaround_weight_quant() -> tuple[nn.Module, MakeInputs]:
    quant = RescalingIntQuant(
        LearnedRoundIntQuant(True, True, AdaRoundRounding(WEIGHT), TensorClampSte()),
        StatsScaling(AbsMax(), OverOutputChannelView()),
        IntScaling(True, True),
        ZeroZeroPoint(),
        BitWidthConst(4),
    )
    return quant, _x(*WEIGHT)


def _weight_asymmetric_quant() -> tuple[nn.Module, MakeInputs]:
    quant = RescalingIntQuant(
        IntQuant(False, False, RoundToZeroSte()),
        StatsScaling(AbsMinMax(), OverOutputChannelView()),
        IntScaling(False, False),
        StatsZeroPoint(False, False, NegativeMinOrZero(), OverOutputChannelView()),
        BitWidthConst(3),
    )
    return quant, _x(*WEIGHT)


def _act_runtime_po2_quant() -> tuple[nn.Module, MakeInputs]:
    quant = RescalingIntQuant(
        IntQuant(True, False, quant_delay_steps=1),
        RuntimeStatsScaling(AbsMax(), OverChannelView(1), (1, 4, 1, 1), 0.1, PowerOfTwoRestrictValue()),
        PowerOfTwoIntScaling(True),
        ZeroZeroPoint(),
        BitWidthConst(8),
    )
    return quant, _x(*ACT)


def _act_learned_quant() -> tuple[nn.Module, MakeInputs]:
    quant = RescalingIntQuant(
        IntQuant(False, False, CeilSte(), TensorClampSte()),
        ParameterFromRuntimeStatsScaling(
            2, PercentileInterval(1.0, 99.0), restrict_scaling_impl=LogFloatRestrictValue()
        ),
        IntScaling(False, False),
        ParameterFromRuntimeStatsZeroPoint(False, False, 2, NegativePercentileOrZero(1.0)),
        BitWidthParameter(5, 2, 8),
    )
    return quant, _x(*ACT)


def _act_parameter_quant() -> tuple[nn.Module, MakeInputs]:
    quant = RescalingIntQuant(
        IntQuant(False, False),
        ParameterScaling(1.5, (1, 4, 1, 1)),
        IntScaling(False, False),
        ParameterZeroPoint(False, False, -0.5),
        BitWidthConst(4),
    )
    return quant, _x(*ACT)


def _dynamic_token_mse_quant() -> tuple[nn.Module, MakeInputs]:
    quant = RescalingIntQuant(
        IntQuant(True, True),
        StatsScaling(MSE(4, True, True, num_candidates=10), OverTokenView()),
        IntScaling(True, True),
        RuntimeStatsZeroPoint(True, True, NegativeMinOrZero()),
        BitWidthConst(4),
    )
    return quant, _x(*TOKENS)


def _group_quant() -> tuple[nn.Module, MakeInputs]:
    quant = RescalingIntQuant(
        IntQuant(True, False, StochasticRoundSte()),
        StatsScaling(AbsMax(), OverGroupView(4), None, 1e-3),
        IntScaling(True, False),
        ZeroZeroPoint(),
        BitWidthConst(3),
    )
    return quant, _x(*TOKENS)


def _fp8_e4m3_per_channel_quant() -> tuple[nn.Module, MakeInputs]:
    return fp8_e4m3_quant(), _x(*WEIGHT)


def _fp8_e5m2_non_saturating_quant() -> tuple[nn.Module, MakeInputs]:
    # A constant scale small enough that the largest inputs overflow to +-inf.
    quant = FloatQuant(
        exponent_bit_width=5,
        mantissa_bit_width=2,
        scaling_impl=ConstScaling(1e-5),
        saturating=False,
        has_inf=True,
    )
    return quant, _x(*ACT)


def _fp8_e4m3_non_saturating_nan_quant() -> tuple[nn.Module, MakeInputs]:
    # Overflow becomes NaN (E4M3 "fn" has no infinities).
    quant = FloatQuant(
        exponent_bit_width=4,
        mantissa_bit_width=3,
        scaling_impl=ConstScaling(0.004),
        saturating=False,
    )
    return quant, _x(*ACT)


def _fp4_runtime_quant() -> tuple[nn.Module, MakeInputs]:
    quant = FloatQuant(
        exponent_bit_width=2,
        mantissa_bit_width=1,
        scaling_impl=RuntimeStatsScaling(AbsMax(), OverChannelView(1), (1, 4, 1, 1)),
        has_nan=False,
        float_scaling_impl=FloatScaling(2, 1, has_nan=False),
    )
    return quant, _x(*ACT)


def _float_unsigned_stochastic_quant() -> tuple[nn.Module, MakeInputs]:
    quant = FloatQuant(
        exponent_bit_width=3,
        mantissa_bit_width=2,
        scaling_impl=ParameterScaling(0.05),
        exponent_bias=2,
        signed=False,
        float_to_int_impl=StochasticRoundSte(),
        quant_delay_steps=1,
    )
    return quant, _x(*ACT)


# ---------------------------------------------------------------------------------------------
# Running


Outputs = tuple[Tensor, ...]
CallRecord = dict[str, object]


def as_tuple(out: object) -> Outputs:
    if isinstance(out, Tensor):
        return (out,)
    assert isinstance(out, tuple), type(out)
    return out


def _upstream(output: Tensor) -> Tensor:
    return torch.linspace(-1.0, 2.0, output.numel()).reshape(output.shape)


def call(module: nn.Module, make_inputs: MakeInputs, training: bool, step: int, backward: bool = True) -> CallRecord:
    """One call of the protocol: ``{"outputs", "input_grads", "param_grads"}`` (detached)."""
    module.train(training)
    inputs = tuple(t.requires_grad_(backward and t.is_floating_point()) for t in make_inputs(step))
    for p in module.parameters():
        p.grad = None
    torch.manual_seed(SEED + 7 * step)
    outputs = as_tuple(module(*inputs))
    record: CallRecord = {"outputs": tuple(o.detach().clone() for o in outputs)}
    if backward:
        differentiable = [o for o in outputs if o.requires_grad]
        if differentiable:
            # A fixed, uneven upstream gradient, so that every element's gradient counts.
            torch.autograd.backward([(o * _upstream(o)).sum() for o in differentiable])
        record["input_grads"] = tuple(None if t.grad is None else t.grad.clone() for t in inputs)
        record["param_grads"] = {
            name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()
        }
    return record


def run_protocol(
    module: nn.Module,
    make_inputs: MakeInputs,
    protocol: tuple[tuple[bool, int], ...] = PROTOCOL,
    backward: bool = True,
) -> list[CallRecord]:
    return [call(module, make_inputs, training, step, backward) for training, step in protocol]
