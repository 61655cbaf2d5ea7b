"""FloatQuant properties: bit-exact agreement with PyTorch's float8 casts, and for any small
format, outputs in the format's value set, nearest-value rounding, idempotence, saturation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.core.function_wrapper import OverChannelView
from quantwire.core.quant import FloatQuant, FloatScaling
from quantwire.core.scaling import ConstScaling, StatsScaling
from quantwire.core.stats import AbsMax
from quantwire.function import minifloat_max_value

E4M3 = {"exponent_bit_width": 4, "mantissa_bit_width": 3, "has_inf": False, "has_nan": True}
E5M2 = {"exponent_bit_width": 5, "mantissa_bit_width": 2, "has_inf": True, "has_nan": True}
# (has_inf, has_nan): IEEE style, OCP "fn" style, every code finite.
SPECIALS = [(True, True), (False, True), (False, False)]


def float_quant(saturating: bool = True, **fmt) -> FloatQuant:
    return FloatQuant(scaling_impl=ConstScaling(1.0), saturating=saturating, **fmt)


def quantize(quant: FloatQuant, x: torch.Tensor) -> torch.Tensor:
    return quant(x)[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns: ``-0.0`` differs from ``+0.0``; NaNs are made canonical."""
    t = torch.where(torch.isnan(t), torch.full_like(t, math.nan), t)
    return t.contiguous().view(torch.int32)


def codes_of(dtype: torch.dtype) -> list[float]:
    """Every finite non-negative value of a float8 dtype, in increasing order."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return sorted({v for v in values.tolist() if math.isfinite(v) and v >= 0})


def nudged(points: list[float]) -> st.SearchStrategy[float]:
    """``points`` (codes and the midpoints between them: the ties), either sign, moved by up to
    two float32 ulps: where a rounding mistake would show."""

    def nudge(point: float, ulps: int, sign: float) -> float:
        value = np.float32(point)
        direction = np.float32(np.inf if ulps > 0 else -np.inf)
        for _ in range(abs(ulps)):
            value = np.nextafter(value, direction)
        return float(sign * value)

    return st.builds(nudge, st.sampled_from(points), st.integers(-2, 2), st.sampled_from([-1.0, 1.0]))


def edge_points(dtype: torch.dtype) -> list[float]:
    codes = codes_of(dtype)
    midpoints = [(a + b) / 2 for a, b in zip(codes, codes[1:], strict=False)]
    top, step = codes[-1], codes[-1] - codes[-2]
    beyond = [top + step / 2, top + step, top + 1.5 * step, 2 * top, 2.0**127]
    return codes + midpoints + beyond


finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
float32_subnormals = st.floats(min_value=-(2.0**-126), max_value=2.0**-126, width=32)


def float8_inputs(dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    infinities = st.sampled_from([math.inf, -math.inf])
    elements = st.one_of(finite_floats, float32_subnormals, nudged(edge_points(dtype)), infinities)
    return arrays(np.float32, st.integers(1, 32), elements=elements).map(torch.from_numpy)


@given(x=float8_inputs(torch.float8_e4m3fn))
def test_e4m3_matches_torch_float8_e4m3fn(x):
    expected = x.to(torch.float8_e4m3fn).float()
    assert torch.equal(bits(quantize(float_quant(**E4M3), x)), bits(expected))


@given(x=float8_inputs(torch.float8_e5m2))
def test_e5m2_matches_torch_float8_e5m2(x):
    expected = x.to(torch.float8_e5m2).float()
    assert torch.equal(bits(quantize(float_quant(saturating=False, **E5M2), x)), bits(expected))


@given(x=float8_inputs(torch.float8_e5m2))
def test_saturating_e5m2_clamps_to_max(x):
    y = quantize(float_quant(saturating=True, **E5M2), x)
    cast = x.to(torch.float8_e5m2).float()
    expected = torch.where(torch.isinf(cast), torch.sign(cast) * 57344.0, cast)
    assert torch.equal(bits(y), bits(expected))


@given(x=float8_inputs(torch.float8_e4m3fn))
def test_non_saturating_e4m3_overflow_is_nan(x):
    y = quantize(float_quant(saturating=False, **E4M3), x)
    # Past the tie between 448 and the next grid point (480, the NaN code), rounding overflows.
    overflow = x.abs() > (448.0 + 480.0) / 2
    assert bool(torch.isnan(y[overflow]).all())
    assert torch.equal(bits(y[~overflow]), bits(x[~overflow].to(torch.float8_e4m3fn).float()))


@st.composite
def formats(draw):
    exponent, mantissa = draw(st.integers(1, 5)), draw(st.integers(0, 4))
    has_inf, has_nan = draw(st.sampled_from(SPECIALS))
    bias = 2 ** (exponent - 1) - 1 + draw(st.integers(-2, 2))
    return {
        "exponent_bit_width": exponent,
        "mantissa_bit_width": mantissa,
        "exponent_bias": bias,
        "has_inf": has_inf,
        "has_nan": has_nan,
        "signed": draw(st.booleans()),
    }


def format_values(fmt: dict) -> list[float]:
    """Every finite value of the format, enumerated code by code, in increasing order."""
    exponent, mantissa, bias = fmt["exponent_bit_width"], fmt["mantissa_bit_width"], fmt["exponent_bias"]
    top_exponent, top_mantissa = 2**exponent - 1, 2**mantissa - 1
    values = set()
    for e in range(top_exponent + 1):
        for m in range(top_mantissa + 1):
            if fmt["has_inf"] and e == top_exponent:
                continue
            if fmt["has_nan"] and e == top_exponent and m == top_mantissa:
                continue
            if e == 0:
                value = 2.0 ** (1 - bias) * m / 2**mantissa
            else:
                value = 2.0 ** (e - bias) * (1 + m / 2**mantissa)
            values.add(value)
            if fmt["signed"]:
                values.add(-value)
    return sorted(values)


def format_inputs(values: list[float]) -> st.SearchStrategy[torch.Tensor]:
    top = max(abs(v) for v in values)
    midpoints = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
    elements = st.one_of(st.floats(-4 * top - 1, 4 * top + 1, width=32), nudged(values + midpoints), finite_floats)
    return arrays(np.float32, st.integers(1, 32), elements=elements).map(torch.from_numpy)


@given(data=st.data(), fmt=formats())
def test_small_format_outputs_are_in_the_value_set(data, fmt):
    values = format_values(fmt)
    x = data.draw(format_inputs(values))
    y = quantize(float_quant(**fmt), x)
    assert set(y.tolist()) <= set(values)
    assert max(values) == minifloat_max_value(
        fmt["exponent_bit_width"],
        fmt["mantissa_bit_width"],
        fmt["exponent_bias"],
        fmt["has_inf"],
        fmt["has_nan"],
    )


@given(data=st.data(), fmt=formats(), saturating=st.booleans())
def test_small_format_is_idempotent(data, fmt, saturating):
    x = data.draw(format_inputs(format_values(fmt)))
    quant = float_quant(saturating=saturating, **fmt)
    y = quantize(quant, x)  # may hold ±inf or NaN (non-saturating overflow): those stay too
    assert torch.equal(bits(quantize(quant, y)), bits(y))


@given(data=st.data(), fmt=formats())
def test_small_format_rounds_to_a_nearest_value_in_range(data, fmt):
    values = format_values(fmt)
    x = data.draw(format_inputs(values))
    y = quantize(float_quant(**fmt), x)
    grid = torch.tensor(values, dtype=torch.float64)
    inside = (x.double() >= grid[0]) & (x.double() <= grid[-1])
    xs, ys = x.double()[inside], y.double()[inside]
    distance = (xs[:, None] - grid[None, :]).abs()
    assert torch.equal((xs - ys).abs(), distance.min(dim=1).values)
    # So the error is at most half the local step: the gap between the neighbours around x.
    below = torch.where(grid[None, :] <= xs[:, None], grid[None, :], -math.inf).amax(1)
    above = torch.where(grid[None, :] >= xs[:, None], grid[None, :], math.inf).amin(1)
    assert bool(((xs - ys).abs() <= (above - below) / 2).all())


@given(data=st.data(), fmt=formats())
def test_small_format_saturates_and_clamps_negatives_when_unsigned(data, fmt):
    values = format_values(fmt)
    x = data.draw(format_inputs(values))
    y = quantize(float_quant(**fmt), x)
    above, below = x > values[-1], x < values[0]
    assert bool((y[above] == values[-1]).all()) and bool((y[below] == values[0]).all())
    if not fmt["signed"]:
        assert bool((y[x < 0] == 0).all())


@given(data=st.data(), fmt=formats())
def test_small_format_non_saturating_overflow(data, fmt):
    values = format_values(fmt)
    x = data.draw(format_inputs(values))
    saturated = quantize(float_quant(**fmt), x)
    y = quantize(float_quant(saturating=False, **fmt), x)
    if not fmt["signed"]:
        x = torch.clamp_min(x, 0.0)
    top = values[-1]
    binade = max(math.frexp(top)[1] - 1, 1 - fmt["exponent_bias"])
    boundary = top + 2.0 ** (binade - fmt["mantissa_bit_width"]) / 2
    fits, overflows = x.abs() < boundary, x.abs() > boundary
    assert torch.equal(bits(y[fits]), bits(saturated[fits]))
    if fmt["has_inf"]:
        assert torch.equal(y[overflows], torch.sign(x[overflows]) * math.inf)
    elif fmt["has_nan"]:
        assert bool(torch.isnan(y[overflows]).all())
    else:
        assert torch.equal(y[overflows], saturated[overflows])


# Zero or at least 2^-10 in magnitude: a row of tiny values would meet the scale's floor instead.
scaled_elements = st.one_of(st.just(0.0), st.floats(2**-10, 1e3, width=32), st.floats(-1e3, -(2**-10), width=32))


@given(
    x=arrays(np.float32, (3, 8), elements=scaled_elements).map(torch.from_numpy),
    fmt_name=st.sampled_from(["e4m3", "e5m2"]),
)
def test_float_scaling_maps_the_threshold_to_the_format_max(x, fmt_name):
    fmt = E4M3 if fmt_name == "e4m3" else E5M2
    scaling = StatsScaling(AbsMax(), OverChannelView(0))
    quant = FloatQuant(scaling_impl=scaling, float_scaling_impl=FloatScaling(**fmt), **fmt)
    y, scale, zero_point, exponent, mantissa, bias = quant(x)
    top = minifloat_max_value(
        fmt["exponent_bit_width"], fmt["mantissa_bit_width"], int(bias), fmt["has_inf"], fmt["has_nan"]
    )
    assert scale.shape == (3, 1) and zero_point.item() == 0.0
    assert (exponent.item(), mantissa.item()) == (fmt["exponent_bit_width"], fmt["mantissa_bit_width"])
    abs_max = x.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(scale, torch.clamp_min(abs_max, 1e-10) / top)
    torch.testing.assert_close(y.abs().amax(dim=1, keepdim=True), abs_max, rtol=1e-6, atol=0)
    # The scaled values lie on the format's grid (up to the rounding of the final multiply).
    dtype = torch.float8_e4m3fn if fmt_name == "e4m3" else torch.float8_e5m2
    torch.testing.assert_close(y / scale, (y / scale).to(dtype).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [0, -1, 33, 2.5, True])
def test_float_quant_rejects_bad_exponent_bit_width(bad):
    from quantwire.errors import QuantConfigError

    with pytest.raises(QuantConfigError, match="exponent_bit_width"):
        FloatQuant(bad, 3, ConstScaling(1.0))
