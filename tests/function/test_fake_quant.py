"""The fused integer fake quantization and abs-max: the same forward values as the composition of
straight-through pieces they replace, and the gradients that composition defines."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.function import round_ste, tensor_clamp, tensor_clamp_ste
from quantwire.function.fake_quant import abs_max_last_dim, int_fake_quant
from quantwire.function.int_range import max_int, min_int


def composed(x, scale, zero_point, lower, upper, clamp_ste):
    """The reference: the straight-through pieces :class:`IntQuant` composes."""
    clamp = tensor_clamp_ste if clamp_ste else tensor_clamp
    zero = torch.zeros(()) if zero_point is None else zero_point
    return (round_ste(clamp(x / scale + zero, lower, upper)) - zero) * scale


@st.composite
def cases(draw):
    """A weight- or activation-like tensor, its scale (one value, or one per row), a zero point
    (none, zero, an integer, or a learned non-integer one) and a bit width."""
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 12))
    x = draw(arrays(np.float32, (rows, cols), elements=st.floats(-50, 50, width=32)))
    # Exact ties (k + 0.5) * scale show a rounding that differs.
    ties = draw(st.booleans())
    per_row = draw(st.booleans())
    scale_shape = (rows, 1) if per_row else ()
    scale = draw(arrays(np.float32, scale_shape, elements=st.floats(0.015625, 4.0, width=32)))
    if ties:
        x = (np.round(x) + 0.5).astype(np.float32) * scale
    zero_kind = draw(st.sampled_from(["none", "zero", "integer", "learned"]))
    zero_point = {
        "none": None,
        "zero": torch.tensor(0.0),
        "integer": torch.tensor(float(draw(st.integers(-3, 3)))),
        "learned": torch.tensor(draw(st.floats(-3, 3, width=32))),
    }[zero_kind]
    bit_width = torch.tensor(float(draw(st.integers(2, 8))))
    signed = draw(st.booleans())
    narrow = draw(st.booleans())
    lower, upper = min_int(signed, narrow, bit_width), max_int(signed, narrow, bit_width)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(scale)), zero_point, lower, upper


@given(case=cases(), clamp_ste=st.booleans())
def test_forward_is_the_composition_bit_for_bit(case, clamp_ste):
    x, scale, zero_point, lower, upper = case
    fused = int_fake_quant(x, scale, zero_point, lower, upper, clamp_ste)
    reference = composed(x, scale, zero_point, lower, upper, clamp_ste)
    # Without a zero point, -0.0 inputs stay -0.0 (the composition adds +0.0): compare values.
    assert torch.equal(fused, reference)
    if zero_point is not None:
        assert torch.equal(fused.view(torch.int32), reference.view(torch.int32))


@given(case=cases(), clamp_ste=st.booleans())
def test_gradients_are_the_compositions(case, clamp_ste):
    x, scale, zero_point, lower, upper = case
    leaves = [x.clone().requires_grad_(True), scale.clone().requires_grad_(True)]
    if zero_point is not None:
        leaves.append(zero_point.clone().requires_grad_(True))
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def grads(function):
        inputs = [t.detach().clone().requires_grad_(True) for t in leaves]
        zero = inputs[2] if len(inputs) == 3 else None
        (function(inputs[0], inputs[1], zero, lower, upper, clamp_ste) * weight).sum().backward()
        return [t.grad for t in inputs]

    for fused, reference in zip(grads(int_fake_quant), grads(composed), strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_a_broadcasting_zero_point_and_a_double_input_take_the_composed_shapes_and_dtypes():
    x = torch.randn(3, 4, dtype=torch.float64)
    scale = torch.tensor(0.1)
    zero_point = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    lower, upper = torch.tensor(0.0), torch.tensor(15.0)
    fused = int_fake_quant(x, scale, zero_point, lower, upper, False)
    reference = composed(x, scale, zero_point, lower, upper, False)
    assert fused.dtype == reference.dtype == torch.float64
    assert torch.equal(fused, reference)
    row = torch.randn(4)
    per_row_zero = torch.tensor([[1.0], [2.0]])
    assert torch.equal(
        int_fake_quant(row, scale, per_row_zero, lower, upper, True),
        composed(row, scale, per_row_zero, lower, upper, True),
    )


def test_nan_and_inf_propagate_as_in_the_composition():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3])
    scale, lower, upper = torch.tensor(0.1), torch.tensor(-128.0), torch.tensor(127.0)
    fused = int_fake_quant(x, scale, None, lower, upper, False)
    reference = composed(x, scale, None, lower, upper, False)
    assert torch.equal(fused.isnan(), reference.isnan())
    assert torch.equal(fused[1:], reference[1:])


@given(x=arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 9)), elements=st.floats(-9, 9, width=32)))
def test_abs_max_value_is_amax_and_its_gradient_goes_to_one_maximal_element(x):
    x = torch.from_numpy(x).requires_grad_(True)
    largest = abs_max_last_dim(x)
    assert torch.equal(largest, torch.amax(x.detach().abs(), dim=-1, keepdim=True))
    upstream = torch.arange(1.0, x.shape[0] + 1).unsqueeze(1)
    (largest * upstream).sum().backward()
    grad, largest, x = x.grad, largest.detach(), x.detach()
    # One nonzero per row (unless the row is all zeros), at an element reaching the maximum,
    # equal to the upstream gradient times that element's sign.
    for row in range(x.shape[0]):
        nonzero = grad[row].nonzero().flatten()
        if float(largest[row]) == 0.0:
            assert len(nonzero) <= 1
            continue
        assert len(nonzero) == 1
        index = int(nonzero[0])
        assert abs(float(x[row, index])) == float(largest[row])
        assert float(grad[row, index]) == pytest.approx(float(upstream[row]) * float(torch.sign(x[row, index])))
