"""Bit widths: constant ones are validated integers, learned ones stay integers within range."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantwire.core.bit_width import BitWidthConst, BitWidthParameter
from quantwire.errors import QuantConfigError


@given(bit_width=st.integers(1, 32))
def test_const_bit_width(bit_width):
    value = BitWidthConst(bit_width)()
    assert value.dtype == torch.float32 and value.shape == () and value.item() == bit_width
    assert BitWidthConst(float(bit_width))().item() == bit_width
    assert BitWidthConst(torch.tensor(bit_width))().item() == bit_width
    assert "bit_width" not in "".join(BitWidthConst(bit_width).state_dict())


@pytest.mark.parametrize("bad", [0, -1, 33, 2.5, True, math.nan, "8", None])
def test_const_bit_width_rejects_bad_values_naming_them(bad):
    with pytest.raises(QuantConfigError, match="bit_width") as error:
        BitWidthConst(bad)
    assert repr(bad) in str(error.value) or str(bad) in str(error.value)


@given(
    bad=st.one_of(
        st.integers(max_value=0),
        st.integers(min_value=33),
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not (math.isfinite(v) and v == int(v))),
        st.booleans(),
    )
)
def test_const_bit_width_rejects_anything_but_whole_numbers_in_range(bad):
    with pytest.raises(QuantConfigError, match="bit_width"):
        BitWidthConst(bad)


@st.composite
def parameter_ranges(draw):
    low = draw(st.integers(1, 16))
    high = draw(st.integers(low, 32))
    return low, draw(st.integers(low, high)), high


@given(bounds=parameter_ranges(), offsets=st.lists(st.floats(-64, 64, width=32), min_size=1, max_size=8))
def test_learned_bit_width_stays_an_integer_in_range_and_learns(bounds, offsets):
    low, start, high = bounds
    module = BitWidthParameter(start, low, high)
    assert module().item() == start
    for offset in offsets:  # wherever training moves the underlying parameter
        with torch.no_grad():
            module.offset.fill_(offset)
        module.offset.grad = None
        value = module()
        assert value.item() == round(value.item()) and low <= value.item() <= high
        value.backward()
        # Straight through rounding and clamping: the sign of the offset (+1 at zero).
        assert module.offset.grad.item() == (1.0 if offset >= 0 else -1.0)


@given(bounds=parameter_ranges(), steps=st.lists(st.floats(-3, 3), min_size=1, max_size=10))
def test_learned_bit_width_under_gradient_steps(bounds, steps):
    low, start, high = bounds
    module = BitWidthParameter(start, low, high)
    for direction in steps:
        module.offset.grad = None
        (direction * module()).backward()
        with torch.no_grad():  # a plain gradient-descent step
            module.offset -= module.offset.grad
        value = module().item()
        assert value == round(value) and low <= value <= high


@pytest.mark.parametrize(("bit_width", "low", "high"), [(1, 2, 16), (17, 2, 16), (4, 8, 2), (4, 0, 8)])
def test_learned_bit_width_rejects_a_start_outside_its_range(bit_width, low, high):
    with pytest.raises(QuantConfigError, match="bit_width"):
        BitWidthParameter(bit_width, low, high)
