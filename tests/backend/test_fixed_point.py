"""Fixed point and the integer operators: exact rounding, exact sums, overflow, the stated
error bound of a finite ``sfl``."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantwire.backend.fixed_point import (
    BackendError,
    fixed_point,
    fractional_bits_for,
    requant_error_bound,
    rounding_right_shift,
)
from quantwire.backend.ops import AccumulatorOverflowError, IntMatMul, MulQuant, MulShift

int64s = st.integers(-(2**40), 2**40)


def round_half_even(value: Fraction) -> int:
    floor = value.numerator // value.denominator
    rest = value - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2):
        return floor + 1
    return floor


@given(values=st.lists(int64s, min_size=1, max_size=30), shift=st.integers(0, 30))
def test_rounding_right_shift_rounds_half_to_even_like_torch_round(values, shift):
    x = torch.tensor(values, dtype=torch.int64)
    expected = [round_half_even(Fraction(v, 2**shift)) for v in values]
    assert rounding_right_shift(x, shift).tolist() == expected
    if shift <= 20:  # where float64 division is exact, this is torch.round
        assert rounding_right_shift(x, shift).tolist() == torch.round(x.double() / 2**shift).long().tolist()


@given(value=st.floats(-1e6, 1e6, allow_nan=False).filter(lambda v: abs(v) > 1e-9), swl=st.integers(8, 40))
def test_fractional_bits_for_is_the_most_that_fit(value, swl):
    sfl = fractional_bits_for(torch.tensor([value]), swl)
    fixed_point(torch.tensor([value]), swl, sfl, "m")  # fits
    with pytest.raises(BackendError, match="needs more than swl"):
        fixed_point(torch.tensor([value]), swl, sfl + 1, "m")  # one more fractional bit does not


def test_fixed_point_refuses_values_that_do_not_fit_or_are_not_finite():
    with pytest.raises(BackendError, match=r"conv1 multiplier: 3 needs more than swl=8 bits with sfl=6"):
        fixed_point(torch.tensor([3.0]), 8, 6, "conv1 multiplier")
    with pytest.raises(BackendError, match="non-finite"):
        fixed_point(torch.tensor([float("nan")]), 16, 4, "fc bias")


def test_sums_beyond_2_to_the_24_are_exact():
    """float32 accumulation loses bits past 2**24; the integer product does not."""
    generator = torch.Generator().manual_seed(0)
    terms = 4096
    x = torch.randint(100, 128, (3, terms), generator=generator).double()
    w = torch.randint(100, 128, (5, terms), generator=generator).double()
    exact = x.long() @ w.long().T
    assert int(exact.min()) > 2**24
    accumulator = IntMatMul("linear", w, accumulator_bits=32)(x)
    assert torch.equal(accumulator.long(), exact)
    float32_sum = (x.float() @ w.float().T).double().long()
    assert not torch.equal(float32_sum, exact)  # what a float32 fake-quant accumulator would give
    assert accumulator.long().max() > 2**24


def test_an_accumulator_overflow_is_detected_named_or_wrapped():
    x = torch.full((1, 64), 127.0)
    w = torch.full((2, 64), 127.0)
    matmul = IntMatMul("linear", w, accumulator_bits=16, name="layer3.fc.matmul")
    with pytest.raises(AccumulatorOverflowError, match=r"layer3.fc.matmul \(linear\): a sum reached 1032256"):
        matmul(x)
    wrapped = IntMatMul("linear", w, accumulator_bits=16, overflow="wrap")(x)
    expected = torch.tensor(127 * 127 * 64, dtype=torch.int64).to(torch.int16).item()
    assert wrapped.flatten().tolist() == [expected, expected]
    assert IntMatMul("linear", w, accumulator_bits=24)(x).flatten().tolist() == [1032256.0, 1032256.0]


def test_a_float64_sum_that_could_lose_bits_is_refused():
    matmul = IntMatMul("linear", torch.ones(1, 1), name="big")
    with pytest.raises(BackendError, match="exceed 2\\*\\*53"):
        matmul.check_exact(2.0**31, 2.0**31, 2**10)


@given(
    acc=st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=20),
    m=st.floats(1e-4, 4.0),
    b=st.floats(-100, 100),
    sfl=st.integers(8, 24),
)
def test_mulquant_stays_within_the_stated_bound_of_the_exact_rescale(acc, m, b, sfl):
    multiplier = fixed_point(torch.tensor([m]), 40, sfl, "m")
    bias = fixed_point(torch.tensor([b]), 40, sfl, "b")
    rescale = MulQuant(multiplier, bias, torch.zeros(()), -(2**40), 2**40, -1, "q")
    codes = rescale(torch.tensor(acc, dtype=torch.float64)).long().tolist()
    exact = [round_half_even(Fraction(a) * Fraction(m) + Fraction(b)) for a in acc]
    bound = requant_error_bound(max(abs(a) for a in acc), sfl)
    assert max(abs(c - e) for c, e in zip(codes, exact, strict=True)) <= bound
    # the dyadic multiplier and bias it represents are rounded exactly
    represented = [
        round_half_even(Fraction(a) * Fraction(int(multiplier.value), 2**sfl) + Fraction(int(bias.value), 2**sfl))
        for a in acc
    ]
    assert codes == represented


def test_an_exact_multiplier_has_no_error_and_mulshift_is_exact():
    multiplier = fixed_point(torch.tensor([0.375, 2.0**-9]), 32, 12, "m")
    bias = fixed_point(torch.tensor([1.5, -0.25]), 32, 12, "b")
    assert requant_error_bound(2**20, 12, exact=True) == 0
    acc = torch.tensor([[1001.0, -77.0], [3.0, 2**20]])
    shifted = MulShift(multiplier, bias, -1, "s")(acc)
    expected = acc * torch.tensor([0.375, 2.0**-9], dtype=torch.float64) + torch.tensor([1.5, -0.25])
    assert torch.equal(shifted, expected.double())
