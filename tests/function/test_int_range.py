"""``min_int``/``max_int``/``int_scaling_divisor`` against the closed forms of the integer range."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from quantwire.function import int_scaling_divisor, max_int, min_int


def closed_form_range(bit_width: int, signed: bool, narrow_range: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bit_width - 1)) + int(narrow_range), 2 ** (bit_width - 1) - 1
    return 0, 2**bit_width - 1 - int(narrow_range)


@given(bit_width=st.integers(1, 32), signed=st.booleans(), narrow_range=st.booleans())
def test_range_matches_closed_form_in_float64(bit_width, signed, narrow_range):
    bits = torch.tensor(float(bit_width), dtype=torch.float64)
    low, high = closed_form_range(bit_width, signed, narrow_range)
    assert min_int(signed, narrow_range, bits).item() == low
    assert max_int(signed, narrow_range, bits).item() == high


@given(bit_width=st.integers(1, 24), signed=st.booleans(), narrow_range=st.booleans())
def test_range_matches_closed_form_in_float32(bit_width, signed, narrow_range):
    # Every integer up to 2^24 is a float32, so the bit widths quantizers use are exact.
    bits = torch.tensor(float(bit_width))
    low, high = closed_form_range(bit_width, signed, narrow_range)
    assert min_int(signed, narrow_range, bits).dtype == torch.float32
    assert min_int(signed, narrow_range, bits).item() == low
    assert max_int(signed, narrow_range, bits).item() == high


@given(
    bit_widths=st.lists(st.integers(1, 32), min_size=1, max_size=8),
    signed=st.booleans(),
    narrow_range=st.booleans(),
)
def test_range_is_elementwise_over_bit_width_tensors(bit_widths, signed, narrow_range):
    bits = torch.tensor(bit_widths, dtype=torch.float64)
    expected = [closed_form_range(b, signed, narrow_range) for b in bit_widths]
    assert min_int(signed, narrow_range, bits).tolist() == [low for low, _ in expected]
    assert max_int(signed, narrow_range, bits).tolist() == [high for _, high in expected]


@given(bit_width=st.integers(2, 32), signed=st.booleans(), narrow_range=st.booleans())
def test_scaling_divisor_is_the_magnitude_of_the_far_end(bit_width, signed, narrow_range):
    bits = torch.tensor(float(bit_width), dtype=torch.float64)
    low, high = closed_form_range(bit_width, signed, narrow_range)
    assert int_scaling_divisor(signed, narrow_range, bits).item() == (-low if signed else high)
