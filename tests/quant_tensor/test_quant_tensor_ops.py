"""Torch functions on IntQuantTensors: the ops that keep (or compute) metadata give valid
results equal to the op on the plain values and on the integer codes; every other op returns
the plain result."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from quant_tensor_strategies import IntSample, code_range, from_codes, int_samples, same_scale_pairs

from quantwire.quant_tensor import FloatQuantTensor, IntQuantTensor
from quantwire.quant_tensor.base import unwrap

Op = Callable[[Any], Any]

# Each op works on any tensor of 1 to 4 dimensions, and on an IntQuantTensor alike.
SHAPE_OPS: dict[str, Op] = {
    "Tensor.view": lambda x: x.view(-1),
    "Tensor.view 2d": lambda x: x.view(1, -1),
    "torch.reshape": lambda x: torch.reshape(x, (-1, 1)),
    "Tensor.reshape": lambda x: x.reshape(tuple(reversed(x.shape))),
    "torch.flatten": lambda x: torch.flatten(x),
    "Tensor.flatten": lambda x: x.flatten(max(0, x.dim() - 2)),
    "torch.unflatten": lambda x: torch.unflatten(x, 0, (1, x.shape[0])),
    "Tensor.unflatten": lambda x: x.unflatten(-1, (x.shape[-1], 1)),
    "torch.transpose": lambda x: torch.transpose(x, 0, -1),
    "Tensor.transpose": lambda x: x.transpose(-1, 0),
    "torch.permute": lambda x: torch.permute(x, tuple(reversed(range(x.dim())))),
    "Tensor.permute": lambda x: x.permute(*reversed(range(x.dim()))),
    "torch.squeeze": lambda x: torch.squeeze(x),
    "Tensor.squeeze": lambda x: x.squeeze(0),
    "torch.unsqueeze": lambda x: torch.unsqueeze(x, 0),
    "Tensor.unsqueeze": lambda x: x.unsqueeze(-1),
    "torch.t": lambda x: torch.t(x.reshape(x.shape[0], -1)),
    "Tensor.t": lambda x: x.reshape(-1, x.shape[-1]).t(),
    "index int": lambda x: x[0],
    "index slice": lambda x: x[..., ::2],
    "index None": lambda x: x[:, None],
    "index tensor": lambda x: x[torch.tensor([0, 0])],
    "index mask": lambda x: x[torch.arange(x.shape[0]) % 2 == 0],
    "index full mask": lambda x: x[torch.ones(tuple(x.shape), dtype=torch.bool)],
    "index scalar": lambda x: x[(0,) * x.dim()],
    "Tensor.expand": lambda x: x.unsqueeze(0).expand(3, *x.shape),
    "torch.clone": lambda x: torch.clone(x),
    "Tensor.clone": lambda x: x.clone(),
    "Tensor.contiguous": lambda x: x.transpose(0, -1).contiguous(),
    "chain": lambda x: x.transpose(0, -1)[..., :1].reshape(-1).unsqueeze(0),
}

RELU_OPS: dict[str, Op] = {
    "torch.relu": torch.relu,
    "F.relu": F.relu,
    "F.relu inplace=False": lambda x: F.relu(x, inplace=False),
    "Tensor.relu": lambda x: x.relu(),
}


def assert_keeps_metadata(result: Any, expected_value: torch.Tensor, expected_codes: torch.Tensor) -> None:
    assert isinstance(result, IntQuantTensor)
    assert result.is_valid
    assert torch.equal(result.value, expected_value)
    assert torch.equal(result.int(), expected_codes.to(torch.int32))


@pytest.mark.parametrize("op", SHAPE_OPS.values(), ids=SHAPE_OPS.keys())
@settings(max_examples=15)
@given(sample=int_samples())
def test_shape_ops_keep_metadata(op: Op, sample: IntSample) -> None:
    result = op(sample.qt)
    assert_keeps_metadata(result, op(sample.qt.value), op(sample.codes))
    assert (result.signed, result.training) == (sample.qt.signed, sample.qt.training)
    assert torch.equal(result.bit_width, sample.qt.bit_width)


@pytest.mark.parametrize("op", RELU_OPS.values(), ids=RELU_OPS.keys())
@settings(max_examples=20)
@given(sample=int_samples())
def test_relu_keeps_metadata(op: Op, sample: IntSample) -> None:
    zero_point = sample.qt.zero_point
    expected_codes = torch.relu(sample.codes - zero_point) + zero_point
    assert_keeps_metadata(op(sample.qt), torch.relu(sample.qt.value), expected_codes)


def test_relu_inplace_falls_back() -> None:
    qt = IntQuantTensor(torch.tensor([-1.0, 2.0]), 1.0, 0.0, 8, True, False)
    result = F.relu(qt, inplace=True)
    assert type(result) is torch.Tensor
    assert torch.equal(result, torch.tensor([0.0, 2.0]))


# name: (leading dims, spatial dims, op)
POOL_OPS: dict[str, tuple[int, int, Op]] = {
    "F.max_pool1d": (2, 1, lambda x: F.max_pool1d(x, 2)),
    "F.max_pool2d": (2, 2, lambda x: F.max_pool2d(x, 2)),
    "F.max_pool2d unbatched": (1, 2, lambda x: F.max_pool2d(x, 2)),
    "F.max_pool3d unbatched": (1, 3, lambda x: F.max_pool3d(x, 2)),
    "F.max_pool2d return_indices=False": (2, 2, lambda x: F.max_pool2d(x, 2, return_indices=False)),
    "F.max_pool2d stride padding": (2, 2, lambda x: F.max_pool2d(x, 2, stride=1, padding=1, ceil_mode=True)),
    "torch.max_pool1d": (2, 1, lambda x: torch.max_pool1d(x, 2)),
    "torch.max_pool2d": (2, 2, lambda x: torch.max_pool2d(x, 2)),
    "torch.max_pool3d unbatched": (1, 3, lambda x: torch.max_pool3d(x, 2)),
    "F.interpolate": (2, 2, lambda x: F.interpolate(x, scale_factor=2)),
    "F.interpolate nearest-exact size": (2, 2, lambda x: F.interpolate(x, size=(3, 5), mode="nearest-exact")),
    "F.interpolate 1d": (2, 1, lambda x: F.interpolate(x, scale_factor=3, mode="nearest")),
    "F.upsample": (2, 2, lambda x: F.upsample(x, scale_factor=2, mode="nearest")),
    "F.upsample_nearest": (2, 2, lambda x: F.upsample_nearest(x, scale_factor=2)),
}


def constant_over_trailing_dims(sample: IntSample, dims: int) -> bool:
    return all(
        all(size == 1 for size in metadata.shape[-dims:]) for metadata in (sample.qt.scale, sample.qt.zero_point)
    )


@st.composite
def pooling_samples(draw: st.DrawFn, leading_dims: int, spatial_dims: int) -> IntSample:
    """Tensors of (batch and) channel dims of sizes 1..3, then spatial dims of sizes 2..4."""
    leading = draw(st.lists(st.integers(1, 3), min_size=leading_dims, max_size=leading_dims))
    spatial = draw(st.lists(st.integers(2, 4), min_size=spatial_dims, max_size=spatial_dims))
    return draw(int_samples(shape=(*leading, *spatial)))


@pytest.mark.parametrize("leading_dims, spatial_dims, op", POOL_OPS.values(), ids=POOL_OPS.keys())
@settings(max_examples=15)
@given(data=st.data())
def test_pooling_and_nearest_resizing_keep_metadata_constant_over_the_window(
    leading_dims: int, spatial_dims: int, op: Op, data: st.DataObject
) -> None:
    sample = data.draw(pooling_samples(leading_dims, spatial_dims))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`nn.functional.upsample", UserWarning)
        result = op(sample.qt)
        expected_value = op(sample.qt.value)
        expected_codes = op(sample.codes.double())
    if constant_over_trailing_dims(sample, spatial_dims):
        assert_keeps_metadata(result, expected_value, expected_codes)
    else:
        assert type(result) is torch.Tensor
        assert torch.equal(result, expected_value)


@settings(max_examples=20)
@given(sample=int_samples(shape=(2, 3, 4, 4), per_channel=True))
def test_max_pool_returns_indices_with_a_quant_tensor(sample: IntSample) -> None:
    result, indices = F.max_pool2d(sample.qt, 2, return_indices=True)
    expected_value, expected_indices = F.max_pool2d(sample.qt.value, 2, return_indices=True)
    if constant_over_trailing_dims(sample, 2):
        assert_keeps_metadata(result, expected_value, F.max_pool2d(sample.codes.double(), 2))
    else:
        assert type(result) is torch.Tensor
    assert torch.equal(indices, expected_indices)


def test_max_pool_keeps_metadata_broadcast_by_a_shape_op_when_it_is_constant() -> None:
    codes = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4) % 256
    scale = torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    qt = from_codes(codes, scale, torch.zeros(()), 8, False).qt
    sliced = qt[1:]  # the scale is now broadcast to (1, 3, 4, 4)
    assert sliced.scale.shape == (1, 3, 4, 4)
    result = F.max_pool2d(sliced, 2)
    assert_keeps_metadata(result, F.max_pool2d(qt.value[1:], 2), F.max_pool2d(codes[1:].double(), 2))
    assert result.scale.shape == (1, 3, 1, 1)


def test_bilinear_interpolation_falls_back() -> None:
    qt = from_codes(torch.arange(16).view(1, 1, 4, 4), torch.tensor(0.5), torch.zeros(()), 8, False).qt
    result = F.interpolate(qt, scale_factor=2, mode="bilinear")
    assert type(result) is torch.Tensor
    assert torch.equal(result, F.interpolate(qt.value, scale_factor=2, mode="bilinear"))


def bits_for_range(low: int, high: int, signed: bool) -> int:
    bit_width = 1
    while not (code_range(bit_width, signed)[0] <= low and high <= code_range(bit_width, signed)[1]):
        bit_width += 1
    return bit_width


ADD_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b,
    "torch.add": torch.add,
    "torch.add kwargs": lambda a, b: torch.add(input=a, other=b),
    "Tensor.add": lambda a, b: a.add(b),
}


@pytest.mark.parametrize("add", ADD_OPS.values(), ids=ADD_OPS.keys())
@settings(max_examples=30)
@given(pair=same_scale_pairs())
def test_add_with_equal_scales_keeps_metadata(add: Callable[[Any, Any], Any], pair: tuple) -> None:
    a, b = pair
    result = add(a.qt, b.qt)
    assert_keeps_metadata(result, a.qt.value + b.qt.value, a.codes + b.codes)
    assert torch.equal(result.zero_point, a.qt.zero_point + b.qt.zero_point)
    signed = a.qt.signed or b.qt.signed
    assert result.signed == signed
    a_low, a_high = code_range(int(a.qt.bit_width), a.qt.signed)
    b_low, b_high = code_range(int(b.qt.bit_width), b.qt.signed)
    assert int(result.bit_width) == bits_for_range(a_low + b_low, a_high + b_high, signed)
    if a.qt.signed == b.qt.signed:
        assert int(result.bit_width) == max(int(a.qt.bit_width), int(b.qt.bit_width)) + 1


@given(pair=same_scale_pairs())
def test_add_with_different_scales_falls_back(pair: tuple) -> None:
    a, b = pair[0].qt, pair[1].qt
    b = IntQuantTensor(b.value * 2, b.scale * 2, b.zero_point, b.bit_width, b.signed, False)
    result = a + b
    assert type(result) is torch.Tensor
    assert torch.equal(result, a.value + b.value)


MUL_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "*": lambda a, b: a * b,
    "torch.mul": torch.mul,
    "Tensor.mul": lambda a, b: a.mul(b),
}


@st.composite
def zero_point_free_pairs(draw: st.DrawFn) -> tuple[IntSample, IntSample]:
    first = draw(int_samples(bit_widths=(2, 8), zero_zero_point=True))
    second = draw(int_samples(shape=tuple(first.qt.shape), bit_widths=(2, 8), zero_zero_point=True))
    return first, second


@pytest.mark.parametrize("mul", MUL_OPS.values(), ids=MUL_OPS.keys())
@settings(max_examples=30)
@given(pair=zero_point_free_pairs())
def test_mul_with_zero_zero_points_keeps_metadata(mul: Callable[[Any, Any], Any], pair: tuple) -> None:
    a, b = pair
    result = mul(a.qt, b.qt)
    assert_keeps_metadata(result, a.qt.value * b.qt.value, a.codes * b.codes)
    assert torch.equal(result.scale, a.qt.scale * b.qt.scale)
    assert torch.equal(result.bit_width, a.qt.bit_width + b.qt.bit_width)
    assert result.signed == (a.qt.signed or b.qt.signed)
    assert not bool(result.zero_point.any())


@given(pair=same_scale_pairs())
def test_mul_with_a_nonzero_zero_point_falls_back(pair: tuple) -> None:
    a, b = pair[0].qt, pair[1].qt
    b = IntQuantTensor(b.value - b.scale, b.scale, b.zero_point + 1, b.bit_width, b.signed, False)
    result = a * b
    assert type(result) is torch.Tensor
    assert torch.equal(result, a.value * b.value)


@st.composite
def cat_lists(draw: st.DrawFn) -> tuple[list[IntSample], int]:
    """2 or 3 IntQuantTensors with one per-tensor metadata, differing in size along ``dim``."""
    first = draw(int_samples(per_channel=False))
    qt = first.qt
    dim = draw(st.integers(0, qt.dim() - 1))
    low, high = code_range(int(qt.bit_width), qt.signed)
    samples = [first]
    for _ in range(draw(st.integers(1, 2))):
        shape = list(qt.shape)
        shape[dim] = draw(st.integers(1, 3))
        codes = torch.randint(low, high + 1, shape, generator=torch.Generator().manual_seed(len(samples)))
        samples.append(from_codes(codes, qt.scale, qt.zero_point, int(qt.bit_width), qt.signed))
    return samples, dim


CAT_OPS: dict[str, Callable[[list, int], Any]] = {
    "torch.cat": lambda tensors, dim: torch.cat(tensors, dim),
    "torch.cat tuple dim=": lambda tensors, dim: torch.cat(tuple(tensors), dim=dim),
    "torch.concat": lambda tensors, dim: torch.concat(tensors, dim=dim),
    "torch.concatenate axis=": lambda tensors, dim: torch.concatenate(tensors, axis=dim),
}


@pytest.mark.parametrize("cat", CAT_OPS.values(), ids=CAT_OPS.keys())
@settings(max_examples=30)
@given(data=cat_lists())
def test_cat_with_identical_per_tensor_metadata_keeps_it(cat: Callable[[list, int], Any], data: tuple) -> None:
    samples, dim = data
    result = cat([s.qt for s in samples], dim)
    expected_value = torch.cat([s.qt.value for s in samples], dim)
    assert_keeps_metadata(result, expected_value, torch.cat([s.codes for s in samples], dim))


def test_cat_without_dim_concatenates_along_the_first() -> None:
    a = from_codes(torch.tensor([[1, 2]]), torch.tensor(0.5), torch.tensor(0.0), 4, True).qt
    b = from_codes(torch.tensor([[-3, 4], [5, 6]]), torch.tensor(0.5), torch.tensor(0.0), 4, True).qt
    result = torch.cat([a, b])
    assert_keeps_metadata(result, torch.cat([a.value, b.value]), torch.tensor([[1, 2], [-3, 4], [5, 6]]))


def test_cat_with_per_channel_or_differing_metadata_falls_back() -> None:
    codes = torch.tensor([[1, 2], [3, 4]])
    per_tensor = from_codes(codes, torch.tensor(0.5), torch.tensor(0.0), 4, True).qt
    per_channel = from_codes(codes, torch.tensor([[0.5], [0.25]]), torch.tensor(0.0), 4, True).qt
    other_zero_point = from_codes(codes, torch.tensor(0.5), torch.tensor(1.0), 4, True).qt
    other_bit_width = from_codes(codes, torch.tensor(0.5), torch.tensor(0.0), 5, True).qt
    other_signedness = from_codes(codes, torch.tensor(0.5), torch.tensor(0.0), 4, False).qt
    for other in (per_channel, other_zero_point, other_bit_width, other_signedness, codes.float()):
        result = torch.cat([per_tensor, other])
        assert type(result) is torch.Tensor
        assert torch.equal(result, torch.cat([per_tensor.value, unwrap(other)]))


def plain(x: Any) -> torch.Tensor:
    return torch.ones(tuple(x.shape))


FALLBACK_OPS: dict[str, Op] = {
    "torch.sigmoid": torch.sigmoid,
    "torch.exp": torch.exp,
    "F.linear": lambda x: F.linear(x, torch.ones(3, x.shape[-1])),
    "torch.sum": torch.sum,
    "torch.mean": lambda x: torch.mean(x, dim=0),
    "Tensor.sum via torch": lambda x: torch.sum(x, dim=-1, keepdim=True),
    "sub": lambda x: x - x,
    "rsub": lambda x: 1.0 - x,
    "truediv": lambda x: x / 2.0,
    "rtruediv": lambda x: 2.0 / x,
    "neg": lambda x: -x,
    "matmul": lambda x: x @ torch.ones(x.shape[-1], 2),
    "plain @ quant": lambda x: torch.ones(2, x.shape[-2] if x.dim() > 1 else x.shape[0]) @ x,
    "mul scalar": lambda x: x * 2.0,
    "rmul scalar": lambda x: 2.0 * x,
    "add scalar": lambda x: x + 1.0,
    "radd scalar": lambda x: 1.0 + x,
    "add plain": lambda x: torch.add(x, plain(x)),
    "plain + quant": lambda x: plain(x) + x,
    "plain * quant": lambda x: plain(x) * x,
    "plain.add(quant)": lambda x: plain(x).add(x),
    "cat with plain": lambda x: torch.cat([x, plain(x)]),
    "stack": lambda x: torch.stack([x, x]),
    "add alpha": lambda x: torch.add(x, x, alpha=2),
    "where": lambda x: torch.where(plain(x) > 0, x, plain(x)),
    "F.relu6": F.relu6,
    "view as dtype": lambda x: x.view(torch.int32),
}


@pytest.mark.parametrize("op", FALLBACK_OPS.values(), ids=FALLBACK_OPS.keys())
@settings(max_examples=5)
@given(sample=int_samples())
def test_other_ops_fall_back_to_plain_tensors(op: Op, sample: IntSample) -> None:
    result = op(sample.qt)
    expected = op(sample.qt.value)
    assert type(result) is torch.Tensor
    assert torch.equal(result, expected)


def test_int_and_float_quant_tensors_do_not_mix() -> None:
    value = torch.tensor([1.0, 2.0])
    int_qt = IntQuantTensor(value, 1.0, 0.0, 8, True, False)
    float_qt = FloatQuantTensor(value, 1.0, 0.0, 4, 3, 7, True, False, True, True, False)
    for result in (int_qt + float_qt, float_qt + int_qt, int_qt * float_qt, torch.cat([int_qt, float_qt])):
        assert type(result) is torch.Tensor


def test_unwrap_reaches_into_lists_tuples_and_dicts() -> None:
    qt = IntQuantTensor(torch.tensor([1.0]), 1.0, 0.0, 8, True, False)
    nested = {"a": [qt, (qt, 3)], "b": qt, "c": "text"}
    assert unwrap(nested) == {"a": [qt.value, (qt.value, 3)], "b": qt.value, "c": "text"}


GRADIENT_OPS: dict[str, Op] = {**SHAPE_OPS, **RELU_OPS, "add": lambda x: x + x}


@pytest.mark.parametrize("op", GRADIENT_OPS.values(), ids=GRADIENT_OPS.keys())
@settings(max_examples=3)
@given(sample=int_samples())
def test_gradients_flow_through_the_value(op: Op, sample: IntSample) -> None:
    qt = sample.qt
    leaf = qt.value.clone().requires_grad_()
    plain_leaf = qt.value.clone().requires_grad_()
    result = op(IntQuantTensor(leaf, qt.scale, qt.zero_point, qt.bit_width, qt.signed, True))
    assert isinstance(result, IntQuantTensor) and result.requires_grad
    weights = torch.arange(result.numel(), dtype=torch.float32).view(result.shape)
    (result.value * weights).sum().backward()
    (op(plain_leaf) * weights).sum().backward()
    assert torch.equal(leaf.grad, plain_leaf.grad)


def test_add_passes_gradients_to_both_scales() -> None:
    scale_a = torch.tensor(0.5, requires_grad=True)
    scale_b = torch.tensor(0.5, requires_grad=True)
    a = IntQuantTensor(torch.tensor([1.0, -0.5]) * scale_a * 2, scale_a, 0.0, 8, True, True)
    b = IntQuantTensor(torch.tensor([0.5, 1.0]) * scale_b * 2, scale_b, 0.0, 8, True, True)
    result = a + b
    assert isinstance(result, IntQuantTensor)
    (result.value.sum() + result.scale).backward()
    assert scale_a.grad is not None and scale_b.grad is not None
