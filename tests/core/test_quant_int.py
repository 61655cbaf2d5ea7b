"""IntQuant and RescalingIntQuant properties: outputs on the integer grid, idempotence, half-step
error in range, clamping out of range, straight-through gradients, and per-channel, per-token
and per-group scales that quantize each slice independently."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from quantwire.core.bit_width import BitWidthConst
from quantwire.core.function_wrapper import (
    OverChannelView,
    OverGroupView,
    OverTensorView,
    OverTokenView,
    TensorClampSte,
)
from quantwire.core.quant import IntQuant, RescalingIntQuant
from quantwire.core.scaling import ConstScaling, IntScaling, ParameterScaling, StatsScaling
from quantwire.core.stats import AbsMax, AbsMinMax, NegativeMinOrZero
from quantwire.core.zero_point import StatsZeroPoint, ZeroZeroPoint


def int_range(bit_width: int, signed: bool, narrow_range: bool) -> tuple[int, int]:
    """The closed form, independent of ``quantwire.function.int_range``."""
    if signed:
        return -(2 ** (bit_width - 1)) + int(narrow_range), 2 ** (bit_width - 1) - 1
    return 0, 2**bit_width - 1 - int(narrow_range)


@dataclass
class Config:
    bit_width: int
    signed: bool
    narrow_range: bool
    scaling: str  # "stats", "const" or "parameter"
    asymmetric: bool  # unsigned with a StatsZeroPoint over NegativeMinOrZero
    threshold: float  # for "const" and "parameter"

    @property
    def range(self) -> tuple[int, int]:
        return int_range(self.bit_width, self.signed, self.narrow_range)

    def build(self, view: nn.Module | None = None, scaling_shape: tuple[int, ...] | None = None) -> nn.Module:
        view = OverTensorView() if view is None else view
        if self.scaling == "stats":
            scaling = StatsScaling(AbsMinMax() if self.asymmetric else AbsMax(), view)
        elif self.scaling == "const":
            scaling = ConstScaling(self.threshold)
        else:
            scaling = ParameterScaling(self.threshold, scaling_shape)
        if self.asymmetric:
            zero_point = StatsZeroPoint(False, self.narrow_range, NegativeMinOrZero(), view)
        else:
            zero_point = ZeroZeroPoint()
        return RescalingIntQuant(
            IntQuant(self.signed, self.narrow_range),
            scaling,
            IntScaling(self.signed, self.narrow_range),
            zero_point,
            BitWidthConst(self.bit_width),
        )


@st.composite
def configs(draw, scalings=("stats", "const", "parameter"), allow_asymmetric=True):
    signed = draw(st.booleans())
    narrow_range = draw(st.booleans())
    # A 1-bit narrow range has a single code and no scale; every other width is valid.
    bit_width = draw(st.integers(2 if narrow_range else 1, 16))
    scaling = draw(st.sampled_from(scalings))
    asymmetric = allow_asymmetric and not signed and draw(st.booleans())
    threshold = draw(st.floats(2**-6, 2**6, width=32))
    return Config(bit_width, signed, narrow_range, scaling, asymmetric, threshold)


def inputs(shape=None, magnitude=100.0):
    shape = st.integers(1, 24) if shape is None else shape
    elements = st.floats(-magnitude, magnitude, width=32)
    return arrays(np.float32, shape, elements=elements).map(torch.from_numpy)


def codes(y, scale, zero_point):
    return torch.round(y / scale + zero_point)


def assert_on_grid(y, scale, zero_point, low, high):
    k = codes(y, scale, zero_point)
    assert bool(((k >= low) & (k <= high)).all())
    assert torch.equal((k - zero_point) * scale, y)


@given(config=configs(), x=inputs())
def test_outputs_lie_on_the_integer_grid(config, x):
    y, scale, zero_point, bit_width = config.build()(x)
    low, high = config.range
    assert bit_width.item() == config.bit_width
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    assert torch.equal(zero_point, torch.round(zero_point))
    assert low <= zero_point.min().item() and zero_point.max().item() <= high
    assert_on_grid(y, scale, zero_point, low, high)


@given(config=configs(), x=inputs())
def test_requantizing_on_the_same_grid_is_the_identity(config, x):
    quant = config.build()
    y, scale, zero_point, bit_width = quant(x)
    assert torch.equal(quant.int_quant(scale, zero_point, bit_width, y), y)
    if config.scaling != "stats":  # the grid does not depend on the input
        assert torch.equal(quant(y)[0], y)


@given(config=configs(), x=inputs())
def test_error_in_range_is_at_most_half_a_step(config, x):
    y, scale, zero_point, _ = config.build()(x)
    low, high = config.range
    # Inputs that round to a code of the range (not clamped): [low - 1/2, high + 1/2] steps.
    position = x / scale + zero_point
    inside = (position >= low - 0.5) & (position <= high + 0.5)
    rounding_slack = 2.0**-21 * (x.abs() + (zero_point * scale).abs() + y.abs())
    bound = (scale / 2 + rounding_slack).expand_as(x)
    assert bool(((x - y).abs()[inside] <= bound[inside]).all())


@given(config=configs(scalings=("const", "parameter"), allow_asymmetric=False), data=st.data())
def test_out_of_range_inputs_clamp_to_the_ends(config, data):
    quant = config.build()
    low, high = config.range
    scale = config.threshold / (-low if config.signed else high)
    # Steps beyond the far ends (half a step or more), in either direction.
    beyond = data.draw(arrays(np.float64, st.integers(1, 16), elements=st.floats(0.5 + 1e-3, 40)))
    negative = data.draw(arrays(np.bool_, beyond.shape))
    codes_far = np.where(negative, low - beyond, high + beyond)
    x = torch.from_numpy(codes_far * scale).float()
    y, scale, zero_point, _ = quant(x)
    expected = torch.where(torch.from_numpy(negative), (low - zero_point) * scale, (high - zero_point) * scale)
    assert torch.equal(y, expected)


@given(config=configs(scalings=("stats",)), x=inputs())
def test_stats_threshold_maps_to_the_far_end_of_the_range(config, x):
    """The element of largest magnitude lands on ``±divisor`` codes, clamped to the range: the
    negative end exactly for signed, the positive end one code short unless narrow."""
    if config.asymmetric or float(x.abs().max()) < 1e-6:
        return
    y, scale, zero_point, _ = config.build()(x)
    low, high = config.range
    extreme = int(x.abs().argmax())
    divisor = -low if config.signed else high
    expected = min(max(divisor if x[extreme] >= 0 else -divisor, low), high)
    assert codes(y, scale, zero_point)[extreme].item() == expected


STE_POINTS = st.floats(-3.0, 3.0, width=32)


@given(
    x=arrays(np.float32, st.integers(1, 24), elements=STE_POINTS).map(torch.from_numpy),
    bit_width=st.integers(2, 8),
    signed=st.booleans(),
    narrow_range=st.booleans(),
    scale=st.floats(2**-4, 1.0, width=32),
)
def test_gradient_is_one_inside_and_zero_outside_by_default(x, bit_width, signed, narrow_range, scale):
    low, high = int_range(bit_width, signed, narrow_range)
    scale_t, zero, bits = torch.tensor(scale), torch.tensor(0.0), torch.tensor(float(bit_width))
    for clamp, clamps_gradient in ((None, True), (TensorClampSte(), False)):
        leaf = x.clone().requires_grad_(True)
        IntQuant(signed, narrow_range, tensor_clamp_impl=clamp)(scale_t, zero, bits, leaf).sum().backward()
        position = x / scale
        inside = (position >= low) & (position <= high)
        expected = inside.float() if clamps_gradient else torch.ones_like(x)
        assert torch.equal(leaf.grad, expected)


def grid(*ranges):
    return [tuple(index) for index in np.ndindex(*ranges)]


# (view, input shape, scale shape, the index of every slice that shares one scale)
SLICED_VIEWS = {
    "channel0": (lambda: OverChannelView(0), (3, 4, 2), (3, 1, 1), [(c,) for c in range(3)]),
    "channel1": (lambda: OverChannelView(1), (2, 3, 4), (1, 3, 1), [(slice(None), c) for c in range(3)]),
    "token": (lambda: OverTokenView(), (2, 3, 4), (2, 3, 1), grid(2, 3)),
    "group_last": (
        lambda: OverGroupView(4),
        (2, 8),
        (2, 8),
        [(r, slice(4 * g, 4 * g + 4)) for r, g in grid(2, 2)],
    ),
    "group_dim0": (
        lambda: OverGroupView(2, group_dim=0),
        (4, 3),
        (4, 3),
        [(slice(2 * g, 2 * g + 2), c) for g, c in grid(2, 3)],
    ),
}


@pytest.mark.parametrize("name", list(SLICED_VIEWS))
@given(config=configs(scalings=("stats",)), data=st.data())
def test_each_slice_is_quantized_independently(name, config, data):
    view, shape, scale_shape, slices = SLICED_VIEWS[name]
    quant, per_tensor = config.build(view()), config.build()
    x = data.draw(inputs(shape=shape))
    y, scale, zero_point, _ = quant(x)
    assert tuple(scale.shape) == scale_shape
    scale, zero_point = torch.broadcast_to(scale, shape), torch.broadcast_to(zero_point, shape)
    for index in slices:
        alone, alone_scale, alone_zero_point, _ = per_tensor(x[index])
        assert torch.equal(y[index], alone)
        assert bool((scale[index] == alone_scale).all())
        assert bool((zero_point[index] == alone_zero_point).all())
    # Changing one slice leaves every other slice, its scale and its zero point as they were.
    changed = x.clone()
    changed[slices[0]] = data.draw(inputs(shape=tuple(x[slices[0]].shape), magnitude=1e4))
    y2, scale2, zero_point2, _ = quant(changed)
    scale2, zero_point2 = torch.broadcast_to(scale2, shape), torch.broadcast_to(zero_point2, shape)
    for index in slices[1:]:
        assert torch.equal(y2[index], y[index])
        assert torch.equal(scale2[index], scale[index])
        assert torch.equal(zero_point2[index], zero_point[index])


@given(config=configs(scalings=("parameter",)), x=inputs(shape=(3, 5)))
def test_per_channel_parameter_scaling(config, x):
    quant = config.build(scaling_shape=(3, 1))
    y, scale, zero_point, _ = quant(x)
    assert tuple(scale.shape) == (3, 1)
    assert_on_grid(y, scale, zero_point, *config.range)
