"""Properties of the straight-through estimators: the forward value is the exact operation, bit
for bit, and the gradient is what each estimator promises."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.function import (
    abs_binary_sign_grad,
    binary_sign,
    binary_sign_ste,
    ceil_ste,
    floor_ste,
    round_ste,
    round_to_zero_ste,
    scalar_clamp_min_ste,
    scalar_clamp_ste,
    stochastic_round_ste,
    tensor_clamp,
    tensor_clamp_ste,
    ternary_sign_ste,
)

finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
# Values near integers and half-integers (ties) at every magnitude, including where the float32
# spacing reaches 1 and 2 (2^23, 2^24), so that rounding mistakes have somewhere to show.
near_integers = st.builds(
    lambda whole, frac, sign: np.float32(sign * (whole + frac)),
    st.one_of(st.integers(0, 64), st.integers(2**22 - 2, 2**24 + 4).map(float)),
    st.sampled_from([0.0, 0.25, 0.5, 0.75, 1 - 2**-20, 2**-20]),
    st.sampled_from([-1.0, 1.0]),
).map(float)


def float_tensors(elements=finite_floats, max_size=32):
    return arrays(np.float32, st.integers(1, max_size), elements=elements).map(torch.from_numpy)


def bits(t):
    """The float32 bit patterns, so that ``-0.0`` and ``+0.0`` differ."""
    return t.contiguous().view(torch.int32)


def grad_of(function, x):
    x = x.clone().requires_grad_(True)
    function(x).sum().backward()
    return x.grad


ROUNDING = [
    (round_ste, torch.round),
    (floor_ste, torch.floor),
    (ceil_ste, torch.ceil),
    (round_to_zero_ste, torch.trunc),
    (binary_sign_ste, binary_sign),
    (ternary_sign_ste, torch.sign),
]


@pytest.mark.parametrize(("ste", "op"), ROUNDING, ids=[ste.__name__ for ste, _ in ROUNDING])
@given(x=st.one_of(float_tensors(), float_tensors(near_integers)))
def test_ste_forward_is_the_exact_op(ste, op, x):
    assert torch.equal(bits(ste(x)), bits(op(x)))


@pytest.mark.parametrize(("ste", "op"), ROUNDING, ids=[ste.__name__ for ste, _ in ROUNDING])
def test_ste_forward_at_infinities_and_nan(ste, op):
    x = torch.tensor([float("inf"), float("-inf"), float("nan")])
    y = ste(x)
    assert torch.equal(y[:2], op(x)[:2])
    assert bool(torch.isnan(y[2]))  # a NaN is never hidden, whatever the operation makes of it
    # No NaN gradient at infinities (eager passes 1 through, the scripted form gives 0 there).
    assert bool(torch.isfinite(grad_of(ste, x[:2])).all())


@pytest.mark.parametrize(("ste", "op"), ROUNDING, ids=[ste.__name__ for ste, _ in ROUNDING])
@given(x=float_tensors())
def test_ste_gradient_is_one(ste, op, x):
    assert torch.equal(grad_of(ste, x), torch.ones_like(x))


@given(x=float_tensors())
def test_stochastic_round_gradient_is_one(x):
    assert torch.equal(grad_of(stochastic_round_ste, x), torch.ones_like(x))


@given(x=st.one_of(float_tensors(), float_tensors(near_integers)), seed=st.integers(0, 2**31 - 1))
def test_stochastic_round_returns_floor_or_ceil(x, seed):
    torch.manual_seed(seed)
    y = stochastic_round_ste(x.repeat(16))
    floor, ceil = torch.floor(x).repeat(16), torch.ceil(x).repeat(16)
    assert bool(((y == floor) | (y == ceil)).all())


@given(x=arrays(np.float32, 4, elements=st.floats(-1e4, 1e4, width=32)).map(torch.from_numpy))
def test_stochastic_round_is_unbiased(x):
    torch.manual_seed(0)
    samples = 4000
    y = stochastic_round_ste(x.expand(samples, -1).contiguous())
    frac = (x - torch.floor(x)).double()
    # Each sample rounds up with probability frac: a Bernoulli mean, 5 standard errors wide.
    tolerance = 5 * torch.sqrt(frac * (1 - frac) / samples) + 1e-6
    assert bool(((y.double().mean(0) - x.double()).abs() <= tolerance).all())


@given(x=float_tensors(), low=st.floats(-100, 0, width=32), width=st.floats(0, 100, width=32))
def test_tensor_clamp_value_and_gradient(x, low, width):
    lower, upper = torch.tensor(low), torch.tensor(low + width)
    assert torch.equal(tensor_clamp(x, lower, upper), torch.clamp(x, lower, upper))
    inside = (x >= lower) & (x <= upper)
    assert torch.equal(grad_of(lambda t: tensor_clamp(t, lower, upper), x), inside.float())


@given(x=float_tensors(), low=st.floats(-100, 0, width=32), width=st.floats(0, 100, width=32))
def test_tensor_clamp_ste_value_and_gradient(x, low, width):
    lower, upper = torch.tensor(low), torch.tensor(low + width)
    assert torch.equal(tensor_clamp_ste(x, lower, upper), torch.clamp(x, lower, upper))
    assert torch.equal(grad_of(lambda t: tensor_clamp_ste(t, lower, upper), x), torch.ones_like(x))


@given(x=float_tensors(), low=st.floats(-100, 0, width=32), width=st.floats(0, 100, width=32))
def test_scalar_clamp_ste_value_and_gradient(x, low, width):
    assert torch.equal(scalar_clamp_ste(x, low, low + width), torch.clamp(x, low, low + width))
    assert torch.equal(grad_of(lambda t: scalar_clamp_ste(t, low, low + width), x), torch.ones_like(x))


@given(x=float_tensors(), floor=st.floats(-100, 100, width=32))
def test_scalar_clamp_min_ste_value_and_gradient(x, floor):
    assert torch.equal(scalar_clamp_min_ste(x, floor), torch.clamp_min(x, floor))
    assert torch.equal(grad_of(lambda t: scalar_clamp_min_ste(t, floor), x), torch.ones_like(x))


@given(x=st.one_of(float_tensors(), float_tensors(st.sampled_from([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf]))))
def test_abs_binary_sign_grad(x):
    assert torch.equal(abs_binary_sign_grad(x), torch.abs(x))
    expected = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    expected = torch.where(torch.isinf(x), torch.zeros_like(x), expected)
    assert torch.equal(grad_of(abs_binary_sign_grad, x), expected)


def test_binary_sign_maps_zero_to_plus_one():
    assert torch.equal(binary_sign(torch.tensor([0.0, -0.0])), torch.tensor([1.0, 1.0]))
