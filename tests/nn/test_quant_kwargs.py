"""Keyword arguments reach a layer's quantizers by prefix, and mistakes are reported.

``weight_`` / ``bias_`` / ``input_`` / ``output_`` go to the matching quantizer; activation
layers hand un-prefixed ones to ``act_quant``; ``QuantMultiheadAttention`` routes by the name
of each of its quantizers. A keyword no quantizer can use, one for a quantizer that is None,
or one aimed at a shared proxy is a :class:`QuantConfigError`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from quantwire.core.quant import BinaryQuant
from quantwire.core.scaling import ParameterScaling
from quantwire.errors import QuantConfigError
from quantwire.inject import ExtendedInjector, this, value
from quantwire.nn import (
    QuantConv2d,
    QuantConvTranspose2d,
    QuantEltwiseAdd,
    QuantEmbedding,
    QuantHardTanh,
    QuantIdentity,
    QuantLayerNorm,
    QuantLinear,
    QuantMultiheadAttention,
    QuantReLU,
    QuantScaledDotProductAttention,
    QuantSigmoid,
    QuantTanh,
)
from quantwire.proxy import ActQuantProxyFromInjector, WeightQuantProxyFromInjector
from quantwire.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Int16Bias, Uint8ActPerTensorFloat


def bit_width_of(proxy: Any) -> int:
    """The bit width the proxy's quantizer was built with."""
    return int(proxy.tensor_quant.msb_clamp_bit_width_impl())


# -- prefixes -------------------------------------------------------------------------------------


def test_weight_layer_prefixes_reach_their_quantizer() -> None:
    layer = QuantLinear(
        8,
        4,
        input_quant=Int8ActPerTensorFloat,
        output_quant=Int8ActPerTensorFloat,
        bias_quant=Int16Bias,
        weight_bit_width=3,
        bias_bit_width=12,
        input_bit_width=5,
        output_bit_width=6,
        input_collect_stats_steps=7,
    )
    assert bit_width_of(layer.weight_quant) == 3
    assert bit_width_of(layer.bias_quant) == 12
    assert bit_width_of(layer.input_quant) == 5
    assert bit_width_of(layer.output_quant) == 6
    assert layer.input_quant.tensor_quant.scaling_impl.stats.collect_stats_steps == 7
    assert layer.output_quant.tensor_quant.scaling_impl.stats.collect_stats_steps == 300
    # The layer's own quantizer classes are untouched: overrides make new injectors.
    assert Int8WeightPerTensorFloat.bit_width == 8 and Int8ActPerTensorFloat.bit_width == 8


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: QuantConv2d(3, 4, 3, **kw),
        lambda **kw: QuantConvTranspose2d(3, 4, 3, **kw),
        lambda **kw: QuantLayerNorm(4, **kw),
    ],
    ids=["conv", "conv-transpose", "layer-norm"],
)
def test_other_weight_layers_route_prefixes(make: Any) -> None:
    layer = make(weight_bit_width=4, weight_narrow_range=False, input_quant=Int8ActPerTensorFloat, input_bit_width=6)
    assert bit_width_of(layer.weight_quant) == 4
    assert not layer.weight_quant.tensor_quant.int_quant.narrow_range
    assert bit_width_of(layer.input_quant) == 6


def test_embedding_routes_weight_prefix_only() -> None:
    assert bit_width_of(QuantEmbedding(5, 4, weight_bit_width=3).weight_quant) == 3
    with pytest.raises(QuantConfigError, match="input_bit_width"):
        QuantEmbedding(5, 4, input_bit_width=3)


@pytest.mark.parametrize("layer_class", [QuantIdentity, QuantReLU, QuantSigmoid, QuantTanh, QuantHardTanh])
def test_activation_layers_hand_unprefixed_keywords_to_act_quant(layer_class: type) -> None:
    layer = layer_class(bit_width=4, input_quant=Int8ActPerTensorFloat, input_bit_width=6, return_quant_tensor=True)
    assert bit_width_of(layer.act_quant) == 4
    assert bit_width_of(layer.input_quant) == 6
    assert layer(torch.randn(3, 5)).bit_width.item() == 4


def test_longest_prefix_wins_for_names_that_start_like_another_prefix() -> None:
    # "input_bit_width" on an activation layer is input_quant's bit_width, not act_quant's
    # attribute "input_bit_width".
    layer = QuantReLU(input_quant=Int8ActPerTensorFloat, input_bit_width=3)
    assert bit_width_of(layer.input_quant) == 3 and bit_width_of(layer.act_quant) == 8


def test_merge_layers_route_input_and_output_prefixes() -> None:
    layer = QuantEltwiseAdd(input_bit_width=4, output_quant=Uint8ActPerTensorFloat, output_bit_width=5)
    assert bit_width_of(layer.input_quant) == 4 and bit_width_of(layer.output_quant) == 5
    with pytest.raises(QuantConfigError, match="bit_width"):
        QuantEltwiseAdd(bit_width=4)


def test_multihead_attention_prefixes() -> None:
    layer = QuantMultiheadAttention(
        8,
        2,
        in_proj_input_quant=Int8ActPerTensorFloat,
        in_proj_bias_quant=Int16Bias,
        softmax_input_quant=Int8ActPerTensorFloat,
        out_proj_input_quant=Int8ActPerTensorFloat,
        out_proj_bias_quant=Int16Bias,
        out_proj_output_quant=Int8ActPerTensorFloat,
        in_proj_input_bit_width=2,
        in_proj_weight_bit_width=3,
        in_proj_bias_bit_width=10,
        q_scaled_bit_width=4,
        k_transposed_bit_width=5,
        v_bit_width=6,
        softmax_input_bit_width=7,
        attn_output_weights_bit_width=9,
        out_proj_input_bit_width=11,
        out_proj_weight_bit_width=12,
        out_proj_bias_bit_width=13,
        out_proj_output_bit_width=14,
    )
    assert bit_width_of(layer.in_proj_input_quant) == 2
    assert bit_width_of(layer.in_proj_weight_quants["in_proj_weight"]) == 3
    assert bit_width_of(layer.in_proj_bias_quant) == 10
    attention = layer.attention
    assert bit_width_of(attention.q_scaled_quant) == 4
    assert bit_width_of(attention.k_transposed_quant) == 5
    assert bit_width_of(attention.v_quant) == 6
    assert bit_width_of(attention.softmax_input_quant) == 7
    assert bit_width_of(attention.attn_output_weights_quant) == 9
    assert bit_width_of(layer.out_proj.input_quant) == 11
    assert bit_width_of(layer.out_proj.weight_quant) == 12
    assert bit_width_of(layer.out_proj.bias_quant) == 13
    assert bit_width_of(layer.out_proj.output_quant) == 14


def test_multihead_attention_separate_projection_weights_share_the_overrides() -> None:
    layer = QuantMultiheadAttention(8, 2, kdim=3, vdim=5, in_proj_weight_bit_width=4)
    assert set(layer.in_proj_weight_quants) == {"q_proj_weight", "k_proj_weight", "v_proj_weight"}
    for name, proxy in layer.in_proj_weight_quants.items():
        assert bit_width_of(proxy) == 4
        assert proxy.quant_output().value.shape == getattr(layer, name).shape


def test_sdpa_prefixes() -> None:
    layer = QuantScaledDotProductAttention(
        sdpa_output_quant=Int8ActPerTensorFloat, sdpa_output_bit_width=5, v_bit_width=3
    )
    assert bit_width_of(layer.sdpa_output_quant) == 5 and bit_width_of(layer.v_quant) == 3


# -- mistakes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "typo", "meant"),
    [
        (lambda **kw: QuantLinear(4, 4, **kw), "weight_bit_widht", "weight_bit_width"),
        (
            lambda **kw: QuantConv2d(3, 4, 3, **kw),
            "weight_scaling_per_output_chanel",
            "weight_scaling_per_output_channel",
        ),
        (lambda **kw: QuantReLU(**kw), "bit_widht", "bit_width"),
        (lambda **kw: QuantIdentity(**kw), "colect_stats_steps", "collect_stats_steps"),
        (lambda **kw: QuantMultiheadAttention(8, 2, **kw), "q_scaled_bit_widht", "q_scaled_bit_width"),
        (lambda **kw: QuantMultiheadAttention(8, 2, **kw), "out_proj_weight_bit_widht", "out_proj_weight_bit_width"),
    ],
    ids=["linear", "conv", "relu", "identity", "mha-attention", "mha-out-proj"],
)
def test_typo_raises_naming_the_intended_keyword(make: Any, typo: str, meant: str) -> None:
    with pytest.raises(QuantConfigError) as error:
        make(**{typo: 4})
    assert typo in str(error.value) and repr(meant) in str(error.value)


def test_keyword_without_any_prefix_on_a_weight_layer_raises() -> None:
    with pytest.raises(QuantConfigError, match="'bit_width'"):
        QuantLinear(4, 4, bit_width=4)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda **kw: QuantLinear(4, 4, **kw), "input_bit_width"),
        (lambda **kw: QuantLinear(4, 4, **kw), "bias_bit_width"),
        (lambda **kw: QuantLinear(4, 4, weight_quant=None, **kw), "weight_bit_width"),
        (lambda **kw: QuantReLU(act_quant=None, **kw), "bit_width"),
        (lambda **kw: QuantIdentity(**kw), "input_bit_width"),
        (lambda **kw: QuantMultiheadAttention(8, 2, **kw), "softmax_input_bit_width"),
        (lambda **kw: QuantMultiheadAttention(8, 2, **kw), "out_proj_output_bit_width"),
        (lambda **kw: QuantMultiheadAttention(8, 2, in_proj_weight_quant=None, **kw), "in_proj_weight_bit_width"),
    ],
    ids=[
        "linear-input",
        "linear-bias",
        "linear-weight",
        "relu-act",
        "identity-input",
        "mha-softmax",
        "mha-out-proj-output",
        "mha-in-proj-weight",
    ],
)
def test_keyword_for_a_none_quantizer_raises(make: Any, key: str) -> None:
    with pytest.raises(QuantConfigError, match=f"'{key}'.*None"):
        make(**{key: 4})


def test_layer_norm_without_affine_has_no_weight_quantizer_to_configure() -> None:
    assert QuantLayerNorm(4, elementwise_affine=False).weight_quant is None
    with pytest.raises(QuantConfigError, match="weight_bit_width"):
        QuantLayerNorm(4, elementwise_affine=False, weight_bit_width=4)


class TutorialWeightQuantizer(ExtendedInjector):
    """The tutorial's advanced quantizer: ``scaling_shape`` refers to a name through ``this``."""

    proxy_class = WeightQuantProxyFromInjector
    tensor_quant = BinaryQuant
    scaling_impl = ParameterScaling
    scaling_init = 0.1
    signed = True

    @value
    def scaling_shape(scaling_per_output_channel):
        return this.per_channel_broadcastable_shape if scaling_per_output_channel else ()


def test_names_referenced_through_this_are_accepted() -> None:
    layer = QuantConv2d(
        3,
        4,
        3,
        weight_quant=TutorialWeightQuantizer,
        weight_scaling_per_output_channel=True,
        weight_per_channel_broadcastable_shape=(4, 1, 1, 1),
    )
    assert layer.quant_weight().scale.shape == (4, 1, 1, 1)
    layer = QuantConv2d(3, 4, 3, weight_quant=TutorialWeightQuantizer, weight_scaling_per_output_channel=False)
    assert layer.quant_weight().scale.shape == ()
    with pytest.raises(QuantConfigError, match="per_channel_broadcastable_shap"):
        QuantConv2d(3, 4, 3, weight_quant=TutorialWeightQuantizer, weight_per_channel_broadcastable_shap=(4, 1, 1, 1))


def test_constructor_parameters_of_wired_classes_are_accepted() -> None:
    # quant_delay_steps is a parameter of IntQuant, which the quantizer wires by name.
    layer = QuantLinear(4, 4, weight_quant_delay_steps=2)
    assert layer.weight_quant.tensor_quant.int_quant.delay_wrapper.quant_delay_steps == 2


def test_keywords_on_a_shared_proxy_raise() -> None:
    first = QuantConv2d(3, 4, 3)
    with pytest.raises(QuantConfigError, match="shared proxy") as error:
        QuantConv2d(3, 4, 3, weight_quant=first.weight_quant, weight_bit_width=4)
    assert "weight_bit_width" in str(error.value)
    relu = QuantReLU()
    with pytest.raises(QuantConfigError, match="shared proxy"):
        QuantReLU(act_quant=relu.act_quant, bit_width=4)
    # The failed constructions did not attach themselves to the shared proxies.
    assert first.weight_quant.tracked_module_list == [first]
    assert relu.act_quant.tracked_module_list == [relu]


@pytest.mark.parametrize(
    "bad",
    [nn.ReLU, nn.ReLU(), 3, "Int8WeightPerTensorFloat", Int8WeightPerTensorFloat.tensor_quant],
    ids=["module-class", "module", "int", "string", "core-module"],
)
def test_a_non_quantizer_raises_a_clear_error(bad: Any) -> None:
    with pytest.raises(QuantConfigError, match="QuantConv2d: weight_quant must be a quantizer class"):
        QuantConv2d(3, 4, 3, weight_quant=bad)
    with pytest.raises(QuantConfigError, match="QuantReLU: act_quant must be a quantizer class"):
        QuantReLU(act_quant=bad)


@pytest.mark.parametrize("bad", [3, nn.ReLU], ids=["int", "module-class"])
def test_a_non_quantizer_on_multihead_attention_raises_a_clear_error(bad: Any) -> None:
    for role in ("in_proj_weight_quant", "in_proj_input_quant", "q_scaled_quant", "out_proj_weight_quant"):
        with pytest.raises(QuantConfigError, match="must be a quantizer class"):
            QuantMultiheadAttention(8, 2, **{role: bad})


class NoProxyQuantizer(ExtendedInjector):
    tensor_quant = BinaryQuant
    scaling_impl = ParameterScaling
    scaling_init = 0.1


@pytest.mark.parametrize(
    ("make", "role"),
    [
        (lambda q: QuantConv2d(3, 4, 3, weight_quant=q), "weight_quant"),
        (lambda q: QuantLinear(3, 4, input_quant=q), "input_quant"),
        (lambda q: QuantIdentity(act_quant=q), "act_quant"),
        (lambda q: QuantMultiheadAttention(8, 2, in_proj_weight_quant=q), "in_proj_weight_quant"),
        (lambda q: QuantMultiheadAttention(8, 2, v_quant=q), "v_quant"),
    ],
    ids=["conv-weight", "linear-input", "identity-act", "mha-in-proj-weight", "mha-v"],
)
def test_a_quantizer_without_proxy_class_raises_naming_it(make: Any, role: str) -> None:
    with pytest.raises(QuantConfigError, match="NoProxyQuantizer.*proxy_class") as error:
        make(NoProxyQuantizer)
    assert role in str(error.value)


def test_activation_quantizer_classes_are_not_mistaken_for_projection_weights() -> None:
    with pytest.raises(QuantConfigError, match="in_proj_weight_quant"):
        QuantMultiheadAttention(8, 2, in_proj_weight_quant=Int8ActPerTensorFloat)


def test_shared_proxy_on_multihead_attention_projection_raises_a_clear_error() -> None:
    first = QuantMultiheadAttention(8, 2)
    with pytest.raises(QuantConfigError, match="in_proj_weight_quant"):
        QuantMultiheadAttention(8, 2, in_proj_weight_quant=first.in_proj_weight_quants["in_proj_weight"])


def test_act_quantizer_proxy_class_is_used_for_activation_layers() -> None:
    layer = QuantIdentity(act_quant=Int8ActPerTensorFloat)
    assert type(layer.act_quant) is ActQuantProxyFromInjector
    assert layer.act_quant.quant_injector.__name__ == "Int8ActPerTensorFloat"


@pytest.mark.parametrize(
    ("role", "quant", "kind"),
    [
        ("weight_quant", "Int8ActPerTensorFloat", "an activation quantizer"),
        ("input_quant", "Int8WeightPerTensorFloat", "a weight quantizer"),
        ("bias_quant", "Int8WeightPerTensorFloat", "a weight quantizer"),
        ("weight_quant", "Int32Bias", "a bias quantizer"),
    ],
)
def test_a_quantizer_of_the_wrong_kind_is_refused(role, quant, kind):
    import quantwire.quant as catalogue
    from quantwire.errors import QuantConfigError
    from quantwire.nn import QuantLinear

    with pytest.raises(QuantConfigError, match=f"{role}={quant} is {kind}"):
        QuantLinear(4, 4, **{role: getattr(catalogue, quant)})
