"""QuantTensors that layers return with ``return_quant_tensor=True``.

A Linear/Conv with a quantized input and a bias quantized with input scale x weight scale
returns the integer accumulator: its codes must be exactly the integer product of the input
and weight codes plus the bias codes (checked here in int64/float64). Pools, resampling,
element-wise addition and embeddings return tensors whose metadata describes their values.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from quantwire.errors import QuantConfigError
from quantwire.nn import (
    QuantAdaptiveAvgPool2d,
    QuantAvgPool2d,
    QuantCat,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantEltwiseAdd,
    QuantEmbedding,
    QuantIdentity,
    QuantLinear,
    QuantMaxPool1d,
    QuantMaxPool2d,
    QuantReLU,
    QuantUpsample,
)
from quantwire.quant import (
    Int4WeightPerChannelFloat,
    Int8ActDynamicPerTokenFloat,
    Int8ActPerTensorFloat,
    Int8Bias,
    Int8WeightPerChannelFixedPoint,
    Int8WeightPerChannelFloat,
    Int8WeightPerGroupFloat,
    Int8WeightPerTensorFloat,
    Int16Bias,
    Int32Bias,
    ShiftedUint8ActPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from quantwire.quant_tensor import IntQuantTensor

WEIGHT_QUANTIZERS = {
    "per-tensor": Int8WeightPerTensorFloat,
    "per-channel": Int8WeightPerChannelFloat,
    "per-channel-4bit": Int4WeightPerChannelFloat,
    "fixed-point": Int8WeightPerChannelFixedPoint,
}


def calibrate(layer: nn.Module, *inputs: Any, steps: int = 2) -> None:
    """Run the collection steps of every runtime-statistics quantizer, then switch to eval."""
    layer.train()
    for _ in range(steps):
        layer(*inputs)
    layer.eval()


def codes(t: IntQuantTensor) -> Tensor:
    return t.int().to(torch.int64)


def check_accumulator(layer: nn.Module, x: Tensor, exact: Any, feature_dim: int) -> IntQuantTensor:
    """The layer's output is the accumulator of input x weight codes (+ bias codes)."""
    output = layer(x)
    quant_input, quant_weight = layer.input_quant(x), layer.quant_weight()
    assert isinstance(output, IntQuantTensor) and output.is_valid and output.signed
    weight_scale = quant_weight.scale.reshape(-1)
    if isinstance(layer, QuantConvTranspose2d) and weight_scale.numel() > 1:
        weight_scale = weight_scale.repeat(layer.groups)  # weight dim 1 holds out_channels / groups
    shape = [1] * output.dim()
    shape[feature_dim] = -1
    expected_scale = quant_input.scale * (weight_scale.reshape(shape) if weight_scale.numel() > 1 else weight_scale)
    assert torch.allclose(output.scale, expected_scale, rtol=1e-6, atol=0)
    accumulator = exact(codes(quant_input).double(), codes(quant_weight).double())
    if layer.bias is not None:
        # The bias on the accumulator grid: round(bias / (input scale x weight scale)), clamped.
        bits = int(layer.bias_quant.quant_injector.bit_width)
        bias_scale = (quant_input.scale.double() * weight_scale.double()).expand(layer.bias.shape)
        bias_codes = torch.round(layer.bias.double() / bias_scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        accumulator = accumulator + bias_codes.reshape(shape)
    assert torch.equal(codes(output), accumulator.round().to(torch.int64))
    assert torch.equal(accumulator, accumulator.round())  # the float64 reference itself is exact
    return output


@settings(max_examples=25)
@given(
    in_features=st.integers(1, 48),
    out_features=st.integers(1, 6),
    batch=st.integers(1, 4),
    weight=st.sampled_from(list(WEIGHT_QUANTIZERS)),
    bias=st.sampled_from([None, Int8Bias, Int16Bias, Int32Bias]),
    seed=st.integers(0, 2**16),
)
def test_linear_accumulator(in_features: int, out_features: int, batch: int, weight: str, bias: Any, seed: int) -> None:
    torch.manual_seed(seed)
    layer = QuantLinear(
        in_features,
        out_features,
        bias=bias is not None,
        weight_quant=WEIGHT_QUANTIZERS[weight],
        input_quant=Int8ActPerTensorFloat,
        bias_quant=bias,
        return_quant_tensor=True,
    )
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.mul_(3)
    x = torch.randn(batch, in_features) * 2
    calibrate(layer, x)
    output = check_accumulator(layer, x, lambda i, w: i @ w.T, feature_dim=-1)
    fan_in_bits = math.ceil(math.log2(in_features)) if in_features > 1 else 0
    bits = 8 + (4 if weight == "per-channel-4bit" else 8) + fan_in_bits
    if bias is not None:
        bits = max(bits, int(bias.bit_width)) + 1
    assert output.bit_width.item() == bits


CONV_CASES = {
    "plain": {},
    "stride-padding": {"stride": 2, "padding": 1},
    "groups-dilation": {"groups": 2, "dilation": 2, "padding": 2},
}


@pytest.mark.parametrize("bias", [None, Int32Bias], ids=["no-bias", "int32-bias"])
@pytest.mark.parametrize("weight", list(WEIGHT_QUANTIZERS))
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_accumulator(case: str, weight: str, bias: Any) -> None:
    torch.manual_seed(0)
    kwargs = CONV_CASES[case]
    layer = QuantConv2d(
        4,
        6,
        3,
        bias=bias is not None,
        weight_quant=WEIGHT_QUANTIZERS[weight],
        input_quant=Int8ActPerTensorFloat,
        bias_quant=bias,
        return_quant_tensor=True,
        **kwargs,
    )
    x = torch.randn(2, 4, 7, 7)
    calibrate(layer, x)
    check_accumulator(layer, x, lambda i, w: F.conv2d(i, w, None, **kwargs), feature_dim=1)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("weight", ["per-tensor", "per-channel"])
def test_conv_transpose2d_accumulator(weight: str, groups: int) -> None:
    torch.manual_seed(0)
    layer = QuantConvTranspose2d(
        4,
        6,
        3,
        stride=2,
        groups=groups,
        weight_quant=WEIGHT_QUANTIZERS[weight],
        input_quant=Int8ActPerTensorFloat,
        bias_quant=Int32Bias,
        return_quant_tensor=True,
    )
    x = torch.randn(2, 4, 4, 4)
    calibrate(layer, x)
    check_accumulator(layer, x, lambda i, w: F.conv_transpose2d(i, w, None, stride=2, groups=groups), feature_dim=1)


def test_a_quant_tensor_input_stands_in_for_an_input_quantizer() -> None:
    torch.manual_seed(0)
    source = QuantIdentity(return_quant_tensor=True)
    layer = QuantLinear(6, 3, bias_quant=Int32Bias, return_quant_tensor=True)
    x = torch.randn(4, 6)
    calibrate(source, x)
    quant_input = source(x)
    output = layer(quant_input)
    assert isinstance(output, IntQuantTensor) and output.is_valid
    expected = codes(quant_input).double() @ codes(layer.quant_weight()).double().T
    bias = layer.bias_quant(layer.bias, quant_input.scale, layer.quant_weight().scale)
    assert torch.equal(codes(output), (expected + codes(bias).double()).to(torch.int64))


def test_bias_needing_the_input_scale_without_a_quantized_input_names_the_layer() -> None:
    for layer in (QuantLinear(4, 3, bias_quant=Int32Bias), QuantConv2d(2, 3, 1, bias_quant=Int16Bias)):
        for return_quant_tensor in (False, True):
            layer.return_quant_tensor = return_quant_tensor
            with pytest.raises(QuantConfigError) as error:
                layer(torch.randn(2, 4) if isinstance(layer, QuantLinear) else torch.randn(1, 2, 3, 3))
            message = str(error.value)
            assert type(layer).__name__ in message and "bias_quant" in message and "input_quant" in message


def test_bias_with_a_per_group_weight_scale_is_a_clear_error() -> None:
    layer = QuantLinear(
        64, 4, weight_quant=Int8WeightPerGroupFloat, input_quant=Int8ActPerTensorFloat, bias_quant=Int32Bias
    )
    with pytest.raises(QuantConfigError, match=r"QuantLinear\.bias_quant=Int32Bias.*weight scale"):
        layer(torch.randn(2, 64))


def test_bias_with_a_per_token_input_scale_is_a_clear_error() -> None:
    layer = QuantLinear(8, 4, input_quant=Int8ActDynamicPerTokenFloat, bias_quant=Int32Bias)
    with pytest.raises(QuantConfigError, match=r"QuantLinear\.bias_quant=Int32Bias.*input scale"):
        layer(torch.randn(2, 8))


@pytest.mark.parametrize(
    ("weight_quant", "input_quant"),
    [(Int8WeightPerGroupFloat, Int8ActPerTensorFloat), (Int8WeightPerTensorFloat, Int8ActDynamicPerTokenFloat)],
    ids=["per-group-weight", "per-token-input"],
)
def test_scales_that_vary_along_the_sum_give_a_plain_tensor(weight_quant: Any, input_quant: Any) -> None:
    layer = QuantLinear(64, 4, bias=False, weight_quant=weight_quant, input_quant=input_quant, return_quant_tensor=True)
    x = torch.randn(3, 64)
    output = layer(x)
    assert isinstance(output, Tensor)
    layer.return_quant_tensor = False
    assert torch.equal(output, layer(x))


def test_output_quant_gives_its_own_quant_tensor() -> None:
    layer = QuantLinear(
        6, 3, input_quant=Int8ActPerTensorFloat, output_quant=Uint8ActPerTensorFloat, return_quant_tensor=True
    )
    output = layer(torch.randn(4, 6))
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert not output.signed and output.bit_width.item() == 8


# -- pools and resampling -----------------------------------------------------------------------


def quant_image(signed: bool = True, shifted: bool = False) -> IntQuantTensor:
    torch.manual_seed(0)
    if shifted:
        source = QuantIdentity(act_quant=ShiftedUint8ActPerTensorFloat, return_quant_tensor=True)
    else:
        source = QuantIdentity(return_quant_tensor=True) if signed else QuantReLU(return_quant_tensor=True)
    x = torch.randn(2, 3, 8, 8) + (0.5 if shifted else 0.0)
    calibrate(source, x)
    quant = source(x)
    assert quant.is_valid
    return quant


def window_sums(quant: IntQuantTensor, kernel: int, stride: int, padding: int = 0) -> Tensor:
    """Sum of the integer codes in each pooling window (padding counts as the zero point)."""
    padded = F.pad(codes(quant).double(), [padding] * 4, value=float(quant.zero_point))
    return F.avg_pool2d(padded, kernel, stride) * kernel * kernel


@pytest.mark.parametrize("kind", ["signed", "unsigned", "shifted"])
@pytest.mark.parametrize(("kernel", "stride", "padding"), [(2, 2, 0), (3, 1, 0), (3, 2, 1)])
def test_avg_pool(kind: str, kernel: int, stride: int, padding: int) -> None:
    quant = quant_image(signed=kind == "signed", shifted=kind == "shifted")
    pool = QuantAvgPool2d(kernel, stride, padding, return_quant_tensor=True)
    output = pool(quant)
    window = kernel * kernel
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert torch.allclose(output.scale, quant.scale / window)
    assert output.zero_point.item() == quant.zero_point.item() * window
    assert output.bit_width.item() == quant.bit_width.item() + math.ceil(math.log2(window))
    assert output.signed == quant.signed
    assert torch.equal(output.value, F.avg_pool2d(quant.value, kernel, stride, padding))
    assert torch.equal(codes(output).double(), window_sums(quant, kernel, stride, padding).round())


@pytest.mark.parametrize("output_size", [1, 2, (4, 2)])
def test_adaptive_avg_pool(output_size: Any) -> None:
    quant = quant_image()
    output = QuantAdaptiveAvgPool2d(output_size, return_quant_tensor=True)(quant)
    sizes = (output_size, output_size) if isinstance(output_size, int) else output_size
    window = (8 // sizes[0]) * (8 // sizes[1])
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert torch.allclose(output.scale, quant.scale / window)
    assert output.bit_width.item() == 8 + math.ceil(math.log2(window))
    assert torch.equal(output.value, F.adaptive_avg_pool2d(quant.value, output_size))


@pytest.mark.parametrize(
    ("pool", "reference"),
    [
        (QuantAvgPool2d(3, padding=1, count_include_pad=False), nn.AvgPool2d(3, padding=1, count_include_pad=False)),
        (QuantAvgPool2d(3, ceil_mode=True), nn.AvgPool2d(3, ceil_mode=True)),
        (QuantAvgPool2d(2, divisor_override=3), nn.AvgPool2d(2, divisor_override=3)),
        (QuantAdaptiveAvgPool2d(3), nn.AdaptiveAvgPool2d(3)),
    ],
    ids=["no-pad-count", "ceil-mode", "divisor-override", "uneven-adaptive"],
)
def test_avg_pools_with_uneven_windows_give_plain_tensors(pool: nn.Module, reference: nn.Module) -> None:
    quant = quant_image()
    pool.return_quant_tensor = True
    output = pool(quant)
    assert isinstance(output, Tensor)
    assert torch.equal(output, reference(quant.value))


def test_avg_pool_output_quant_requantizes() -> None:
    pool = QuantAvgPool2d(2, output_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
    output = pool(quant_image())
    assert isinstance(output, IntQuantTensor) and output.is_valid and output.bit_width.item() == 8


@pytest.mark.parametrize(
    ("layer", "reference"),
    [
        (QuantMaxPool2d(2), lambda x: F.max_pool2d(x, 2)),
        (QuantMaxPool2d(3, stride=2, padding=1), lambda x: F.max_pool2d(x, 3, 2, 1)),
        (QuantUpsample(scale_factor=2), lambda x: F.interpolate(x, scale_factor=2)),
        (QuantUpsample(size=(5, 11), mode="nearest"), lambda x: F.interpolate(x, size=(5, 11))),
    ],
    ids=["maxpool", "maxpool-padded", "upsample", "upsample-size"],
)
def test_max_pool_and_nearest_upsample_keep_the_grid(layer: nn.Module, reference: Any) -> None:
    quant = quant_image()
    layer.return_quant_tensor = True
    output = layer(quant)
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert torch.equal(output.scale, quant.scale) and torch.equal(output.bit_width, quant.bit_width)
    assert torch.equal(output.value, reference(quant.value))
    layer.return_quant_tensor = False
    assert torch.equal(layer(quant), reference(quant.value))


def test_max_pool1d_keeps_the_grid() -> None:
    quant = quant_image().flatten(2)
    output = QuantMaxPool1d(4, return_quant_tensor=True)(quant)
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert torch.equal(output.value, F.max_pool1d(quant.value, 4))


def test_bilinear_upsample_leaves_the_grid() -> None:
    output = QuantUpsample(scale_factor=2, mode="bilinear", return_quant_tensor=True)(quant_image())
    assert isinstance(output, Tensor)


# -- merges --------------------------------------------------------------------------------------


def test_eltwise_add_through_a_frozen_shared_quantizer() -> None:
    torch.manual_seed(0)
    layer = QuantEltwiseAdd(return_quant_tensor=True)
    a, b = torch.randn(4, 5), torch.randn(4, 5) * 3
    layer.train()
    during_collection = layer(a, b)
    # the operands are quantized in one call: one grid covering both, even while collecting
    assert isinstance(during_collection, IntQuantTensor) and during_collection.is_valid
    assert during_collection.scale * 127 >= 0.99 * torch.cat([a, b]).abs().max()
    calibrate(layer, a, b, steps=300)
    output = layer(a, b)
    quant_a, quant_b = layer.input_quant(a), layer.input_quant(b)
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert torch.equal(output.scale, quant_a.scale) and output.bit_width.item() == 9
    assert torch.equal(output.value, quant_a.value + quant_b.value)
    assert torch.equal(codes(output), codes(quant_a) + codes(quant_b))
    layer.train()  # the learned scale is shared in training too
    trained = layer(a, b)
    assert isinstance(trained, IntQuantTensor) and trained.is_valid


def test_eltwise_add_of_quant_tensors_without_input_quant() -> None:
    quant = quant_image()
    output = QuantEltwiseAdd(input_quant=None, return_quant_tensor=True)(quant, quant)
    assert isinstance(output, IntQuantTensor) and output.is_valid and output.bit_width.item() == 9


def test_cat_through_a_frozen_shared_quantizer() -> None:
    layer = QuantCat(dim=1, return_quant_tensor=True)
    a, b = torch.randn(4, 5), torch.randn(4, 2)
    calibrate(layer, [a, b], steps=300)
    output = layer([a, b])
    assert isinstance(output, IntQuantTensor) and output.is_valid and output.shape == (4, 7)
    assert output.bit_width.item() == 8


# -- embeddings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("indices", [torch.tensor([1, 3, 3, 9]), torch.tensor([[0, 9], [4, 4], [2, 7]])])
def test_embedding_gathers_per_row_scales(indices: Tensor) -> None:
    torch.manual_seed(0)
    layer = QuantEmbedding(10, 6, weight_quant=Int8WeightPerChannelFloat, return_quant_tensor=True)
    table = layer.quant_weight()
    output = layer(indices)
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert output.scale.shape == (*indices.shape, 1)
    assert torch.equal(output.scale, table.scale[indices])
    assert torch.equal(codes(output), codes(table)[indices])
    assert output.bit_width.item() == 8 and output.signed


def test_embedding_per_tensor_keeps_the_table_scale() -> None:
    layer = QuantEmbedding(10, 6, return_quant_tensor=True)
    output = layer(torch.tensor([[1, 2], [3, 4]]))
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert torch.equal(output.scale, layer.quant_weight().scale)


def test_embedding_max_norm_renormalises_the_float_table_before_quantizing() -> None:
    torch.manual_seed(0)
    layer = QuantEmbedding(10, 4, max_norm=1.0, return_quant_tensor=True).eval()
    reference = nn.Embedding(10, 4, max_norm=1.0)
    with torch.no_grad():
        reference.weight.mul_(3)
        layer.weight.copy_(reference.weight)
    indices = torch.tensor([1, 2, 3, 2])
    with torch.no_grad():
        output = layer(indices)
        again = layer(indices)
        reference(indices)
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert torch.equal(layer.weight, reference.weight)  # rows renormalised in place, as in torch
    assert torch.equal(output.value, layer.quant_weight().value[indices])
    assert torch.equal(again.value, output.value)
