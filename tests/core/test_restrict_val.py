"""Value restrictions: the domain round trip, powers of two, and the clamped, positive scale."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.core.function_wrapper import FloorSte, RoundSte
from quantwire.core.restrict_val import (
    FloatRestrictValue,
    LogFloatRestrictValue,
    PowerOfTwoRestrictValue,
    RestrictClampValue,
)
from quantwire.errors import QuantConfigError

# Positive values, with powers of two and their float32 neighbours well represented.
near_powers_of_two = st.builds(
    lambda k, ulps: float(np.nextafter(np.float32(2.0**k), np.float32(ulps * np.inf)) if ulps else 2.0**k),
    st.integers(-40, 40),
    st.sampled_from([-1, 0, 1]),
)
positive = st.one_of(st.floats(2.0**-40, 2.0**40, width=32), near_powers_of_two)
positive_tensors = arrays(np.float32, st.integers(1, 16), elements=positive).map(torch.from_numpy)


def is_power_of_two(t: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(t)
    return bool((mantissa == 0.5).all())


@given(x=positive_tensors)
def test_float_restriction_is_the_identity(x):
    restrict = FloatRestrictValue()
    assert torch.equal(restrict(restrict.restrict_init_tensor(x)), x)


@given(x=positive_tensors)
def test_log_restriction_round_trips(x):
    restrict = LogFloatRestrictValue()
    torch.testing.assert_close(restrict(restrict.restrict_init_tensor(x)), x, rtol=2e-6, atol=0)
    value = float(x[0])
    assert restrict.restrict_init_float(value) == pytest.approx(float(restrict.restrict_init_tensor(x[:1])), abs=1e-5)


@given(x=positive_tensors)
def test_power_of_two_rounds_up_by_default(x):
    restrict = PowerOfTwoRestrictValue()
    y = restrict(restrict.restrict_init_tensor(x))
    assert is_power_of_two(y)
    assert bool((y >= x).all()) and bool((y < 2 * x).all())  # the smallest power of two >= x


@given(x=positive_tensors)
def test_power_of_two_with_floor_and_round(x):
    floor = PowerOfTwoRestrictValue(FloorSte())
    y = floor(floor.restrict_init_tensor(x))
    assert is_power_of_two(y) and bool((y <= x * (1 + 2**-22)).all()) and bool((y > x / 2).all())
    nearest = PowerOfTwoRestrictValue(RoundSte())
    z = nearest(nearest.restrict_init_tensor(x))
    # Nearest in the log domain: within a factor sqrt(2) either way.
    assert (
        is_power_of_two(z)
        and bool((z <= x * math.sqrt(2) * 1.0001).all())
        and bool((z >= x / math.sqrt(2) / 1.0001).all())
    )


RESTRICTIONS = [FloatRestrictValue, LogFloatRestrictValue, PowerOfTwoRestrictValue]


@pytest.mark.parametrize("restrict_class", RESTRICTIONS)
@given(
    x=arrays(np.float32, st.integers(1, 16), elements=st.floats(-(2.0**20), 2.0**20, width=32)).map(torch.from_numpy),
    min_val=positive,
)
def test_restrict_clamp_gives_a_positive_restricted_scale_with_gradient(restrict_class, x, min_val):
    restrict = restrict_class()
    clamp = RestrictClampValue(restrict, min_val)
    # The floor is itself restricted (a power of two at or above min_val).
    assert clamp.min_val >= np.float32(min_val) * (1 - 2e-6)
    if restrict_class is FloatRestrictValue:  # the raw domain may hold any sign: |x| is used
        domain = x
    else:
        domain = restrict.restrict_init_tensor(x.abs())
    leaf = domain.clone().requires_grad_(True)
    scale = clamp(leaf)
    assert bool(torch.isfinite(scale).all()) and bool((scale >= clamp.min_val).all())
    if restrict_class is PowerOfTwoRestrictValue:
        assert is_power_of_two(scale)
    scale.sum().backward()
    # Even at zero or under the floor the gradient is not lost.
    finite = torch.isfinite(domain)
    assert bool((leaf.grad[finite] != 0).all())


@pytest.mark.parametrize("bad", [0.0, -1e-3, math.inf, math.nan])
def test_restrict_clamp_rejects_a_bad_floor(bad):
    with pytest.raises(QuantConfigError, match="scaling_min_val"):
        RestrictClampValue(FloatRestrictValue(), bad)


def test_restrict_clamp_without_floor_keeps_zero():
    clamp = RestrictClampValue(FloatRestrictValue(), None)
    assert clamp(torch.tensor([0.0, -2.0])).tolist() == [0.0, 2.0]
