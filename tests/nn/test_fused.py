"""QuantConvBn1d/2d: a convolution with its BatchNorm folded into the quantized weight (QAT).

Tolerances: eval outputs are compared with ``torch.equal`` against a plain quant convolution
holding the hand-folded weight and bias (same float operations, same quantizer, so the same
bits). The float-equivalence property (quantization disabled) runs in float64 and allows
``1e-9`` relative and absolute: folding changes the order of float operations (``conv(x, w *
s) / s`` instead of ``conv(x, w)``, ``conv(x, w * s) + b'`` instead of the BatchNorm formula),
which differs by a few ulps, amplified at most by ``1 / sqrt(eps)`` when a batch variance is
near zero: ~1e-13 in float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor, nn

from quantwire.errors import QuantConfigError
from quantwire.nn import QuantConv1d, QuantConv2d
from quantwire.nn.fused import QuantConvBn1d, QuantConvBn2d
from quantwire.quant import (
    Int4WeightPerChannelFloat,
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Int32Bias,
)
from quantwire.quant.qat import Int8WeightPerChannelLsq, Int8WeightPerTensorLsq
from quantwire.quant_tensor import IntQuantTensor

FLOAT64 = {"rtol": 1e-9, "atol": 1e-9}

# (fused class, float conv class, float BatchNorm class, plain quant conv class, spatial dims)
KINDS = {
    "2d": (QuantConvBn2d, nn.Conv2d, nn.BatchNorm2d, QuantConv2d, 2),
    "1d": (QuantConvBn1d, nn.Conv1d, nn.BatchNorm1d, QuantConv1d, 1),
}


def randomize_bn(bn: nn.Module, generator: torch.Generator | None = None) -> None:
    """Non-trivial running statistics and affine parameters (gamma bounded away from 0)."""
    c = bn.num_features
    dtype = bn.running_var.dtype
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=generator, dtype=dtype))
        bn.running_var.copy_(torch.rand(c, generator=generator, dtype=dtype) * 2 + 0.1)
        if bn.affine:
            sign = torch.randint(0, 2, (c,), generator=generator).to(dtype) * 2 - 1
            bn.weight.copy_(sign * (torch.rand(c, generator=generator, dtype=dtype) * 2 + 0.2))
            bn.bias.copy_(torch.randn(c, generator=generator, dtype=dtype))


def float_pair(kind: str = "2d", bias: bool = True, seed: int = 0, **conv_kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    _, conv_cls, bn_cls, _, _ = KINDS[kind]
    kwargs = {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": bias, **conv_kwargs}
    conv = conv_cls(**kwargs)
    bn = bn_cls(kwargs["out_channels"])
    randomize_bn(bn)
    return conv, bn


def hand_folded(conv: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``w * gamma / sqrt(var + eps)`` per output channel and the matching bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return weight.detach(), (bn.bias + (bias - bn.running_mean) * scale).detach()


def reference_conv(conv: nn.Module, bn: nn.Module, kind: str = "2d", **quant_kwargs) -> nn.Module:
    """A plain quant convolution holding the hand-folded weight and bias."""
    plain_cls = KINDS[kind][3]
    kwargs = {**plain_cls.float_constructor_kwargs(conv), "bias": True}
    reference = plain_cls(**kwargs, **quant_kwargs)
    weight, bias = hand_folded(conv, bn)
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    reference.init_quantizers()
    return reference.eval()


def spatial_input(kind: str, batch: int = 2, channels: int = 3, size: int = 6, seed: int = 1) -> Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, channels, *[size] * KINDS[kind][4])


# -- (a) eval: conv with the quantized folded weight plus the folded bias ------------------------------


WEIGHT_QUANTS = [Int8WeightPerTensorFloat, Int8WeightPerChannelFloat, Int4WeightPerChannelFloat]


@pytest.mark.parametrize("kind", ["2d", "1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_quant", WEIGHT_QUANTS)
def test_eval_is_conv_with_quantized_folded_weight(kind: str, bias: bool, weight_quant: type) -> None:
    conv, bn = float_pair(kind, bias=bias)
    fused = KINDS[kind][0].from_float(conv, bn, weight_quant=weight_quant).eval()
    reference = reference_conv(conv, bn, kind, weight_quant=weight_quant)
    x = spatial_input(kind)
    with torch.no_grad():
        assert torch.equal(fused(x), reference(x))
        assert torch.equal(fused.quant_weight().value, reference.quant_weight().value)
    assert torch.equal(fused(x), reference(x))  # with autograd (no cache) too


@pytest.mark.parametrize("bias", [True, False])
def test_eval_quant_tensor_path_returns_the_accumulator(bias: bool) -> None:
    conv, bn = float_pair(bias=bias)
    quant = {"weight_quant": Int8WeightPerChannelFloat, "input_quant": Int8ActPerTensorFloat, "bias_quant": Int32Bias}
    fused = QuantConvBn2d.from_float(conv, bn, **quant, return_quant_tensor=True).eval()
    reference = reference_conv(conv, bn, **quant, return_quant_tensor=True)
    x = spatial_input("2d")
    with torch.no_grad():
        out, expected = fused(x), reference(x)
    assert isinstance(out, IntQuantTensor) and isinstance(expected, IntQuantTensor)
    assert torch.equal(out.value, expected.value)
    assert torch.equal(out.scale, expected.scale)
    assert torch.equal(out.bit_width, expected.bit_width)
    assert out.is_valid


def test_eval_cache_follows_in_place_changes() -> None:
    """In eval without autograd the folded weight is cached; editing the BatchNorm or the
    weight in place must still show in the next output."""
    conv, bn = float_pair()
    fused = QuantConvBn2d.from_float(conv, bn).eval()
    x = spatial_input("2d")
    with torch.no_grad():
        before = fused(x)
        fused.bn.running_var.mul_(3.0)
        fused.weight.mul_(-0.5)
        after = fused(x)
        bn.running_var.mul_(3.0)
        conv.weight.mul_(-0.5)
        assert not torch.equal(before, after)
        assert torch.equal(after, reference_conv(conv, bn, weight_quant=Int8WeightPerTensorFloat)(x))


# -- (b) with quantization disabled: the float Conv -> BatchNorm ------------------------------------------


@st.composite
def conv_bn_cases(draw: st.DrawFn) -> dict:
    kernel = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 1))
    stride = draw(st.integers(1, 2))
    size = draw(st.integers(max(kernel - 2 * padding, 1), kernel + 4))
    batch = draw(st.integers(1, 3))
    out_size = (size + 2 * padding - kernel) // stride + 1
    assume(batch * out_size**2 > 1)  # BatchNorm needs two values per channel in training
    return {
        "conv": {
            "in_channels": draw(st.integers(1, 4)),
            "out_channels": draw(st.integers(1, 4)),
            "kernel_size": kernel,
            "padding": padding,
            "stride": stride,
            "bias": draw(st.booleans()),
        },
        "bn": {"affine": draw(st.booleans()), "momentum": draw(st.sampled_from([0.1, 0.5, None]))},
        "batch": batch,
        "size": size,
        "input_scale": draw(st.sampled_from([1e-2, 1.0, 30.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


def assert_same_state(fused: QuantConvBn2d, bn: nn.BatchNorm2d) -> None:
    torch.testing.assert_close(fused.bn.running_mean, bn.running_mean, **FLOAT64)
    torch.testing.assert_close(fused.bn.running_var, bn.running_var, **FLOAT64)
    assert int(fused.bn.num_batches_tracked) == int(bn.num_batches_tracked)


def grad_of(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.grad


def assert_same_grads(pairs: list[tuple[Tensor | None, Tensor | None]]) -> None:
    for got, expected in pairs:
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, **FLOAT64)


@given(conv_bn_cases())
def test_without_quantization_train_and_eval_match_float_conv_bn(case: dict) -> None:
    generator = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    conv = nn.Conv2d(**case["conv"], dtype=torch.float64)
    bn = nn.BatchNorm2d(conv.out_channels, **case["bn"], dtype=torch.float64)
    randomize_bn(bn, generator)
    fused = QuantConvBn2d.from_float(conv, bn)
    fused.weight_quant.disable_quant = True
    float_model = nn.Sequential(conv, bn)
    shape = (case["batch"], conv.in_channels, case["size"], case["size"])
    for _ in range(2):  # training: batch statistics, running statistics updated alike
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * case["input_scale"]
        x_fused, x_float = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = fused(x_fused), float_model(x_float)
        torch.testing.assert_close(out, expected, **FLOAT64)
        upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        fused.zero_grad()
        float_model.zero_grad()
        out.backward(upstream)
        expected.backward(upstream)
        assert_same_grads(
            [
                (x_fused.grad, x_float.grad),
                (fused.weight.grad, conv.weight.grad),
                (grad_of(fused.bias), grad_of(conv.bias)),
                (grad_of(fused.bn.weight), grad_of(bn.weight)),
                (grad_of(fused.bn.bias), grad_of(bn.bias)),
            ]
        )
        assert_same_state(fused, bn)
    fused.eval()
    float_model.eval()
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * case["input_scale"]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), float_model(x), **FLOAT64)


# -- (c) freezing the BatchNorm statistics ------------------------------------------------------------


def test_freeze_bn_step_stops_updating_and_uses_running_stats() -> None:
    conv, bn = float_pair(bias=True)
    fused = QuantConvBn2d.from_float(conv, bn, freeze_bn_step=3)
    fused.weight_quant.disable_quant = True
    snapshots = []
    for step in range(5):
        fused(spatial_input("2d", seed=10 + step))
        snapshots.append((fused.bn.running_mean.clone(), fused.bn.running_var.clone()))
    assert not torch.equal(snapshots[0][0], snapshots[2][0])  # updated while training with batch stats
    for mean, var in snapshots[3:]:  # frozen after 3 training forwards
        assert torch.equal(mean, snapshots[2][0]) and torch.equal(var, snapshots[2][1])
    assert int(fused.bn.num_batches_tracked) == 3 and int(fused.bn_steps) == 3 and fused.bn_stats_frozen
    # Training output now normalises with the running statistics: the float pair in eval mode.
    bn.load_state_dict(fused.bn.state_dict())  # the running statistics of the first 3 batches
    x = spatial_input("2d", seed=99)
    assert fused.training
    torch.testing.assert_close(fused(x), nn.Sequential(conv, bn).eval()(x), rtol=1e-5, atol=1e-5)
    assert int(fused.bn.num_batches_tracked) == 3


def test_frozen_training_output_is_the_eval_output_with_quantization() -> None:
    conv, bn = float_pair()
    fused = QuantConvBn2d.from_float(conv, bn, weight_quant=Int8WeightPerChannelFloat)
    x = spatial_input("2d")
    fused.freeze_bn_stats()
    trained = fused(x)
    assert torch.equal(trained, fused.eval()(x))
    assert torch.equal(trained, reference_conv(conv, bn, weight_quant=Int8WeightPerChannelFloat)(x))


def test_freeze_bn_stats_by_hand_and_back() -> None:
    conv, bn = float_pair()
    fused = QuantConvBn2d.from_float(conv, bn)
    fused.freeze_bn_stats()
    fused(spatial_input("2d"))
    assert int(fused.bn.num_batches_tracked) == 0 and bool(fused.bn_frozen)
    fused.freeze_bn_stats(False)
    fused(spatial_input("2d"))
    assert int(fused.bn.num_batches_tracked) == 1 and not fused.bn_stats_frozen


# -- (e) state dict ---------------------------------------------------------------------------------


def test_state_dict_round_trip_is_bit_identical() -> None:
    conv, bn = float_pair()
    quant = {"weight_quant": Int8WeightPerTensorLsq, "input_quant": Int8ActPerTensorFloat}
    fused = QuantConvBn2d.from_float(conv, bn, freeze_bn_step=4, **quant)
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.01)
    for step in range(6):
        loss = fused(spatial_input("2d", seed=step)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = fused.state_dict()
    assert {"weight", "bias", "bn.running_var", "bn_steps", "bn_frozen"} <= set(state)
    assert any(key.startswith("weight_quant.tensor_quant.") for key in state)  # the learned scale
    restored = QuantConvBn2d.from_float(*float_pair(seed=5), freeze_bn_step=4, **quant)
    restored.load_state_dict(state)
    assert restored.bn_stats_frozen and restored._steps == 4
    x = spatial_input("2d", seed=50)
    fused.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), restored(x))


# -- the weight quantizer is built from the folded weight ----------------------------------------------


@pytest.mark.parametrize("weight_quant", [Int8WeightPerTensorLsq, Int8WeightPerChannelLsq])
def test_learned_scale_starts_from_the_folded_weight(weight_quant: type) -> None:
    conv, bn = float_pair()
    fused = QuantConvBn2d.from_float(conv, bn, weight_quant=weight_quant).eval()
    reference = reference_conv(conv, bn, weight_quant=weight_quant)
    with torch.no_grad():
        torch.testing.assert_close(fused.quant_weight().scale, reference.quant_weight().scale, rtol=0, atol=0)


def test_fold_into_conv_keeps_quantizer_state_and_outputs() -> None:
    conv, bn = float_pair()
    fused = QuantConvBn2d.from_float(conv, bn, weight_quant=Int8WeightPerChannelLsq, input_quant=Int8ActPerTensorFloat)
    for step in range(3):
        fused(spatial_input("2d", seed=step)).sum().backward()
    fused.eval()
    plain = fused.fold_into_conv()
    assert type(plain) is QuantConv2d and not plain.training
    assert torch.equal(plain.bias, fused.folded_bias)
    x = spatial_input("2d", seed=7)
    with torch.no_grad():
        assert torch.equal(plain(x), fused(x))


# -- errors -----------------------------------------------------------------------------------------


def test_errors_name_the_layer() -> None:
    conv, bn = float_pair()
    other = QuantConv2d(3, 4, 3)
    with pytest.raises(QuantConfigError, match="QuantConvBn2d: weight_quant can not be another layer's proxy"):
        QuantConvBn2d.from_float(conv, bn, weight_quant=other.weight_quant)
    with pytest.raises(QuantConfigError, match="QuantConvBn2d: the BatchNorm has 5 features"):
        QuantConvBn2d.from_float(conv, nn.BatchNorm2d(5))
    with pytest.raises(QuantConfigError, match="without running statistics"):
        QuantConvBn2d.from_float(conv, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(QuantConfigError, match="freeze_bn_step"):
        QuantConvBn2d(3, 4, 3, freeze_bn_step=-1)
    with pytest.raises(QuantConfigError, match="QuantConvBn2d: keyword argument 'weight_bitwidth'"):
        QuantConvBn2d(3, 4, 3, weight_bitwidth=4)
