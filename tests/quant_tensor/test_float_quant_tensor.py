"""FloatQuantTensor: validity against PyTorch's own float8 formats, and the ops that keep its
metadata."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from quantwire.quant_tensor import FloatQuantTensor

E4M3 = dict(exponent_bit_width=4, mantissa_bit_width=3, exponent_bias=7, saturating=True, has_inf=False, has_nan=True)
E5M2 = dict(exponent_bit_width=5, mantissa_bit_width=2, exponent_bias=15, saturating=False, has_inf=True, has_nan=True)


def e4m3(value: torch.Tensor, scale: torch.Tensor | float = 1.0, signed: bool = True) -> FloatQuantTensor:
    return FloatQuantTensor(value, scale, 0.0, **E4M3, signed=signed, training=False)


def all_codes(dtype: torch.dtype) -> torch.Tensor:
    """Every number of a float8 format, NaN and infinities included, as float32."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()


def finite_positive_grid(dtype: torch.dtype) -> torch.Tensor:
    codes = all_codes(dtype)
    return codes[torch.isfinite(codes) & (codes >= 0)].unique()


float8_inputs = st.lists(st.floats(-448.0, 448.0, allow_nan=False, width=32), min_size=1, max_size=24).map(torch.tensor)


@given(float8_inputs)
def test_values_cast_through_float8_e4m3fn_are_valid(x: torch.Tensor) -> None:
    value = x.to(torch.float8_e4m3fn).float()
    assert e4m3(value).is_valid


@given(float8_inputs, st.floats(1e-3, 1e3))
def test_scaled_float8_values_are_valid(x: torch.Tensor, scale: float) -> None:
    scale_t = torch.tensor(scale)
    assert e4m3(x.to(torch.float8_e4m3fn).float() * scale_t, scale_t).is_valid


def test_every_e4m3fn_code_including_nan_is_valid() -> None:
    assert e4m3(all_codes(torch.float8_e4m3fn)).is_valid


def test_every_e5m2_code_including_inf_and_nan_is_valid() -> None:
    codes = all_codes(torch.float8_e5m2)
    assert FloatQuantTensor(codes, 1.0, 0.0, **E5M2, signed=True, training=False).is_valid


@pytest.mark.parametrize("dtype, fmt", [(torch.float8_e4m3fn, E4M3), (torch.float8_e5m2, E5M2)])
def test_midpoints_between_neighbouring_codes_are_each_invalid(dtype: torch.dtype, fmt: dict) -> None:
    grid = finite_positive_grid(dtype).double()
    midpoints = ((grid[1:] + grid[:-1]) / 2).float()
    for sign in (1.0, -1.0):
        for midpoint in midpoints * sign:
            qt = FloatQuantTensor(midpoint.view(1), 1.0, 0.0, **fmt, signed=True, training=False)
            assert not qt.is_valid, float(midpoint)


@pytest.mark.parametrize("value", [500.0, -1000.0, float("inf")])
def test_values_beyond_the_format_are_invalid(value: float) -> None:
    assert not e4m3(torch.tensor([1.0, value])).is_valid


def test_nan_is_invalid_without_a_nan_code() -> None:
    fp4 = dict(exponent_bit_width=2, mantissa_bit_width=1, exponent_bias=1, saturating=True)
    value = torch.tensor([6.0, float("nan")])
    assert FloatQuantTensor(
        value[:1], 1.0, 0.0, **fp4, has_inf=False, has_nan=False, signed=True, training=False
    ).is_valid
    assert not FloatQuantTensor(
        value, 1.0, 0.0, **fp4, has_inf=False, has_nan=False, signed=True, training=False
    ).is_valid


def test_non_positive_scale_is_invalid() -> None:
    value = torch.tensor([1.0, -2.0])
    assert not e4m3(-value, torch.tensor(-1.0)).is_valid
    assert not e4m3(value * 0, torch.tensor(0.0)).is_valid


def test_unsigned_format_rejects_negative_values() -> None:
    assert e4m3(torch.tensor([0.5, 2.0]), signed=False).is_valid
    assert not e4m3(torch.tensor([0.5, -2.0]), signed=False).is_valid


def test_minifloat_is_value_over_scale() -> None:
    value = torch.tensor([1.5, -0.25]) * 0.1
    qt = e4m3(value, torch.tensor(0.1))
    assert torch.equal(qt.minifloat(), value / 0.1)


def test_repr_names_every_field() -> None:
    text = repr(e4m3(torch.tensor([1.0])))
    assert text.startswith("FloatQuantTensor(value=tensor([1.]), scale=tensor(1.), zero_point=tensor(0.), ")
    assert "exponent_bit_width=tensor(4.), mantissa_bit_width=tensor(3.), exponent_bias=tensor(7.), " in text
    assert text.endswith("saturating=True, has_inf=False, has_nan=True, signed=True, training=False)")


def grid_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 20).to(torch.float8_e4m3fn).float()


KEEPING_OPS = {
    "view": lambda x: x.view(-1),
    "reshape": lambda x: torch.reshape(x, (4, -1)),
    "transpose": lambda x: x.transpose(0, 1),
    "permute": lambda x: x.permute(2, 0, 1),
    "index": lambda x: x[1:, ..., ::2],
    "unsqueeze": lambda x: x.unsqueeze(0),
    "torch.relu": torch.relu,
    "F.relu": F.relu,
    "max_pool1d": lambda x: F.max_pool1d(x, 2),
    "cat": lambda x: torch.cat([x, x]),
    "concat dim": lambda x: torch.concat([x, x[:, :1]], dim=1),
}


@pytest.mark.parametrize("op", KEEPING_OPS.values(), ids=KEEPING_OPS.keys())
@pytest.mark.parametrize("per_channel", [False, True])
def test_view_ops_relu_and_cat_keep_metadata(op, per_channel: bool) -> None:
    grid = grid_tensor((2, 3, 4), seed=0)
    scale = torch.tensor([0.5, 0.3, 2.0]).view(1, 3, 1) if per_channel else torch.tensor(0.3)
    qt = e4m3(grid * scale, scale)
    assert qt.is_valid
    result = op(qt)
    if per_channel and op in (KEEPING_OPS["cat"], KEEPING_OPS["concat dim"]):
        assert type(result) is torch.Tensor  # cat keeps per-tensor metadata only
        return
    assert isinstance(result, FloatQuantTensor)
    assert result.is_valid
    assert torch.equal(result.value, op(qt.value))
    assert torch.equal(result.exponent_bit_width, qt.exponent_bit_width)
    assert (result.saturating, result.has_inf, result.has_nan, result.signed) == (True, False, True, True)


def test_cat_with_different_formats_or_scales_falls_back() -> None:
    grid = grid_tensor((2, 3), seed=1)
    qt = e4m3(grid)
    other_scale = e4m3(grid * 2, torch.tensor(2.0))
    other_format = FloatQuantTensor(grid, 1.0, 0.0, **{**E4M3, "saturating": False}, signed=True, training=False)
    for other in (other_scale, other_format, grid):
        result = torch.cat([qt, other])
        assert type(result) is torch.Tensor
        assert torch.equal(result, torch.cat([qt.value, other.value if hasattr(other, "value") else other]))


@pytest.mark.parametrize("op", [lambda a: a + a, lambda a: a * a, lambda a: torch.sigmoid(a), lambda a: torch.sum(a)])
def test_arithmetic_falls_back(op) -> None:
    qt = e4m3(grid_tensor((2, 3), seed=2))
    result = op(qt)
    assert type(result) is torch.Tensor
    assert torch.equal(result, op(qt.value))


def test_detach_and_to_keep_every_field() -> None:
    qt = FloatQuantTensor(grid_tensor((3,), seed=3).requires_grad_(), 1.0, 0.0, **E4M3, signed=True, training=True)
    for moved in (qt.detach(), qt.to(torch.float64), qt.cpu()):
        assert isinstance(moved, FloatQuantTensor)
        for name in (
            "value",
            "scale",
            "zero_point",
            "exponent_bit_width",
            "mantissa_bit_width",
            "exponent_bias",
        ):
            assert torch.equal(getattr(moved, name).double(), getattr(qt, name).double())
        for name in ("saturating", "has_inf", "has_nan", "signed", "training"):
            assert getattr(moved, name) == getattr(qt, name)
        assert moved.is_valid
    assert qt.to(torch.float64).exponent_bias.dtype == torch.float64
    assert not qt.detach().requires_grad


def test_gradients_flow_through_view_ops_and_relu() -> None:
    leaf = grid_tensor((2, 3), seed=4).requires_grad_()
    result = torch.relu(e4m3(leaf).transpose(0, 1)[1:])
    assert isinstance(result, FloatQuantTensor)
    result.value.sum().backward()
    expected = torch.zeros(2, 3)
    expected[:, 1:] = (leaf.detach()[:, 1:] > 0).float()
    assert torch.equal(leaf.grad, expected)
