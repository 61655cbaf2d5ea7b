"""QAT quantizers (``quantwire.quant.qat``) and gradient quantization (``quantwire.quant.gradient``).

LSQ: the step size's gradient is LSQ's (d/ds of ``s * clamp(round(x/s), -Qn, Qp)``: ``round(x/s) - x/s``
inside the range, ``-Qn`` or ``Qp`` outside, times the upstream gradient) scaled by
``g = 1 / sqrt(N * Qp)``, checked against a hand-written formula; the forward value does not
depend on the gradient scale. LSQ+: the learned offset (the lower range end) gets gradient 0 from
in-range elements and ``g`` times the upstream gradient from out-of-range ones. PACT: the clip
level gets the upstream gradient of the inputs above it, the input the gradient of the inputs
inside ``(0, alpha)``, and the forward is ordinary unsigned quantization bit for bit. Token-wise
LSQ: one scale per token position, collected per token. Learned weight scales start at the
MSE-optimal threshold of each channel, follow a loaded weight and lose to a loaded scale.
Gradient quantization: the gradient leaving the quantizer lies on the FP8 E5M2 grid of its
dynamic per-tensor scale, and the forward pass is unchanged.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import quantwire.config
from quantwire.core.quant import FloatQuant
from quantwire.core.scaling import NoGradScale
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.inject import ExtendedInjector
from quantwire.nn import QuantConv2d, QuantIdentity, QuantLinear
from quantwire.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from quantwire.quant.gradient import Fp8e4m3ActFp8e5m2Grad, Fp8e5m2GradPerTensorFloat
from quantwire.quant.qat import (
    Int4WeightPerChannelLsq,
    Int8ActLsq,
    Int8ActPerTokenLsq,
    Int8WeightPerChannelLsq,
    Uint4ActPact,
    Uint8ActLsqPlus,
)

E5M2_MAX = 57344.0


def lsq_step_gradient(x: Tensor, s: Tensor, g: Tensor, qn: float, qp: float, dims: tuple[int, ...]) -> Tensor:
    """LSQ's d/ds of ``s * clamp(round(x/s), -qn, qp)`` times ``g``, summed over ``dims`` (float64)."""
    x, s, g = x.double(), s.double(), g.double()
    v = x / s
    inside = (v >= -qn) & (v <= qp)
    local = torch.where(
        inside, torch.round(v) - v, torch.where(v < -qn, torch.full_like(v, -qn), torch.full_like(v, qp))
    )
    return (g * local).sum(dim=dims, keepdim=True) if dims else (g * local).sum()


def act_value(layer) -> torch.nn.Parameter:
    return layer.act_quant.tensor_quant.scaling_impl.stats.value


def collected_act(quant, seed: int = 0, **kwargs) -> QuantIdentity:
    """An activation layer in training mode whose statistics were collected on one batch."""
    layer = QuantIdentity(act_quant=quant, collect_stats_steps=1, **kwargs)
    layer.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer(torch.randn(8, 32, generator=generator))
    assert not layer.act_quant.tensor_quant.scaling_impl.stats.is_collecting()
    return layer


# ---------------------------------------------------------------------------------------------
# LSQ


@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(7,), (4, 9), (2, 3, 5), (16, 64)]),
    threshold=st.floats(0.2, 6.0),
)
def test_lsq_activation_step_gradient(seed, shape, threshold):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 2.0  # some elements beyond the threshold
    upstream = torch.randn(shape, generator=generator)
    results = {}
    for name, extra in (("lsq", {}), ("plain", {"grad_scale_impl": NoGradScale})):
        layer = collected_act(Int8ActLsq, **extra)
        value = act_value(layer)
        with torch.no_grad():
            value.fill_(threshold)
        out = layer(x)
        out.backward(upstream)
        results[name] = (out.detach(), value.grad.clone())

    n, qp = x.numel(), 127.0
    scale = torch.tensor(threshold, dtype=torch.float32) / 128.0  # IntScaling: 2^(b-1) for signed 8-bit
    expected = lsq_step_gradient(x, scale, upstream, 128.0, qp, ()) / 128.0 / math.sqrt(n * qp)
    lsq_out, lsq_grad = results["lsq"]
    plain_out, plain_grad = results["plain"]
    assert torch.equal(lsq_out, plain_out)  # the gradient scale never touches the value
    tolerance = 1e-5 * float(upstream.abs().sum() * (x.abs() / scale + 128).max()) / 128.0 / math.sqrt(n * qp)
    assert float(lsq_grad) == pytest.approx(float(expected), abs=tolerance)
    assert float(lsq_grad) == pytest.approx(float(plain_grad) / math.sqrt(n * qp), rel=1e-5, abs=1e-12)


@given(
    seed=st.integers(0, 2**31 - 1),
    channels=st.integers(1, 6),
    fan_in=st.integers(1, 40),
    ratios=st.lists(st.floats(0.3, 1.2), min_size=6, max_size=6),
)
def test_lsq_per_channel_weight_step_gradient(seed, channels, fan_in, ratios):
    torch.manual_seed(seed)
    layers = {
        "lsq": QuantLinear(fan_in, channels, weight_quant=Int4WeightPerChannelLsq),
        "plain": QuantLinear(
            fan_in, channels, weight_quant=Int4WeightPerChannelLsq, weight_grad_scale_impl=NoGradScale
        ),
    }
    weight = torch.randn(channels, fan_in)
    upstream = torch.randn(channels, fan_in)
    thresholds = weight.abs().amax(dim=1, keepdim=True) * torch.tensor(ratios[:channels]).reshape(-1, 1)
    results = {}
    for name, layer in layers.items():
        value = layer.weight_quant.tensor_quant.scaling_impl.value
        assert value.shape == (channels, 1)
        with torch.no_grad():
            layer.weight.copy_(weight)
            value.copy_(thresholds)
        out = layer.weight_quant.tensor_quant(layer.weight)[0]
        out.backward(upstream)
        results[name] = (out.detach(), value.grad.clone(), layer.weight.grad.clone())

    qp = 7.0  # signed narrow 4-bit: [-7, 7], IntScaling divisor 7
    n = fan_in
    scale = thresholds / 7.0
    expected = lsq_step_gradient(weight, scale, upstream, 7.0, qp, (1,)) / 7.0 / math.sqrt(n * qp)
    lsq_out, lsq_grad, lsq_weight_grad = results["lsq"]
    plain_out, plain_grad, _ = results["plain"]
    assert torch.equal(lsq_out, plain_out)
    size = (upstream.abs() * (weight.abs() / scale + 7)).sum(dim=1, keepdim=True) / 7.0 / math.sqrt(n * qp)
    assert torch.all((lsq_grad.double() - expected).abs() <= 1e-5 * size.double() + 1e-12)
    torch.testing.assert_close(lsq_grad, plain_grad / math.sqrt(n * qp), rtol=1e-5, atol=1e-12)
    # LSQ clips the weight's gradient: 0 outside the range.
    inside = (weight / scale).abs() <= 7.0
    torch.testing.assert_close(lsq_weight_grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_lsq_per_channel_conv_counts_the_whole_kernel():
    """N is every element a channel's scale covers: in_channels x kernel area for a conv."""
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, weight_quant=Int4WeightPerChannelLsq)
    plain = QuantConv2d(3, 4, 3, weight_quant=Int4WeightPerChannelLsq, weight_grad_scale_impl=NoGradScale)
    plain.load_state_dict(conv.state_dict())
    upstream = torch.randn_like(conv.weight)
    grads = []
    for layer in (conv, plain):
        layer.weight_quant.tensor_quant(layer.weight)[0].backward(upstream)
        grads.append(layer.weight_quant.tensor_quant.scaling_impl.value.grad)
    torch.testing.assert_close(grads[0], grads[1] / math.sqrt(3 * 9 * 7.0), rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# LSQ+


def lsq_plus_layer() -> QuantIdentity:
    layer = QuantIdentity(act_quant=Uint8ActLsqPlus, collect_stats_steps=1)
    layer.train()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer(torch.randn(64, 64, generator=generator) + 0.5)  # a negative lower end
    return layer


@pytest.mark.parametrize("outside", [False, True])
def test_lsq_plus_offset_gradient(outside):
    """Expected: ``d L / d offset = (1 / sqrt(N * 255)) * sum(upstream over elements outside the range)``,
    exactly 0 from in-range elements (there the offset cancels: ``(round(x/s + zp) - zp) * s``)."""
    layer = lsq_plus_layer()
    tensor_quant = layer.act_quant.tensor_quant
    offset = tensor_quant.zero_point_impl.stats.value
    assert float(offset.detach()) < 0
    with torch.no_grad():
        _, scale, zero_point, _ = tensor_quant(torch.zeros(1))
    low, high = float(-zero_point * scale), float((255 - zero_point) * scale)
    generator = torch.Generator().manual_seed(6)
    width = high - low
    if outside:
        x = torch.rand(32, 48, generator=generator) * 2.0 * width + (low - 0.5 * width)
    else:
        x = torch.rand(32, 48, generator=generator) * 0.98 * width + (low + 0.01 * width)
    upstream = torch.randn(32, 48, generator=generator)
    layer(x).backward(upstream)

    factor = 1.0 / math.sqrt(x.numel() * 255.0)
    y = x / scale + zero_point  # as the quantizer computes it
    out_of_range = (y < 0) | (y > 255)
    assert bool(out_of_range.any()) == outside
    expected = factor * float(upstream[out_of_range].double().sum())
    assert float(offset.grad) == pytest.approx(expected, abs=1e-6 * factor * float(upstream.abs().sum()))
    if outside:
        assert abs(expected) > 1e-3 * factor * float(upstream.abs().sum())


# ---------------------------------------------------------------------------------------------
# PACT


@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(0.1, 8.0), spread=st.floats(0.1, 10.0))
def test_pact_forward_is_ordinary_unsigned_quantization(seed, alpha, spread):
    pact = collected_act(Uint4ActPact)
    plain = collected_act(Uint8ActPerTensorFloat, bit_width=4)
    with torch.no_grad():
        act_value(pact).fill_(alpha)
        act_value(plain).fill_(alpha)
    x = torch.randn(16, 33, generator=torch.Generator().manual_seed(seed)) * spread
    with torch.no_grad():
        assert torch.equal(pact(x), plain(x))


def test_pact_gradients():
    layer = collected_act(Uint4ActPact)
    alpha = act_value(layer)
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(40, 50, generator=generator) * float(alpha.detach())).requires_grad_()
    upstream = torch.randn(40, 50, generator=generator)
    layer(x).backward(upstream)
    above = x.detach() >= alpha.detach()
    inside = (x.detach() > 0) & ~above
    assert bool(above.any()) and bool(inside.any()) and bool((x.detach() < 0).any())
    assert float(alpha.grad) == pytest.approx(float(upstream[above].double().sum()), rel=1e-5, abs=1e-5)
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


# ---------------------------------------------------------------------------------------------
# Token-wise LSQ


def test_per_token_lsq_scale_shape_and_gradient():
    tokens, features = 5, 12
    layer = QuantIdentity(
        act_quant=Int8ActPerTokenLsq, num_tokens=tokens, collect_stats_steps=1, return_quant_tensor=True
    )
    layer.train()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        collecting = layer(torch.randn(3, tokens, features, generator=generator))
    assert collecting.scale.shape == (1, tokens, 1)
    value = act_value(layer)
    assert value.shape == (tokens, 1)  # broadcasts against (batch, tokens, features)

    x = torch.randn(3, tokens, features, generator=generator) * 2.0
    upstream = torch.randn(3, tokens, features, generator=generator)
    quant = layer(x)
    assert quant.scale.shape == (tokens, 1)
    quant.value.backward(upstream)
    n, qp = 3 * features, 127.0  # the elements one token's scale covers
    scale = value.detach().reshape(1, tokens, 1) / 128.0
    expected = lsq_step_gradient(x, scale, upstream, 128.0, qp, (0, 2)) / 128.0 / math.sqrt(n * qp)
    torch.testing.assert_close(value.grad.double(), expected.reshape(tokens, 1), rtol=1e-4, atol=1e-6)


def test_per_token_statistics_are_independent():
    tokens = 6
    layer = QuantIdentity(
        act_quant=Int8ActPerTokenLsq, num_tokens=tokens, collect_stats_steps=3, return_quant_tensor=True
    )
    other = QuantIdentity(
        act_quant=Int8ActPerTokenLsq, num_tokens=tokens, collect_stats_steps=3, return_quant_tensor=True
    )
    layer.train()
    other.train()
    generator = torch.Generator().manual_seed(4)
    changed = 2
    for _ in range(3):
        x = torch.randn(4, tokens, 16, generator=generator)
        y = x.clone()
        y[:, changed] = y[:, changed] * 5.0 + 1.0
        with torch.no_grad():
            a, b = layer(x), other(y)
        keep = [t for t in range(tokens) if t != changed]
        assert torch.equal(a.scale[:, keep], b.scale[:, keep])
        assert not torch.equal(a.scale[:, changed], b.scale[:, changed])
        torch.testing.assert_close(a.scale.reshape(-1), x.abs().amax(dim=(0, 2)) / 128.0)  # small tokens: abs-max
    assert torch.equal(act_value(layer).flatten()[keep], act_value(other).flatten()[keep])
    assert not torch.equal(act_value(layer).flatten()[changed], act_value(other).flatten()[changed])


def test_per_token_lsq_refuses_another_token_count_naming_the_quantizer():
    layer = QuantIdentity(act_quant=Int8ActPerTokenLsq, num_tokens=5)
    layer.train()
    with pytest.raises(QuantInputError, match="Int8ActPerTokenLsq"):
        layer(torch.randn(2, 4, 8))


# ---------------------------------------------------------------------------------------------
# Learned weight scales initialised from weight statistics


def quant_error(w: Tensor, threshold: Tensor) -> Tensor:
    """Per-row mean squared error of signed narrow 4-bit quantization with ``threshold`` (float64)."""
    scale = threshold.double() / 7.0
    q = torch.clamp(torch.round(w.double() / scale), -7, 7) * scale
    return ((q - w.double()) ** 2).mean(dim=1, keepdim=True)


def test_weight_lsq_starts_at_the_mse_optimal_threshold_per_channel():
    torch.manual_seed(0)
    layer = QuantLinear(64, 8, weight_quant=Int4WeightPerChannelLsq)
    weight = layer.weight.detach()
    init = layer.weight_quant.tensor_quant.scaling_impl.value.detach()
    assert init.shape == (8, 1)

    abs_max = weight.abs().amax(dim=1, keepdim=True)
    candidates = [abs_max * (1.0 - 0.8 * i / 99) for i in range(100)]  # 100 thresholds in [0.2, 1] x abs-max
    errors = torch.cat([quant_error(weight, t) for t in candidates], dim=1)
    best = errors.min(dim=1, keepdim=True).values
    assert torch.all(quant_error(weight, init) <= best * (1 + 1e-6) + 1e-15)
    # The threshold is one of the candidates.
    ratios = init / abs_max
    grid = 1.0 - 0.8 * torch.arange(100) / 99
    assert torch.all((ratios - grid).abs().min(dim=1).values < 1e-5)
    assert bool((ratios < 0.99).all())  # 4-bit MSE clips uniform weights below their abs-max


def test_weight_lsq_scale_follows_a_loaded_weight_and_a_loaded_scale_wins(monkeypatch):
    torch.manual_seed(0)
    source = QuantLinear(32, 4, weight_quant=Int4WeightPerChannelLsq)
    target = QuantLinear(32, 4, weight_quant=Int4WeightPerChannelLsq)
    fresh = QuantLinear(32, 4, weight_quant=Int4WeightPerChannelLsq)
    with torch.no_grad():
        source.weight.mul_(3.0)
        fresh.weight.copy_(source.weight)
    fresh.init_quantizers()
    expected_init = fresh.weight_quant.tensor_quant.scaling_impl.value.detach()

    # A float checkpoint (no scale): the scale is rebuilt from the loaded weight.
    monkeypatch.setattr(quantwire.config, "IGNORE_MISSING_KEYS", True)
    target.load_state_dict({"weight": source.weight.detach(), "bias": source.bias.detach()})
    assert torch.equal(target.weight_quant.tensor_quant.scaling_impl.value.detach(), expected_init)

    # A checkpoint with a learned scale: the saved scale wins (through a weights_only file).
    with torch.no_grad():
        source.weight_quant.tensor_quant.scaling_impl.value.mul_(0.77)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(
        target.weight_quant.tensor_quant.scaling_impl.value.detach(),
        source.weight_quant.tensor_quant.scaling_impl.value.detach(),
    )
    assert torch.equal(target.quant_weight().value, source.quant_weight().value)


# ---------------------------------------------------------------------------------------------
# Gradient quantization


class Int8ActE5M2Grad(Int8ActPerTensorFloat):
    """A custom quantizer: int8 activations, FP8 E5M2 gradients."""

    grad_quant = Fp8e5m2GradPerTensorFloat


def on_e5m2_grid(value: Tensor, scale: Tensor) -> bool:
    """Re-quantizing to E5M2 with ``scale`` is the identity (``value = fl(q * scale)``, ``q`` an E5M2 number)."""
    return torch.equal((value / scale).to(torch.float8_e5m2).float() * scale, value)


def grad_quant_run(quant, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(output, x.grad, gradient leaving the quantizer's core module, upstream gradient, x), for an
    activation quantizer whose learned threshold is ``threshold``."""
    layer = QuantIdentity(act_quant=quant, collect_stats_steps=1)
    layer.train()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer(torch.randn(64, 64, generator=generator))
        act_value(layer).fill_(threshold)
    seen = []

    def record(_module, _args, outputs):
        outputs[0].register_hook(seen.append)

    layer.act_quant.tensor_quant.register_forward_hook(record)
    x = (torch.randn(64, 64, generator=generator) * 0.25 * threshold).requires_grad_()
    upstream = torch.randn(64, 64, generator=generator) * torch.exp(torch.randn(64, 64, generator=generator) * 3)
    out = layer(x)
    out.backward(upstream)
    return out.detach(), x.grad, seen[0], upstream, x.detach()


GRAD_QUANT_CASES = pytest.mark.parametrize(
    "quant", [Fp8e4m3ActFp8e5m2Grad, Int8ActE5M2Grad], ids=["fp8_act", "int8_act"]
)
ACT_THRESHOLDS = pytest.mark.parametrize("threshold", [1.0, 2.7, 0.77, 1.3, 3.9])


@GRAD_QUANT_CASES
@ACT_THRESHOLDS
def test_gradient_leaving_the_quantizer_is_quantized_to_e5m2_with_a_dynamic_scale(quant, threshold):
    """The gradient that flows on to the previous layer is the quantizer's own (straight-through)
    input gradient, fake-quantized to E5M2 with a per-tensor scale from its abs-max."""
    out, x_grad, _, _, _ = grad_quant_run(quant, threshold)
    plain_out, plain_grad, *_ = grad_quant_run(quant.let(grad_quant=None), threshold)
    scale = plain_grad.abs().max() / E5M2_MAX
    assert torch.equal(x_grad, (plain_grad / scale).to(torch.float8_e5m2).float() * scale)
    assert on_e5m2_grid(x_grad, scale)
    assert not torch.equal(x_grad, plain_grad)
    # The forward pass is the one of the same quantizer without gradient quantization.
    assert torch.equal(out, plain_out)


@GRAD_QUANT_CASES
@ACT_THRESHOLDS
def test_gradient_inside_the_quantizer_is_not_quantized(quant, threshold):
    """Only what leaves the quantizer is quantized: its core module receives the upstream
    gradient unchanged."""
    _, _, core_grad, upstream, _ = grad_quant_run(quant, threshold)
    assert torch.equal(core_grad, upstream)


class NotAQuantizer(Int8ActPerTensorFloat):
    grad_quant = 3


class NamedByString(Int8ActPerTensorFloat):
    grad_quant = "fp8_e5m2"


class BrokenGradQuant(ExtendedInjector):
    tensor_quant = FloatQuant  # no format declared: can not be built


class WithBrokenGradQuant(Int8ActPerTensorFloat):
    grad_quant = BrokenGradQuant


@pytest.mark.parametrize("quant", [NotAQuantizer, NamedByString, WithBrokenGradQuant])
def test_bad_grad_quant_raises(quant):
    with pytest.raises(QuantConfigError, match="grad_quant"):
        QuantIdentity(act_quant=quant)


class Int8WeightE5M2Grad(Int8WeightPerChannelLsq):
    """LSQ weights whose gradient is quantized to E5M2 on its way to the float weight."""

    grad_quant = Fp8e5m2GradPerTensorFloat


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_gradient_is_quantized_to_e5m2(seed):
    torch.manual_seed(seed)
    layer = QuantLinear(16, 8, weight_quant=Int8WeightE5M2Grad)
    plain = QuantLinear(16, 8, weight_quant=Int8WeightPerChannelLsq)
    plain.load_state_dict(layer.state_dict())
    x, upstream = torch.randn(32, 16), torch.randn(32, 8) * 1e-3
    out, plain_out = layer(x), plain(x)
    assert torch.equal(out, plain_out)  # the forward pass is untouched
    out.backward(upstream)
    plain_out.backward(upstream)
    grad, reference = layer.weight.grad, plain.weight.grad
    scale = reference.abs().max() / E5M2_MAX
    assert torch.equal(grad, (reference / scale).to(torch.float8_e5m2).float() * scale)
    assert not torch.equal(grad, reference)
