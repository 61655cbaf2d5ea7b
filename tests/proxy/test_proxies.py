"""Proxies: building, sharing, rebuilding on load, disabling, querying and caching quantizers.

Contract points 4-7: each layer builds its own ``tensor_quant`` from the quantizer declaration
with itself as ``module``; a shared proxy is one instance rebuilt with a tuple of layers;
loading a state dict rebuilds from the loaded weights before the quantizer's own state is
loaded; float checkpoints need ``IGNORE_MISSING_KEYS``. In eval without autograd a weight is
quantized once and reused exactly as long as nothing it depends on changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import quantwire.config as config
from quantwire.core.quant import BinaryQuant
from quantwire.core.scaling import ParameterScaling
from quantwire.errors import QuantConfigError
from quantwire.inject import DependencyError, ExtendedInjector, value
from quantwire.nn import QuantConv2d, QuantEmbedding, QuantIdentity, QuantLinear, QuantMultiheadAttention, QuantReLU
from quantwire.proxy import ActQuantProxyFromInjector, QuantProxyFromInjector, WeightQuantProxyFromInjector
from quantwire.quant import (
    Fp8e4m3WeightPerTensorFloat,
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int32Bias,
    ShiftedUint8WeightPerTensorFloat,
    SignedBinaryWeightPerTensorConst,
    Uint8ActPerTensorFloat,
)
from quantwire.quant_tensor import IntQuantTensor

# -- quantizers of the tutorial ('Anatomy of a Quantizer') ---------------------------------------


class BinaryWeightQuantizer(ExtendedInjector):
    proxy_class = WeightQuantProxyFromInjector
    tensor_quant = BinaryQuant
    scaling_impl = ParameterScaling
    scaling_init = 0.1
    signed = True


class ParamFromMaxWeightQuantizer(BinaryWeightQuantizer):
    @value
    def scaling_init(module):
        return module.weight.abs().max()


class PerChannelParamFromMaxWeightQuantizer(BinaryWeightQuantizer):
    """A learned per-output-channel scale initialised from the layer's weight."""

    @value
    def scaling_init(module):
        return module.weight.abs().flatten(1).amax(dim=1).reshape(-1, 1, 1, 1)


class SharedParamFromMeanWeightQuantizer(BinaryWeightQuantizer):
    @value
    def scaling_init(module):
        if isinstance(module, tuple):
            return torch.cat([layer.weight.flatten() for layer in module]).abs().mean()
        return module.weight.abs().mean()


SEEN_MODULES: list[Any] = []


class RecordingWeightQuantizer(Int8WeightPerChannelFloat):
    """Records the ``module`` it is built for (per channel, it asks which dim that is)."""

    @value
    def channel_dim(module):
        SEEN_MODULES.append(module)
        return 0


def conv(**kwargs: Any) -> QuantConv2d:
    return QuantConv2d(3, 4, 3, **kwargs)


# -- one quantizer per layer, or one shared ------------------------------------------------------


def test_each_layer_builds_its_own_tensor_quant() -> None:
    first, second = conv(weight_quant=BinaryWeightQuantizer), conv(weight_quant=BinaryWeightQuantizer)
    assert first.weight_quant is not second.weight_quant
    assert first.weight_quant.tensor_quant is not second.weight_quant.tensor_quant
    first_scale = first.weight_quant.tensor_quant.scaling_impl.value
    assert first_scale is not second.weight_quant.tensor_quant.scaling_impl.value
    with torch.no_grad():
        first_scale.mul_(3)
    assert second.weight_quant.scale().item() == pytest.approx(0.1)
    assert first.weight_quant.tracked_module_list == [first]
    assert first.weight_quant.injected_module() is first


def test_the_layer_is_injected_as_module() -> None:
    SEEN_MODULES.clear()
    layer = conv(weight_quant=RecordingWeightQuantizer)
    assert SEEN_MODULES == [layer]


def test_sharing_a_proxy_shares_one_quantizer_rebuilt_for_both_layers() -> None:
    SEEN_MODULES.clear()
    first = conv(weight_quant=RecordingWeightQuantizer)
    second = conv(weight_quant=first.weight_quant)
    assert second.weight_quant is first.weight_quant
    proxy = first.weight_quant
    assert proxy.tracked_module_list == [first, second]
    assert proxy.injected_module() == (first, second)
    assert SEEN_MODULES[0] is first and SEEN_MODULES[-1] == (first, second)
    # Both layers run through the very same core module.
    calls: list[int] = []
    proxy.tensor_quant.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(1, 3, 5, 5)
    first(x), second(x)
    assert len(calls) == 2
    # Sharing again with an already tracked layer does not duplicate it.
    proxy.add_tracked_module(second)
    assert proxy.tracked_module_list == [first, second]


def test_shared_scale_is_initialised_from_both_layers() -> None:
    first = conv(weight_quant=SharedParamFromMeanWeightQuantizer)
    alone = first.weight_quant.scale().detach().clone()
    assert torch.allclose(alone, first.weight.abs().mean())
    second = conv(weight_quant=first.weight_quant)
    both = torch.cat([first.weight.flatten(), second.weight.flatten()]).abs().mean()
    assert torch.allclose(first.weight_quant.scale(), both)
    assert not torch.allclose(alone, both)
    assert torch.equal(first.quant_weight().scale, second.quant_weight().scale)


def test_loading_into_one_sharer_rebuilds_with_both_layers() -> None:
    first = conv(weight_quant=SharedParamFromMeanWeightQuantizer)
    second = conv(weight_quant=first.weight_quant)
    float_conv = nn.Conv2d(3, 4, 3)
    config.IGNORE_MISSING_KEYS = True
    try:
        second.load_state_dict(float_conv.state_dict())
    finally:
        config.IGNORE_MISSING_KEYS = False
    expected = torch.cat([first.weight.flatten(), float_conv.weight.flatten()]).abs().mean()
    assert torch.allclose(first.weight_quant.scale(), expected)
    assert first.weight_quant.tracked_module_list == [first, second]


def test_a_model_with_a_shared_proxy_round_trips_its_state_dict() -> None:
    model = nn.Sequential(conv(weight_quant=BinaryWeightQuantizer), nn.ReLU())
    model.append(conv(weight_quant=model[0].weight_quant))
    with torch.no_grad():
        model[0].weight_quant.tensor_quant.scaling_impl.value.fill_(0.7)
    state = model.state_dict()
    assert "0.weight_quant.tensor_quant.scaling_impl.value" in state
    assert "2.weight_quant.tensor_quant.scaling_impl.value" in state
    clone = nn.Sequential(conv(weight_quant=BinaryWeightQuantizer), nn.ReLU())
    clone.append(conv(weight_quant=clone[0].weight_quant))
    clone.load_state_dict(state)
    assert clone[0].weight_quant is clone[2].weight_quant
    assert clone[2].weight_quant.scale().item() == pytest.approx(0.7)


# -- loading state dicts --------------------------------------------------------------------------


@pytest.fixture
def ignore_missing_keys() -> Iterator[None]:
    config.IGNORE_MISSING_KEYS = True
    try:
        yield
    finally:
        config.IGNORE_MISSING_KEYS = False


def test_loading_rebuilds_per_channel_scales_from_the_loaded_weight(ignore_missing_keys: None) -> None:
    layer = conv(weight_quant=PerChannelParamFromMaxWeightQuantizer)
    float_conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        float_conv.weight.mul_(torch.arange(1.0, 5.0).reshape(4, 1, 1, 1))
    layer.load_state_dict(float_conv.state_dict())
    assert torch.allclose(layer.quant_weight().scale.flatten(), float_conv.weight.abs().flatten(1).amax(dim=1))
    stats_layer = conv(weight_quant=Int8WeightPerChannelFloat)
    stats_layer.load_state_dict(float_conv.state_dict())
    assert torch.allclose(stats_layer.quant_weight().scale.flatten(), float_conv.weight.abs().flatten(1).amax(1) / 127)


def test_a_loaded_learned_scale_wins_over_the_rebuilt_one() -> None:
    source = conv(weight_quant=ParamFromMaxWeightQuantizer)
    with torch.no_grad():
        source.weight_quant.tensor_quant.scaling_impl.value.fill_(0.123)
    target = conv(weight_quant=ParamFromMaxWeightQuantizer)
    assert not torch.equal(target.weight, source.weight)
    result = target.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert target.weight_quant.scale().item() == pytest.approx(0.123)
    assert torch.equal(target.weight, source.weight)


def test_loading_restores_collected_activation_statistics() -> None:
    source = QuantLinear(4, 3, input_quant=Int8ActPerTensorFloat, input_collect_stats_steps=2)
    source.train()
    for _ in range(2):
        source(torch.randn(5, 4) * 3)
    target = QuantLinear(4, 3, input_quant=Int8ActPerTensorFloat, input_collect_stats_steps=2)
    target.load_state_dict(source.state_dict())
    stats = target.input_quant.tensor_quant.scaling_impl.stats
    assert not stats.is_collecting()
    x = torch.randn(5, 4)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))


def test_missing_quantizer_keys_raise_unless_ignored() -> None:
    layer = conv(weight_quant=ParamFromMaxWeightQuantizer, input_quant=Int8ActPerTensorFloat)
    float_conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(RuntimeError, match="weight_quant.tensor_quant.scaling_impl.value"):
        layer.load_state_dict(float_conv.state_dict())
    config.IGNORE_MISSING_KEYS = True
    try:
        result = layer.load_state_dict(float_conv.state_dict())
        assert not result.missing_keys
        # Only quantizer keys are forgiven: a missing layer tensor is still an error.
        state = float_conv.state_dict()
        del state["bias"]
        with pytest.raises(RuntimeError, match="bias"):
            layer.load_state_dict(state)
    finally:
        config.IGNORE_MISSING_KEYS = False
    assert torch.equal(layer.weight, float_conv.weight)
    assert torch.allclose(layer.weight_quant.scale(), float_conv.weight.abs().max())


def test_non_strict_loading_reports_missing_quantizer_keys() -> None:
    layer = conv(weight_quant=ParamFromMaxWeightQuantizer)
    result = layer.load_state_dict(nn.Conv2d(3, 4, 3).state_dict(), strict=False)
    assert "weight_quant.tensor_quant.scaling_impl.value" in result.missing_keys


def test_missing_keys_of_nested_quant_layers_are_forgiven(ignore_missing_keys: None) -> None:
    float_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model = nn.Sequential(
        conv(input_quant=Int8ActPerTensorFloat),
        QuantReLU(),
        QuantConv2d(4, 2, 1, weight_quant=ParamFromMaxWeightQuantizer),
    )
    model.load_state_dict(float_model.state_dict())
    assert torch.allclose(model[2].weight_quant.scale(), float_model[2].weight.abs().max())


@pytest.mark.slow  # a fresh interpreter importing torch takes a few seconds
def test_ignore_missing_keys_from_the_environment() -> None:
    script = textwrap.dedent(
        """
        import torch
        from torch import nn
        import quantwire.config as config
        from quantwire.nn import QuantConv2d
        from quantwire.quant import Int8ActPerTensorFloat
        assert config.IGNORE_MISSING_KEYS is True
        layer = QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat)
        float_conv = nn.Conv2d(3, 4, 3)
        layer.load_state_dict(float_conv.state_dict())
        assert torch.equal(layer.weight, float_conv.weight)
        print("loaded")
        """
    )
    env = {**os.environ, "QUANTWIRE_IGNORE_MISSING_KEYS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loaded" in result.stdout


def test_init_tensor_quant_by_hand() -> None:
    layer = conv(weight_quant=ParamFromMaxWeightQuantizer)
    with torch.no_grad():
        nn.init.uniform_(layer.weight, 0.0, 5.0)
    assert not torch.allclose(layer.weight_quant.scale(), layer.weight.abs().max())
    old_tensor_quant = layer.weight_quant.tensor_quant
    layer.weight_quant.init_tensor_quant()
    assert layer.weight_quant.tensor_quant is not old_tensor_quant
    assert torch.allclose(layer.weight_quant.scale(), layer.weight.abs().max())
    with torch.no_grad():
        layer.weight.mul_(2)
    layer.init_quantizers()  # every proxy of the layer
    assert torch.allclose(layer.weight_quant.scale(), layer.weight.abs().max())


# -- queries --------------------------------------------------------------------------------------


def test_weight_proxy_scale_zero_point_bit_width() -> None:
    layer = conv(weight_quant=Int8WeightPerChannelFloat)
    proxy = layer.weight_quant
    assert torch.allclose(proxy.scale(), layer.weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 127)
    assert proxy.zero_point().item() == 0 and proxy.bit_width().item() == 8
    assert torch.equal(proxy.scale(), layer.quant_weight().scale)
    shifted = conv(weight_quant=ShiftedUint8WeightPerTensorFloat).weight_quant
    weight = shifted.tracked_weight()
    expected_scale = (weight.max().clamp_min(0) - weight.min().clamp_max(0)) / 255
    assert torch.allclose(shifted.scale(), expected_scale)
    assert shifted.zero_point().item() == round(-weight.min().clamp_max(0).item() / shifted.scale().item())
    assert shifted.bit_width().item() == 8


def test_act_proxy_queries_answer_after_a_forward_pass() -> None:
    layer = QuantIdentity(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
    with pytest.raises(QuantConfigError, match="QuantIdentity.act_quant=Uint8ActPerTensorFloat"):
        layer.act_quant.scale()
    output = layer(torch.rand(4, 5))
    assert torch.equal(layer.act_quant.scale(), output.scale)
    assert torch.equal(layer.act_quant.zero_point(), output.zero_point)
    assert layer.act_quant.bit_width().item() == 8
    assert not layer.act_quant.scale().requires_grad  # kept detached between passes


@pytest.mark.parametrize(
    ("make", "role", "signed"),
    [
        (lambda: conv(), "weight_quant", True),
        (lambda: conv(weight_quant=ShiftedUint8WeightPerTensorFloat), "weight_quant", False),
        (lambda: conv(weight_quant=SignedBinaryWeightPerTensorConst), "weight_quant", True),
        (lambda: conv(weight_quant=Fp8e4m3WeightPerTensorFloat), "weight_quant", True),
        (lambda: conv(weight_quant=BinaryWeightQuantizer, weight_signed=True), "weight_quant", True),
        (lambda: QuantReLU(), "act_quant", False),
        (lambda: QuantIdentity(), "act_quant", True),
        (lambda: QuantIdentity(signed=False), "act_quant", False),
        (lambda: conv(input_quant=Int8ActPerTensorFloat, bias_quant=Int32Bias), "bias_quant", True),
    ],
    ids=["int8", "shifted", "binary", "fp8", "tutorial", "relu", "identity", "identity-unsigned", "bias"],
)
def test_signed_and_enabled_queries(make: Any, role: str, signed: bool) -> None:
    proxy = getattr(make(), role)
    assert proxy.signed is signed
    assert proxy.is_quant_enabled
    proxy.disable_quant = True
    assert not proxy.is_quant_enabled


def test_unsigned_declaration_reaches_the_quant_tensor() -> None:
    output = QuantReLU(return_quant_tensor=True)(torch.randn(3, 4))
    assert isinstance(output, IntQuantTensor) and not output.signed and output.is_valid


# -- disabling -------------------------------------------------------------------------------------


def disable_all(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, QuantProxyFromInjector):
            module.disable_quant = True


@pytest.mark.parametrize("return_quant_tensor", [False, True])
def test_disabled_proxies_make_a_layer_its_float_twin(return_quant_tensor: bool) -> None:
    layer = QuantConv2d(
        3,
        4,
        3,
        input_quant=Int8ActPerTensorFloat,
        output_quant=Int8ActPerTensorFloat,
        bias_quant=Int32Bias,
        return_quant_tensor=return_quant_tensor,
    )
    float_conv = nn.Conv2d(3, 4, 3)
    float_conv.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(2, 3, 6, 6)
    assert not torch.equal(layer(x), float_conv(x))
    disable_all(layer)
    assert torch.equal(layer(x), float_conv(x))
    assert layer.quant_weight() is layer.weight
    assert layer.input_quant(x) is x
    with pytest.raises(QuantConfigError, match="disabled"):
        layer.weight_quant.scale()


@pytest.mark.parametrize("return_quant_tensor", [False, True])
def test_disabled_proxies_on_other_layers(return_quant_tensor: bool) -> None:
    x = torch.randn(3, 5)
    relu = QuantReLU(input_quant=Int8ActPerTensorFloat, return_quant_tensor=return_quant_tensor)
    disable_all(relu)
    assert torch.equal(relu(x), torch.relu(x))
    embedding = QuantEmbedding(10, 4, return_quant_tensor=return_quant_tensor)
    disable_all(embedding)
    indices = torch.tensor([1, 5, 9])
    assert torch.equal(embedding(indices), embedding.weight[indices])
    float_mha = nn.MultiheadAttention(8, 2).eval()
    mha = QuantMultiheadAttention.from_float(float_mha).eval()
    disable_all(mha)
    q = torch.randn(4, 2, 8)
    assert torch.allclose(mha(q, q, q)[0], float_mha(q, q, q)[0], atol=1e-6)


# -- the eval-time weight cache ----------------------------------------------------------------


class CallCounter:
    """Counts calls of a proxy's ``tensor_quant`` (re-attached after a rebuild)."""

    def __init__(self, proxy: WeightQuantProxyFromInjector) -> None:
        self.proxy = proxy
        self.calls = 0
        self.attach()

    def attach(self) -> None:
        self.proxy.tensor_quant.register_forward_hook(self._hook)

    def _hook(self, *args: Any) -> None:
        self.calls += 1


def fresh_output(layer: nn.Module, x: Tensor) -> Tensor:
    """What the layer computes without any cache (autograd on)."""
    with torch.enable_grad():
        return layer(x).detach()


@pytest.fixture
def cached_layer() -> tuple[QuantConv2d, CallCounter, Tensor]:
    torch.manual_seed(0)
    layer = conv(weight_quant=BinaryWeightQuantizer.let(scaling_init=0.5)).eval()
    return layer, CallCounter(layer.weight_quant), torch.randn(1, 3, 5, 5)


def test_eval_without_grad_quantizes_the_weight_once(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
        layer.quant_weight()
    assert counter.calls == 1
    assert torch.equal(first, second) and torch.equal(first, fresh_output(layer, x))


def test_the_cache_can_be_turned_off(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    layer.weight_quant.cache_inference_quant_weight = False
    with torch.no_grad():
        first, second = layer(x), layer(x)
    assert counter.calls == 2
    assert torch.equal(first, second)


def test_the_cache_is_never_used_with_grad_enabled(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    with torch.no_grad():
        layer(x)
    calls = counter.calls
    outputs = [layer(x) for _ in range(2)]
    assert counter.calls == calls + 2
    assert all(output.requires_grad for output in outputs)
    outputs[0].sum().backward()
    assert layer.weight_quant.tensor_quant.scaling_impl.value.grad is not None


def test_training_mode_never_caches(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    layer.train()
    with torch.no_grad():
        layer(x), layer(x)
    assert counter.calls == 2


def test_the_cache_follows_in_place_weight_changes(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    with torch.no_grad():
        layer(x)
        layer.weight.neg_()
        after = layer(x)
    assert counter.calls == 2
    assert torch.equal(after, fresh_output(layer, x))


def test_the_cache_follows_an_optimizer_step_on_a_learned_scale(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    with torch.no_grad():
        before = layer(x)
    scale = layer.weight_quant.tensor_quant.scaling_impl.value
    optimizer = torch.optim.SGD([scale], lr=0.1)  # only the scale moves, not the weight
    layer(x).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
    assert scale.item() != 0.5
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh_output(layer, x))


def test_the_cache_follows_a_replaced_scale_tensor(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    with torch.no_grad():
        layer(x)
        layer.weight_quant.tensor_quant.scaling_impl.value.data = torch.tensor(2.0)
        after = layer(x)
    assert torch.equal(after, fresh_output(layer, x))
    assert layer.weight_quant.scale().item() == 2.0


def test_the_cache_follows_a_replaced_weight(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    with torch.no_grad():
        layer(x)
    layer.weight = nn.Parameter(-layer.weight.detach().clone())
    with torch.no_grad():
        after = layer(x)
    assert torch.equal(after, fresh_output(layer, x))


def test_the_cache_is_recomputed_after_train_and_eval(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    with torch.no_grad():
        layer(x)
    layer.train()
    layer.eval()
    with torch.no_grad():
        after = layer(x)
    assert counter.calls == 2
    assert torch.equal(after, fresh_output(layer, x))


def test_loading_a_state_dict_clears_the_cache(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    with torch.no_grad():
        layer(x)
    other = conv(weight_quant=BinaryWeightQuantizer.let(scaling_init=3.0))
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        after = layer(x)
    assert layer.weight_quant.scale().item() == 3.0
    assert torch.equal(after, fresh_output(layer, x))


def test_the_cache_under_inference_mode(cached_layer: Any) -> None:
    layer, counter, x = cached_layer
    with torch.inference_mode():
        first = layer(x)
        second = layer(x)
    assert counter.calls == 1 and torch.equal(first, second)
    with torch.no_grad():
        after = layer(x)
        weight = layer.quant_weight().value
    assert counter.calls == 2
    assert not after.is_inference() and not weight.is_inference()
    assert torch.equal(after, first)
    # Inference tensors in a cache would break an in-place update and autograd afterwards.
    with torch.no_grad():
        layer.weight.mul_(1.5)
    layer.train()
    layer(x).sum().backward()
    assert layer.weight.grad is not None


def test_every_sharing_layer_gets_its_own_weight_quantized(cached_layer: Any) -> None:
    first, counter, x = cached_layer
    second = conv(weight_quant=first.weight_quant).eval()
    with torch.no_grad():
        second.weight.copy_(torch.randn_like(second.weight))
    counter.attach()  # the shared proxy was rebuilt
    with torch.no_grad():
        a, b = first(x), second(x)
    assert torch.equal(a, fresh_output(first, x)) and torch.equal(b, fresh_output(second, x))
    assert not torch.equal(a, b)


# -- error messages --------------------------------------------------------------------------------


class MissingScalingInit(ExtendedInjector):
    tensor_quant = BinaryQuant
    scaling_impl = ParameterScaling
    signed = True


@pytest.mark.parametrize(
    ("make", "described"),
    [
        (
            lambda: conv(weight_quant=MissingScalingInit.let(proxy_class=WeightQuantProxyFromInjector)),
            "QuantConv2d.weight_quant=",
        ),
        (
            lambda: QuantReLU(act_quant=MissingScalingInit.let(proxy_class=ActQuantProxyFromInjector)),
            "QuantReLU.act_quant=",
        ),
        (
            lambda: QuantLinear(3, 4, input_quant=MissingScalingInit.let(proxy_class=ActQuantProxyFromInjector)),
            "QuantLinear.input_quant=",
        ),
    ],
    ids=["weight", "act", "input"],
)
def test_a_missing_attribute_names_layer_role_quantizer_and_attribute(make: Any, described: str) -> None:
    with pytest.raises(DependencyError) as error:
        make()
    message = str(error.value)
    assert described in message and "MissingScalingInit" in message and "'scaling_init'" in message


def test_a_bad_value_names_layer_role_quantizer_and_value() -> None:
    with pytest.raises(QuantConfigError) as error:
        conv(weight_bit_width=0)
    message = str(error.value)
    assert "QuantConv2d.weight_quant=Int8WeightPerTensorFloat" in message and "bit_width" in message and "0" in message
    with pytest.raises(QuantConfigError, match=r"QuantIdentity\.act_quant=Int8ActPerTensorFloat.*high_percentile_q"):
        QuantIdentity(high_percentile_q=101.0)


def test_a_shared_proxy_names_every_layer_it_serves() -> None:
    first = conv(weight_quant=BinaryWeightQuantizer)
    linear = QuantLinear(4, 4, weight_quant=first.weight_quant)
    assert first.weight_quant.describe() == "QuantConv2d+QuantLinear.weight_quant=BinaryWeightQuantizer"
    assert linear.weight_quant is first.weight_quant


def test_a_rebuild_follows_the_layer_dtype() -> None:
    from quantwire.nn import QuantLinear
    from quantwire.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    layer = QuantLinear(4, 3, weight_quant=Int8WeightPerChannelFloat, input_quant=Int8ActPerTensorFloat).double()
    layer.load_state_dict(layer.state_dict())  # rebuilds every quantizer after the move
    for proxy in (layer.weight_quant, layer.input_quant):
        assert all(t.dtype == torch.float64 for t in proxy.tensor_quant.parameters())
    assert layer(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_a_default_layer_loads_a_float_checkpoint_strictly() -> None:
    """Stateless default quantizers (abs-max weights, no delay) need no IGNORE_MISSING_KEYS."""
    from quantwire.nn import QuantConv2d

    layer, float_layer = QuantConv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3)
    assert set(layer.state_dict()) == {"weight", "bias"}
    layer.load_state_dict(float_layer.state_dict())
    assert torch.equal(layer.weight, float_layer.weight)


def test_from_float_builds_each_quantizer_once_from_the_copied_weight(monkeypatch):
    """``from_float`` defers the quantizer builds of the placeholder layer: an MSE-initialised
    learned scale searches the float layer's weight once, not the placeholder's first."""
    import quantwire.quant as catalogue
    from quantwire.nn import QuantLinear
    from quantwire.proxy.base import QuantProxyFromInjector

    built = []
    original = QuantProxyFromInjector.init_tensor_quant

    def counting(proxy):
        built.append(proxy.role)
        original(proxy)

    monkeypatch.setattr(QuantProxyFromInjector, "init_tensor_quant", counting)
    float_layer = torch.nn.Linear(6, 4)
    layer = QuantLinear.from_float(
        float_layer, weight_quant=catalogue.Int8WeightPerChannelLsq, input_quant=catalogue.Int8ActPerTensorFloat
    )
    assert sorted(built) == ["input_quant", "weight_quant"]
    scale = layer.weight_quant.tensor_quant.scaling_impl.value
    expected = float_layer.weight.detach().abs().amax(dim=1, keepdim=True)
    assert scale.shape == expected.shape and bool((scale > 0).all())
    torch.testing.assert_close(layer.weight_quant(layer.weight).value, layer.quant_weight().value)
