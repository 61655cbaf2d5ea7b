"""Minifloat helpers: the largest finite value of a format, the grid spacing, saturation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.function import (
    minifloat_max_value,
    minifloat_min_normal_exponent,
    minifloat_saturate,
    minifloat_step,
)


@pytest.mark.parametrize(
    ("exponent", "mantissa", "bias", "has_inf", "has_nan", "expected"),
    [
        (4, 3, 7, False, True, 448.0),  # OCP E4M3 ("fn")
        (5, 2, 15, True, True, 57344.0),  # OCP E5M2
        (2, 1, 1, False, False, 6.0),  # OCP E2M1 (FP4)
        (2, 3, 1, False, False, 7.5),  # OCP E2M3 (FP6)
        (3, 2, 3, False, False, 28.0),  # OCP E3M2 (FP6)
    ],
)
def test_named_formats(exponent, mantissa, bias, has_inf, has_nan, expected):
    assert minifloat_max_value(exponent, mantissa, bias, has_inf, has_nan) == expected


def closed_form_max(exponent: int, mantissa: int, bias: int, has_inf: bool, has_nan: bool) -> float:
    """The top finite code: IEEE-style formats lose the top exponent, "fn" formats only the
    all-ones code (the whole top exponent when there is no mantissa), the rest lose nothing."""
    top_exponent = 2**exponent - 1
    if has_inf or (has_nan and mantissa == 0):
        return (2 - 2.0**-mantissa) * 2.0 ** (top_exponent - 1 - bias)
    if has_nan:
        return (2 - 2.0 ** (1 - mantissa)) * 2.0 ** (top_exponent - bias)
    return (2 - 2.0**-mantissa) * 2.0 ** (top_exponent - bias)


@given(
    exponent=st.integers(2, 8),
    mantissa=st.integers(0, 10),
    bias_shift=st.integers(-3, 3),
    special=st.sampled_from([(True, True), (False, True), (False, False)]),
)
def test_max_value_matches_closed_form(exponent, mantissa, bias_shift, special):
    bias = 2 ** (exponent - 1) - 1 + bias_shift
    assert minifloat_max_value(exponent, mantissa, bias, *special) == closed_form_max(
        exponent, mantissa, bias, *special
    )


@given(bias=st.integers(-20, 20))
def test_min_normal_exponent(bias):
    assert minifloat_min_normal_exponent(bias) == 1 - bias


positive_floats = st.floats(min_value=2.0**-40, max_value=2.0**40, width=32)


@given(
    x=arrays(np.float32, st.integers(1, 16), elements=positive_floats).map(torch.from_numpy),
    negate=st.booleans(),
    mantissa=st.integers(0, 6),
    min_exponent=st.integers(-30, 5),
)
def test_step_is_the_spacing_of_the_binade(x, negate, mantissa, min_exponent):
    x = -x if negate else x
    step = minifloat_step(x, mantissa, min_exponent)
    binade = torch.tensor([max(math.frexp(abs(v))[1] - 1, min_exponent) for v in x.double().tolist()])
    assert torch.equal(step, torch.pow(2.0, (binade - mantissa).float()))
    normal = x.abs() >= 2.0**min_exponent
    ratio = x.abs()[normal] / step[normal]
    assert bool(((ratio >= 2**mantissa) & (ratio < 2 ** (mantissa + 1))).all())
    assert bool((x.abs()[~normal] / step[~normal] < 2**mantissa).all())


finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(
    x=arrays(np.float32, st.integers(1, 16), elements=finite_floats).map(torch.from_numpy),
    max_value=st.floats(0.5, 1e4, width=32),
    signed=st.booleans(),
    saturating=st.booleans(),
    special=st.sampled_from([(True, True), (False, True), (False, False)]),
)
def test_saturate(x, max_value, signed, saturating, special):
    has_inf, has_nan = special
    y = minifloat_saturate(x, max_value, signed, saturating, has_inf, has_nan)
    if not signed:
        x = torch.clamp_min(x, 0.0)
    inside = x.abs() <= max_value
    assert torch.equal(y[inside], x[inside])
    over = x[~inside]
    if saturating or not (has_inf or has_nan):
        assert torch.equal(y[~inside], torch.sign(over) * max_value)
    elif has_inf:
        assert torch.equal(y[~inside], torch.sign(over) * math.inf)
    else:
        assert bool(torch.isnan(y[~inside]).all())
