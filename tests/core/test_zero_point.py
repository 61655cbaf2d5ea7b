"""Zero points: integers within the range, zero exactly representable, the range's lower end on
code 0 for asymmetric unsigned quantization."""

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.core.bit_width import BitWidthConst
from quantwire.core.function_wrapper import OverChannelView
from quantwire.core.quant import IntQuant, RescalingIntQuant
from quantwire.core.scaling import IntScaling, StatsScaling
from quantwire.core.stats import AbsMinMax, NegativeMinOrZero
from quantwire.core.zero_point import (
    LowToZeroPoint,
    ParameterFromRuntimeStatsZeroPoint,
    ParameterZeroPoint,
    RuntimeStatsZeroPoint,
    StatsZeroPoint,
    ZeroZeroPoint,
)

matrices = arrays(
    np.float32, st.tuples(st.integers(1, 4), st.integers(1, 16)), elements=st.floats(-1e3, 1e3, width=32)
).map(torch.from_numpy)
bit_widths = st.integers(2, 16)


def asymmetric_quant(bit_width: int, narrow_range: bool, per_channel: bool) -> RescalingIntQuant:
    view = OverChannelView(0) if per_channel else None
    return RescalingIntQuant(
        IntQuant(False, narrow_range),
        StatsScaling(AbsMinMax(), view),
        IntScaling(False, narrow_range),
        StatsZeroPoint(False, narrow_range, NegativeMinOrZero(), view),
        BitWidthConst(bit_width),
    )


def unsigned_max(bit_width: int, narrow_range: bool) -> int:
    return 2**bit_width - 1 - int(narrow_range)


@given(x=matrices, bit_width=bit_widths, narrow_range=st.booleans(), per_channel=st.booleans())
def test_asymmetric_unsigned_zero_point(x, bit_width, narrow_range, per_channel):
    quant = asymmetric_quant(bit_width, narrow_range, per_channel)
    y, scale, zero_point, bits = quant(x)
    high = unsigned_max(bit_width, narrow_range)
    dims = (1,) if per_channel else (0, 1)
    assert zero_point.shape == scale.shape == ((x.shape[0], 1) if per_channel else ())
    # An integer of the range.
    assert torch.equal(zero_point, torch.round(zero_point))
    assert bool(((zero_point >= 0) & (zero_point <= high)).all())
    # Zero is exactly representable: it quantizes to exactly 0.
    assert torch.equal(quant.int_quant(scale, zero_point, bits, torch.zeros_like(x)), torch.zeros_like(x))
    # The lower end of the range, min(x, 0), lands on code 0, within half a step.
    low = torch.clamp_max(x.amin(dim=dims, keepdim=True), 0.0).reshape(zero_point.shape)
    low_code = torch.round(quant.int_quant(scale, zero_point, bits, low) / scale + zero_point)
    assert bool((low_code == 0).all())
    assert bool(((quant.int_quant(scale, zero_point, bits, low) - low).abs() <= scale / 2 * (1 + 1e-5)).all())
    # Every input is in range: the error is at most half a step everywhere.
    assert bool(((y - x).abs() <= (scale / 2) * (1 + 1e-5) + 1e-6 * x.abs()).all())


@given(
    low=arrays(np.float32, st.integers(1, 8), elements=st.floats(-1e4, 0, width=32)).map(torch.from_numpy),
    scale=st.floats(2**-8, 2**8, width=32),
    bit_width=bit_widths,
    signed=st.booleans(),
    narrow_range=st.booleans(),
)
def test_low_to_zero_point_rounds_and_clamps(low, scale, bit_width, signed, narrow_range):
    zero_point = LowToZeroPoint(signed, narrow_range)(low, torch.tensor(scale), torch.tensor(float(bit_width)))
    if signed:
        lower, upper = -(2 ** (bit_width - 1)) + int(narrow_range), 2 ** (bit_width - 1) - 1
    else:
        lower, upper = 0, unsigned_max(bit_width, narrow_range)
    expected = np.clip(np.round(-low.double().numpy() / scale), lower, upper)
    # (float32 division may move an exact .5 by an ulp: allow the neighbouring integer there)
    assert bool((np.abs(zero_point.double().numpy() - expected) <= 1).all())
    assert torch.equal(zero_point, torch.round(zero_point))
    assert bool(((zero_point >= lower) & (zero_point <= upper)).all())
    exact = np.abs(np.abs(-low.double().numpy() / scale % 1) - 0.5) > 1e-3
    assert np.array_equal(zero_point.double().numpy()[exact], expected[exact])


@given(x=matrices)
def test_zero_zero_point(x):
    assert ZeroZeroPoint()(x, torch.tensor(1.0), torch.tensor(8.0)).item() == 0.0


@given(init=st.floats(-100, 0, width=32), scale=st.floats(2**-4, 2**4, width=32), bit_width=bit_widths)
def test_parameter_zero_point_learns_the_lower_end(init, scale, bit_width):
    module = ParameterZeroPoint(False, False, init, zero_point_shape=(3, 1))
    assert module.value.shape == (3, 1)
    zero_point = module(torch.zeros(3, 4), torch.tensor(scale), torch.tensor(float(bit_width)))
    expected = min(round(-np.float32(init) / np.float32(scale)), unsigned_max(bit_width, False))
    assert bool((zero_point - expected).abs().max() <= 1)
    zero_point.sum().backward()
    assert module.value.grad is not None


batches = arrays(np.float32, (2, 3), elements=st.floats(-1e3, 1e3, width=32)).map(torch.from_numpy)


@given(xs=st.lists(batches | st.just(torch.zeros(2, 3)), min_size=1, max_size=4), bit_width=bit_widths)
def test_runtime_zero_points_are_integers_in_range_in_every_phase(xs, bit_width):
    scale, bits = torch.tensor(0.5), torch.tensor(float(bit_width))
    modules = [
        RuntimeStatsZeroPoint(False, False, NegativeMinOrZero()),
        ParameterFromRuntimeStatsZeroPoint(False, False, 2, NegativeMinOrZero()),
    ]
    high = unsigned_max(bit_width, False)
    for module in modules:
        for training in (False, True, True, False):
            module.train(training)
            for x in xs:
                zero_point = module(x, scale, bits)
                assert torch.equal(zero_point, torch.round(zero_point))
                assert 0 <= zero_point.item() <= high
                if training and isinstance(module, RuntimeStatsZeroPoint):
                    batch_low = min(float(x.min()), 0.0)
                    assert zero_point.item() == min(round(-batch_low / 0.5), high)
