"""Binary, clamped binary and ternary quantization: values, metadata, threshold, gradients."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.core.quant import BinaryQuant, ClampedBinaryQuant, TernaryQuant
from quantwire.core.scaling import ConstScaling, StatsScaling
from quantwire.core.stats import AbsMax
from quantwire.errors import QuantConfigError

scales = st.floats(2**-8, 2**8, width=32)


@st.composite
def inputs_and_scale(draw):
    """Inputs and a scale, with inputs often exactly at ``±scale``, ``±threshold * scale`` or 0."""
    scale = draw(scales)
    threshold = draw(st.floats(0.0, 1.0, width=32))
    special = [
        0.0,
        -0.0,
        scale,
        -scale,
        float(np.float32(threshold * scale)),
        -float(np.float32(threshold * scale)),
    ]
    elements = st.one_of(st.floats(-4 * scale, 4 * scale, width=32), st.sampled_from(special))
    x = draw(arrays(np.float32, st.integers(1, 24), elements=elements).map(torch.from_numpy))
    return x, scale, threshold


def scaling(kind: str, scale: float):
    return ConstScaling(scale) if kind == "const" else StatsScaling(AbsMax())


def grad_of(quant, x):
    leaf = x.clone().requires_grad_(True)
    quant(leaf)[0].sum().backward()
    return leaf.grad


@pytest.mark.parametrize("kind", ["const", "stats"])
@pytest.mark.parametrize("quant_class", [BinaryQuant, ClampedBinaryQuant])
@given(case=inputs_and_scale())
def test_binary_values_and_metadata(quant_class, kind, case):
    x, scale, _ = case
    y, s, zero_point, bit_width = quant_class(scaling(kind, scale))(x)
    assert torch.equal(y, torch.where(x >= 0, s, -s))
    assert zero_point.item() == 0.0 and bit_width.item() == 1.0
    if kind == "stats":
        assert torch.equal(s, torch.clamp_min(x.abs().max(), 1e-10))


@given(case=inputs_and_scale())
def test_binary_gradient_passes_straight_through(case):
    x, scale, _ = case
    grad = grad_of(BinaryQuant(ConstScaling(scale)), x)
    assert torch.equal(grad, torch.full_like(x, np.float32(scale)))


@given(case=inputs_and_scale())
def test_clamped_binary_gradient_is_zero_outside_the_scale(case):
    x, scale, _ = case
    grad = grad_of(ClampedBinaryQuant(ConstScaling(scale)), x)
    s = np.float32(scale)
    inside = (x >= -s) & (x <= s)
    assert torch.equal(grad, torch.where(inside, torch.tensor(s), torch.tensor(0.0)))


@pytest.mark.parametrize("kind", ["const", "stats"])
@given(case=inputs_and_scale())
def test_ternary_values_threshold_and_metadata(kind, case):
    x, scale, threshold = case
    y, s, zero_point, bit_width = TernaryQuant(scaling(kind, scale), threshold=threshold)(x)
    assert set(y.tolist()) <= {-s.item(), 0.0, s.item()}
    kept = x.abs() > threshold * s
    assert torch.equal(y, torch.where(kept, torch.sign(x) * s, torch.zeros_like(x)))
    assert zero_point.item() == 0.0 and bit_width.item() == 2.0


@given(case=inputs_and_scale())
def test_ternary_gradient_flows_where_kept(case):
    x, scale, threshold = case
    grad = grad_of(TernaryQuant(ConstScaling(scale), threshold=threshold), x)
    s = torch.tensor(np.float32(scale))
    assert torch.equal(grad, torch.where(x.abs() > threshold * s, s, torch.tensor(0.0)))


@pytest.mark.parametrize("quant_class", [BinaryQuant, ClampedBinaryQuant, TernaryQuant])
def test_unsigned_is_rejected(quant_class):
    with pytest.raises(QuantConfigError, match="signed"):
        quant_class(ConstScaling(1.0), signed=False)


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_ternary_threshold_out_of_range_is_rejected(threshold):
    with pytest.raises(QuantConfigError, match=str(threshold)):
        TernaryQuant(ConstScaling(1.0), threshold=threshold)
