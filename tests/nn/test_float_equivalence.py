"""With every quantizer set to None, each quant layer is its ``torch.nn`` twin.

The twins share a state dict (loaded strictly both ways) and must give identical outputs
(``torch.equal``; attention, which quantwire writes out rather than calling the fused kernel,
within 1e-6). ``from_float`` must reproduce the float layer and copy, not share, its tensors.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from quantwire.nn import (
    QuantAdaptiveAvgPool2d,
    QuantAvgPool2d,
    QuantCat,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantEltwiseAdd,
    QuantEmbedding,
    QuantHardTanh,
    QuantIdentity,
    QuantLayerNorm,
    QuantLinear,
    QuantMaxPool1d,
    QuantMaxPool2d,
    QuantMultiheadAttention,
    QuantReLU,
    QuantScaledDotProductAttention,
    QuantSigmoid,
    QuantTanh,
    QuantUpsample,
)
from quantwire.quant import Int8WeightPerTensorFloat

NO_QUANT = {"weight_quant": None, "bias_quant": None, "input_quant": None, "output_quant": None}
NO_ACT_QUANT = {"act_quant": None, "input_quant": None}
SDPA_NO_QUANT = {
    "q_scaled_quant": None,
    "k_transposed_quant": None,
    "v_quant": None,
    "softmax_input_quant": None,
    "attn_output_weights_quant": None,
    "sdpa_output_quant": None,
}
MHA_NO_QUANT = {
    **{key: value for key, value in SDPA_NO_QUANT.items() if key != "sdpa_output_quant"},
    "in_proj_input_quant": None,
    "in_proj_weight_quant": None,
    "in_proj_bias_quant": None,
    "out_proj_input_quant": None,
    "out_proj_weight_quant": None,
    "out_proj_bias_quant": None,
    "out_proj_output_quant": None,
}


def randomize(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Give every floating parameter random values (LayerNorm starts at ones and zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return layer


def make_twins(quant: nn.Module, float_layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``quant`` with ``float_layer``'s (randomized) state, loaded strictly, and the same keys."""
    randomize(float_layer)
    assert set(quant.state_dict()) == set(float_layer.state_dict())
    result = quant.load_state_dict(float_layer.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    return quant, float_layer


def assert_same(quant: nn.Module, float_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
    expected = float_layer(*args, **kwargs)
    actual = quant(*args, **kwargs)
    assert isinstance(actual, Tensor)
    assert torch.equal(actual, expected)


# -- layers with a weight -------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_shape", [(5,), (3, 5), (2, 4, 5)])
def test_linear(bias: bool, input_shape: tuple[int, ...]) -> None:
    quant, float_layer = make_twins(QuantLinear(5, 3, bias=bias, **NO_QUANT), nn.Linear(5, 3, bias=bias))
    assert_same(quant, float_layer, torch.randn(input_shape))


CONVS = {1: (QuantConv1d, nn.Conv1d), 2: (QuantConv2d, nn.Conv2d), 3: (QuantConv3d, nn.Conv3d)}


@settings(max_examples=30)
@given(
    dims=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2]),
    kernel_size=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    batched=st.booleans(),
)
def test_conv(
    dims: int,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    bias: bool,
    padding_mode: str,
    batched: bool,
) -> None:
    quant_class, float_class = CONVS[dims]
    args = (4, 6, kernel_size)
    kwargs = dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode
    )
    quant, float_layer = make_twins(quant_class(*args, **kwargs, **NO_QUANT), float_class(*args, **kwargs))
    shape = (4,) + (6,) * dims
    assert_same(quant, float_layer, torch.randn((2, *shape) if batched else shape))


CONV_TRANSPOSES = {1: (QuantConvTranspose1d, nn.ConvTranspose1d), 2: (QuantConvTranspose2d, nn.ConvTranspose2d)}


@settings(max_examples=30)
@given(
    dims=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    kernel_size=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    output_padding=st.integers(0, 2),
    bias=st.booleans(),
    extra_size=st.none() | st.integers(0, 2),
    batched=st.booleans(),
)
def test_conv_transpose(
    dims: int,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    output_padding: int,
    bias: bool,
    extra_size: int | None,
    batched: bool,
) -> None:
    output_padding = output_padding % max(stride, dilation)  # torch: output_padding < max(stride, dilation)
    quant_class, float_class = CONV_TRANSPOSES[dims]
    args = (4, 6, kernel_size)
    kwargs = dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, output_padding=output_padding
    )
    quant, float_layer = make_twins(quant_class(*args, **kwargs, **NO_QUANT), float_class(*args, **kwargs))
    shape = (4,) + (5,) * dims
    x = torch.randn((2, *shape) if batched else shape)
    assert_same(quant, float_layer, x)
    if extra_size is not None and extra_size < stride:
        # output_size picks among the sizes the stride makes possible (the smallest + [0, stride)).
        smallest = (5 - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + 1
        output_size = [smallest + extra_size] * dims
        assert_same(quant, float_layer, x, output_size=output_size)
        assert quant(x, output_size=output_size).shape[-dims:] == tuple(output_size)


@pytest.mark.parametrize("padding_idx", [None, 0, 3, -1])
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_embedding(padding_idx: int | None, max_norm: float | None) -> None:
    quant, float_layer = make_twins(
        QuantEmbedding(10, 4, padding_idx=padding_idx, max_norm=max_norm, weight_quant=None),
        nn.Embedding(10, 4, padding_idx=padding_idx, max_norm=max_norm),
    )
    indices = torch.tensor([[0, 3, 9], [9, 3, 1]])
    assert_same(quant, float_layer, indices)
    assert torch.equal(quant.weight, float_layer.weight)  # max_norm renormalises both tables alike
    # The padding row gets no gradient, as in torch.
    quant(indices).sum().backward()
    if padding_idx is not None:
        assert bool((quant.weight.grad[padding_idx] == 0).all())


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-2}],
    ids=["affine", "no-affine", "no-bias", "eps"],
)
@pytest.mark.parametrize("normalized_shape", [4, (3, 4)])
def test_layer_norm(kwargs: dict[str, Any], normalized_shape: Any) -> None:
    quant, float_layer = make_twins(
        QuantLayerNorm(normalized_shape, **kwargs, **NO_QUANT), nn.LayerNorm(normalized_shape, **kwargs)
    )
    assert_same(quant, float_layer, torch.randn(2, 3, 4))


# -- activations, pools, merges -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quant", "float_layer"),
    [
        (QuantIdentity(**NO_ACT_QUANT), nn.Identity()),
        (QuantReLU(**NO_ACT_QUANT), nn.ReLU()),
        (QuantHardTanh(**NO_ACT_QUANT), nn.Hardtanh()),
        (QuantHardTanh(-0.5, 2.0, **NO_ACT_QUANT), nn.Hardtanh(-0.5, 2.0)),
        (QuantSigmoid(**NO_ACT_QUANT), nn.Sigmoid()),
        (QuantTanh(**NO_ACT_QUANT), nn.Tanh()),
    ],
    ids=["identity", "relu", "hardtanh", "hardtanh-range", "sigmoid", "tanh"],
)
def test_activation(quant: nn.Module, float_layer: nn.Module) -> None:
    x = torch.randn(3, 4, 5) * 3
    assert_same(quant, float_layer, x)
    quant.return_quant_tensor = True  # nothing to attach metadata to: still the plain result
    assert_same(quant, float_layer, x)


@pytest.mark.parametrize(
    ("quant", "float_layer", "shape"),
    [
        (QuantMaxPool1d(3, stride=2, padding=1), nn.MaxPool1d(3, stride=2, padding=1), (2, 3, 9)),
        (QuantMaxPool2d(2), nn.MaxPool2d(2), (2, 3, 8, 8)),
        (
            QuantMaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
            nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
            (2, 3, 9, 9),
        ),
        (QuantAvgPool2d(2), nn.AvgPool2d(2), (2, 3, 8, 8)),
        (
            QuantAvgPool2d(3, stride=2, padding=1, count_include_pad=False),
            nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
            (2, 3, 9, 9),
        ),
        (
            QuantAvgPool2d(3, ceil_mode=True, divisor_override=2),
            nn.AvgPool2d(3, ceil_mode=True, divisor_override=2),
            (2, 3, 8, 8),
        ),
        (QuantAdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1), (2, 3, 7, 5)),
        (QuantAdaptiveAvgPool2d((3, None)), nn.AdaptiveAvgPool2d((3, None)), (2, 3, 7, 5)),
        (QuantUpsample(scale_factor=2), nn.Upsample(scale_factor=2), (2, 3, 4, 4)),
        (
            QuantUpsample(size=(5, 7), mode="bilinear", align_corners=True),
            nn.Upsample(size=(5, 7), mode="bilinear", align_corners=True),
            (2, 3, 4, 4),
        ),
    ],
    ids=[
        "maxpool1d",
        "maxpool2d",
        "maxpool2d-dilated",
        "avgpool2d",
        "avgpool2d-pad",
        "avgpool2d-divisor",
        "adaptive",
        "adaptive-none",
        "upsample-nearest",
        "upsample-bilinear",
    ],
)
def test_pool_and_resample(quant: nn.Module, float_layer: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    assert_same(quant, float_layer, x)
    quant.return_quant_tensor = True
    assert_same(quant, float_layer, x)


def test_eltwise_add_and_cat() -> None:
    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 5)
    assert torch.equal(QuantEltwiseAdd(input_quant=None)(a, b), a + b)
    assert torch.equal(QuantEltwiseAdd(input_quant=None, return_quant_tensor=True)(a, b), a + b)
    assert torch.equal(QuantCat(dim=1, input_quant=None)([a, b, c]), torch.cat([a, b, c], dim=1))
    assert torch.equal(QuantCat(dim=0, input_quant=None)([a, b]), torch.cat([a, b], dim=0))


# -- attention ------------------------------------------------------------------------------------


def assert_close(actual: Tensor | None, expected: Tensor | None) -> None:
    if expected is None:
        assert actual is None
        return
    assert actual is not None and actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-6, rtol=1e-5, equal_nan=True)


def sdpa_masks() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(3)
    allowed = torch.rand(5, 7, generator=generator) > 0.4
    allowed[:, 0] = True  # every query attends to something
    return {
        "none": {},
        "bool": {"attn_mask": allowed},
        "bool-broadcast-heads": {"attn_mask": allowed.reshape(1, 1, 5, 7).expand(2, 1, 5, 7)},
        "float": {"attn_mask": torch.randn(2, 3, 5, 7, generator=generator)},
        "float-broadcast": {"attn_mask": torch.randn(1, 7, generator=generator)},
        "causal": {"is_causal": True},
        "scale": {"scale": 0.3},
        "bool-scale": {"attn_mask": allowed, "scale": 2.0},
    }


@pytest.mark.parametrize("case", list(sdpa_masks()))
def test_scaled_dot_product_attention(case: str) -> None:
    kwargs = sdpa_masks()[case]
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 5, 8, generator=generator)
    k, v = torch.randn(2, 3, 7, 8, generator=generator), torch.randn(2, 3, 7, 6, generator=generator)
    layer = QuantScaledDotProductAttention(**SDPA_NO_QUANT)
    assert_close(layer(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs))


def test_scaled_dot_product_attention_causal_square_and_unbatched() -> None:
    q, k, v = torch.randn(3, 6, 4), torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    layer = QuantScaledDotProductAttention(**SDPA_NO_QUANT)
    assert_close(layer(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def mha_twins(**kwargs: Any) -> tuple[QuantMultiheadAttention, nn.MultiheadAttention]:
    float_layer = randomize(nn.MultiheadAttention(8, 2, **kwargs), seed=1).eval()
    quant = QuantMultiheadAttention(8, 2, **kwargs, **MHA_NO_QUANT).eval()
    assert set(quant.state_dict()) == set(float_layer.state_dict())
    quant.load_state_dict(float_layer.state_dict())
    return quant, float_layer


def mha_inputs(batch_first: bool, kdim: int = 8, vdim: int = 8, batched: bool = True) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(2)
    target, source, batch = 5, 6, 3
    shapes = [(target, 8), (source, kdim), (source, vdim)]
    tensors = []
    for length, features in shapes:
        t = torch.randn(length, batch, features, generator=generator)
        if batch_first:
            t = t.transpose(0, 1)
        tensors.append(t if batched else t.select(1 if not batch_first else 0, 0))
    return tuple(tensors)


def mha_masks() -> dict[str, dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(4)
    target, source, batch, heads = 5, 6, 3, 2
    padding = torch.rand(batch, source, generator=generator) > 0.6
    padding[:, 0] = False  # never block every key
    blocked = torch.rand(target, source, generator=generator) > 0.6
    blocked[:, 0] = False
    blocked_3d = torch.rand(batch * heads, target, source, generator=generator) > 0.6
    blocked_3d[..., 0] = False
    return {
        "none": {},
        "key-padding-bool": {"key_padding_mask": padding},
        "key-padding-float": {"key_padding_mask": torch.randn(batch, source, generator=generator)},
        "attn-2d-bool": {"attn_mask": blocked},
        "attn-2d-float": {"attn_mask": torch.randn(target, source, generator=generator)},
        "attn-3d-bool": {"attn_mask": blocked_3d},
        "attn-3d-float": {"attn_mask": torch.randn(batch * heads, target, source, generator=generator)},
        "both-bool": {"attn_mask": blocked, "key_padding_mask": padding},
        "both-float": {
            "attn_mask": torch.randn(target, source, generator=generator),
            "key_padding_mask": torch.randn(batch, source, generator=generator),
        },
    }


def assert_mha_close(quant: nn.Module, float_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
    with torch.no_grad():
        output, weights = quant(*args, **kwargs)
        expected_output, expected_weights = float_layer(*args, **kwargs)
    assert_close(output, expected_output)
    assert_close(weights, expected_weights)


@pytest.mark.parametrize("mask", list(mha_masks()))
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_masks(batch_first: bool, mask: str) -> None:
    quant, float_layer = mha_twins(batch_first=batch_first)
    assert_mha_close(quant, float_layer, *mha_inputs(batch_first), **mha_masks()[mask])


@pytest.mark.parametrize("average_attn_weights", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_weights(batch_first: bool, need_weights: bool, average_attn_weights: bool) -> None:
    quant, float_layer = mha_twins(batch_first=batch_first)
    assert_mha_close(
        quant,
        float_layer,
        *mha_inputs(batch_first),
        need_weights=need_weights,
        average_attn_weights=average_attn_weights,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"key_padding_mask": torch.tensor([False, True, False, False, True, False])},
        {"attn_mask": torch.randn(2, 5, 6)},
        {"attn_mask": torch.rand(5, 6) > 0.7},
        {"average_attn_weights": False},
    ],
    ids=["plain", "key-padding", "attn-3d", "attn-2d-bool", "per-head-weights"],
)
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_unbatched(batch_first: bool, kwargs: dict[str, Any]) -> None:
    quant, float_layer = mha_twins(batch_first=batch_first)
    assert_mha_close(quant, float_layer, *mha_inputs(batch_first, batched=False), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"add_bias_kv": True},
        {"add_zero_attn": True},
        {"add_bias_kv": True, "add_zero_attn": True},
        {"kdim": 5, "vdim": 7},
        {"kdim": 5, "vdim": 7, "bias": False},
        {"bias": False},
        {"dropout": 0.5},
        {"kdim": 5, "vdim": 7, "add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
    ],
    ids=[
        "bias-kv",
        "zero-attn",
        "bias-kv-zero-attn",
        "kdim-vdim",
        "kdim-vdim-no-bias",
        "no-bias",
        "dropout-eval",
        "everything",
    ],
)
@pytest.mark.parametrize("mask", ["none", "both-bool", "attn-3d-float"])
def test_multihead_attention_options(kwargs: dict[str, Any], mask: str) -> None:
    quant, float_layer = mha_twins(**kwargs)
    inputs = mha_inputs(kwargs.get("batch_first", False), kwargs.get("kdim", 8), kwargs.get("vdim", 8))
    assert_mha_close(quant, float_layer, *inputs, **mha_masks()[mask])


def test_multihead_attention_causal_mask() -> None:
    quant, float_layer = mha_twins()
    x = mha_inputs(False)[0]
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    assert_mha_close(quant, float_layer, x, x, x, attn_mask=mask, is_causal=True)


def test_multihead_attention_training_without_dropout_matches() -> None:
    quant, float_layer = mha_twins()
    quant.train(), float_layer.train()
    q, k, v = mha_inputs(False)
    output, weights = quant(q, k, v)
    expected_output, expected_weights = float_layer(q, k, v)
    assert_close(output, expected_output)
    assert_close(weights, expected_weights)


# -- from_float -----------------------------------------------------------------------------------

FROM_FLOAT_CASES = {
    "linear": (QuantLinear, lambda: nn.Linear(6, 4), lambda: torch.randn(3, 6)),
    "linear-no-bias": (QuantLinear, lambda: nn.Linear(6, 4, bias=False), lambda: torch.randn(3, 6)),
    "linear-float64": (
        QuantLinear,
        lambda: nn.Linear(6, 4, dtype=torch.float64),
        lambda: torch.randn(3, 6, dtype=torch.float64),
    ),
    "conv1d": (
        QuantConv1d,
        lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, bias=False),
        lambda: torch.randn(2, 4, 11),
    ),
    "conv2d": (
        QuantConv2d,
        lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"),
        lambda: torch.randn(2, 4, 7, 7),
    ),
    "conv3d": (QuantConv3d, lambda: nn.Conv3d(4, 6, (1, 2, 3), stride=(1, 2, 1)), lambda: torch.randn(1, 4, 4, 5, 6)),
    "conv-transpose1d": (
        QuantConvTranspose1d,
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2),
        lambda: torch.randn(2, 4, 7),
    ),
    "conv-transpose2d": (
        QuantConvTranspose2d,
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2),
        lambda: torch.randn(2, 4, 5, 5),
    ),
    "layer-norm": (QuantLayerNorm, lambda: nn.LayerNorm(6, eps=1e-3), lambda: torch.randn(3, 6)),
    "layer-norm-no-bias": (QuantLayerNorm, lambda: nn.LayerNorm(6, bias=False), lambda: torch.randn(3, 6)),
    "layer-norm-no-affine": (
        QuantLayerNorm,
        lambda: nn.LayerNorm(6, elementwise_affine=False),
        lambda: torch.randn(3, 6),
    ),
}


@pytest.mark.parametrize("case", list(FROM_FLOAT_CASES))
def test_from_float_reproduces_and_copies(case: str) -> None:
    quant_class, make_float, make_input = FROM_FLOAT_CASES[case]
    float_layer = randomize(make_float())
    quant = quant_class.from_float(float_layer, **NO_QUANT)
    assert type(quant) is quant_class
    x = make_input()
    assert_same(quant, float_layer, x)
    for name, tensor in float_layer.state_dict().items():
        copied = quant.state_dict()[name]
        assert torch.equal(copied, tensor) and copied.dtype == tensor.dtype
        assert copied.data_ptr() != tensor.data_ptr()  # copied, not shared
    if float_layer.weight is not None:
        with torch.no_grad():
            float_layer.weight.add_(1.0)
        assert not torch.equal(quant.weight, float_layer.weight)


@pytest.mark.parametrize("case", ["linear", "conv2d", "conv-transpose2d", "layer-norm"])
def test_from_float_builds_quantizers_from_the_copied_weights(case: str) -> None:
    quant_class, make_float, make_input = FROM_FLOAT_CASES[case]
    float_layer = randomize(make_float())
    quant = quant_class.from_float(float_layer, weight_quant=Int8WeightPerTensorFloat)
    assert torch.allclose(quant.quant_weight().scale, float_layer.weight.abs().max() / 127)
    assert quant.quant_weight().is_valid
    quant(make_input())


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_from_float(padding_idx: int | None) -> None:
    float_layer = randomize(nn.Embedding(10, 4, padding_idx=padding_idx))
    quant = QuantEmbedding.from_float(float_layer, weight_quant=None)
    assert quant.padding_idx == float_layer.padding_idx
    indices = torch.tensor([[1, 2, 3], [9, 2, 0]])
    assert_same(quant, float_layer, indices)
    assert quant.weight.data_ptr() != float_layer.weight.data_ptr()
    quant = QuantEmbedding.from_float(float_layer)
    assert torch.allclose(quant.quant_weight().scale, float_layer.weight.abs().max() / 127)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"kdim": 3, "vdim": 5, "add_bias_kv": True, "batch_first": True}, {"bias": False, "add_zero_attn": True}],
    ids=["plain", "kdim-vdim-bias-kv", "no-bias-zero-attn"],
)
def test_multihead_attention_from_float(kwargs: dict[str, Any]) -> None:
    float_layer = randomize(nn.MultiheadAttention(8, 2, **kwargs), seed=5).eval()
    quant = QuantMultiheadAttention.from_float(float_layer, **MHA_NO_QUANT).eval()
    inputs = mha_inputs(kwargs.get("batch_first", False), kwargs.get("kdim", 8), kwargs.get("vdim", 8))
    assert_mha_close(quant, float_layer, *inputs, **mha_masks()["both-bool"])
    for name, tensor in float_layer.state_dict().items():
        assert torch.equal(quant.state_dict()[name], tensor)
        assert quant.state_dict()[name].data_ptr() != tensor.data_ptr()
    # With its default quantizers, the projections are quantized from the copied weights.
    quant = QuantMultiheadAttention.from_float(float_layer)
    assert torch.allclose(quant.out_proj.quant_weight().scale, float_layer.out_proj.weight.abs().max() / 127)
