"""IntQuantTensor itself: validity, integer codes, repr and the tensor-like surface."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from quant_tensor_strategies import IntSample, code_range, int_samples

from quantwire.errors import QuantConfigError
from quantwire.quant_tensor import IntQuantTensor, QuantTensor


@given(int_samples())
def test_built_from_codes_is_valid_and_int_returns_the_codes(sample: IntSample) -> None:
    assert sample.qt.is_valid
    codes = sample.qt.int()
    assert codes.dtype == torch.int32
    assert torch.equal(codes, sample.codes.to(torch.int32))


@given(int_samples())
def test_int_as_float_keeps_the_value_dtype(sample: IntSample) -> None:
    codes = sample.qt.int(float_datatype=True)
    assert codes.dtype == sample.qt.value.dtype
    assert torch.equal(codes, sample.codes.float())


def test_int_is_int64_beyond_31_bits() -> None:
    qt = IntQuantTensor(
        torch.tensor([3.0, -2.0]), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(32.0), True, False
    )
    assert qt.int().dtype == torch.int64
    assert qt.is_valid


@given(int_samples(), st.floats(0.1, 0.9))
def test_off_grid_values_are_invalid(sample: IntSample, offset: float) -> None:
    qt = sample.qt
    off_grid = IntQuantTensor(qt.value + offset * qt.scale, qt.scale, qt.zero_point, qt.bit_width, qt.signed, False)
    assert not off_grid.is_valid


@given(int_samples())
def test_negative_scale_is_invalid_even_on_the_mirrored_grid(sample: IntSample) -> None:
    qt = sample.qt
    mirrored = IntQuantTensor(-qt.value, -qt.scale, qt.zero_point, qt.bit_width, qt.signed, False)
    assert not mirrored.is_valid


@given(int_samples(), st.floats(0.1, 0.9))
def test_non_integer_bit_width_is_invalid(sample: IntSample, fraction: float) -> None:
    qt = sample.qt
    bit_width = qt.bit_width + fraction
    assert not IntQuantTensor(qt.value, qt.scale, qt.zero_point, bit_width, qt.signed, False).is_valid


@pytest.mark.parametrize("bit_width", [0.0, -8.0, 65.0])
def test_bit_width_outside_1_to_64_is_invalid(bit_width: float) -> None:
    qt = IntQuantTensor(torch.tensor([0.0, 1.0]), 1.0, 0.0, torch.tensor(bit_width), True, False)
    assert not qt.is_valid


def test_accumulator_bit_widths_above_32_are_valid() -> None:
    assert IntQuantTensor(torch.tensor([0.0, 3.0]), 1.0, 0.0, torch.tensor(40.0), True, False).is_valid


def test_signed_one_bit_is_binary() -> None:
    binary = IntQuantTensor(torch.tensor([-0.5, 0.5]), 0.5, 0.0, torch.tensor(1.0), True, False)
    assert binary.is_valid
    assert not IntQuantTensor(torch.tensor([0.0, 0.5]), 0.5, 0.0, torch.tensor(1.0), True, False).is_valid


@given(int_samples())
def test_non_integer_zero_point_is_invalid(sample: IntSample) -> None:
    qt = sample.qt
    shifted = IntQuantTensor(qt.value, qt.scale, qt.zero_point + 0.5, qt.bit_width, qt.signed, False)
    assert not shifted.is_valid


@given(int_samples(per_channel=False), st.booleans())
def test_codes_outside_the_range_are_invalid(sample: IntSample, above: bool) -> None:
    qt = sample.qt
    low, high = code_range(int(qt.bit_width), qt.signed)
    code = high + 1 if above else low - 1
    value = qt.value.clone().flatten()
    value[0] = (code - qt.zero_point.flatten()[0]) * qt.scale.flatten()[0]
    out_of_range = IntQuantTensor(value.view(qt.shape), qt.scale, qt.zero_point, qt.bit_width, qt.signed, False)
    assert not out_of_range.is_valid


def test_nan_is_invalid() -> None:
    qt = IntQuantTensor(torch.tensor([1.0, float("nan")]), 1.0, 0.0, 8, True, False)
    assert not qt.is_valid


def test_float_scale_zero_point_and_int_bit_width_become_tensors() -> None:
    qt = IntQuantTensor(torch.tensor([0.5, -1.0]), 0.5, 0.0, 4, True, False)
    assert isinstance(qt.scale, torch.Tensor) and isinstance(qt.bit_width, torch.Tensor)
    assert qt.is_valid


def test_scale_that_does_not_broadcast_is_an_error() -> None:
    with pytest.raises(QuantConfigError, match="scale of shape \\(3,\\)"):
        IntQuantTensor(torch.zeros(2, 4), torch.ones(3), 0.0, 8, True, False)
    with pytest.raises(QuantConfigError, match="zero_point"):
        IntQuantTensor(torch.zeros(4), 1.0, torch.zeros(2, 4), 8, True, False)


def test_repr_names_every_field() -> None:
    qt = IntQuantTensor(torch.tensor([0.1, -0.1]), torch.tensor(0.1), torch.tensor(0.0), torch.tensor(1.0), True, True)
    text = repr(qt)
    assert text.startswith("IntQuantTensor(value=tensor([ 0.1000, -0.1000]), scale=tensor(0.1000), ")
    assert text.endswith("zero_point=tensor(0.), bit_width=tensor(1.), signed=True, training=True)")


def test_is_a_plain_object_with_slots() -> None:
    qt = IntQuantTensor(torch.zeros(2), 1.0, 0.0, 8, True, False)
    assert not isinstance(qt, torch.Tensor)
    assert isinstance(qt, QuantTensor)
    assert not hasattr(qt, "__dict__")


@given(int_samples())
def test_tensor_like_surface_reports_the_value(sample: IntSample) -> None:
    qt, value = sample.qt, sample.qt.value
    assert qt.shape == value.shape and qt.size() == value.size() and qt.size(0) == value.size(0)
    assert qt.dim() == value.dim() and qt.ndim == value.ndim
    assert qt.dtype == value.dtype and qt.device == value.device
    assert qt.numel() == value.numel() and len(qt) == len(value)
    assert qt.requires_grad is False


@given(int_samples())
def test_detach_to_and_cpu_keep_every_field(sample: IntSample) -> None:
    qt = IntQuantTensor(
        sample.qt.value.requires_grad_(),
        sample.qt.scale,
        sample.qt.zero_point,
        sample.qt.bit_width,
        sample.qt.signed,
        training=True,
    )
    for moved in (qt.detach(), qt.cpu(), qt.to("cpu")):
        assert isinstance(moved, IntQuantTensor)
        for name in ("value", "scale", "zero_point", "bit_width"):
            assert torch.equal(getattr(moved, name), getattr(qt, name))
        assert (moved.signed, moved.training) == (qt.signed, qt.training)
    assert not qt.detach().requires_grad
    double = qt.to(torch.float64)
    assert all(getattr(double, name).dtype == torch.float64 for name in ("value", "scale", "zero_point", "bit_width"))
    assert double.is_valid
