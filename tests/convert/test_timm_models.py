"""Conversion of real timm models (random weights, nothing downloaded): ViT-Tiny, Swin-Tiny
(shallower, at 56x56 so that the first stage has shifted windows) and ResNet-18 at W8A8 end
to end, and the attention / block twins on their own (masks, causal attention, q/k norm,
gate, LayerScale)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
from converted_model_checks import (
    RESIDUAL_AND_ATTENTION_OFF,
    assert_copies_and_pickles,
    assert_float_when_disabled,
    assert_trains,
    assert_untouched,
    calibrated_cosine,
    convert,
    convert_and_measure,
    count,
    seeded_batches,
    set_quantization,
    settle_batch_norms,
)
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from quantwire.convert import ConvertedModule
from quantwire.convert.handlers import timm as timm_handlers
from quantwire.nn import QuantConv2d, QuantEltwiseAdd, QuantLinear, QuantScaledDotProductAttention


@dataclass(frozen=True)
class ModelCase:
    """A timm model (its name and create_model keywords), its input size, and what
    conversion gives: residual adds, quantized attentions and the cosine bar."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    size: int = 64
    residual_adds: int = 0
    attentions: int = 0
    min_cosine: float = 0.99
    prepare: Callable[[nn.Module], None] | None = None


def _trained_size_class_token(model: nn.Module) -> None:
    """Give the ViT's class token the size of the patch tokens. timm initialises it at ~1e-6,
    so in a random ViT it stays ~10x smaller than the patch tokens through every block, and
    the head, which reads only that token, sees it on a per-tensor residual grid sized for
    the patch tokens (cosine similarity 0.93 at W8A8; 0.9993 with residual adds float)."""
    nn.init.normal_(model.cls_token, std=1.0)


CASES = {
    # 12 blocks: two residual adds and one attention each.
    "vit_tiny": ModelCase("vit_tiny_patch16_224", {"img_size": 64}, 64, 24, 12, 0.985, _trained_size_class_token),
    # 8 blocks (two per stage); 56 / 4 = 14 tokens a side, so the first stage's second block
    # shifts its 7x7 windows and masks the scores.
    "swin_tiny": ModelCase("swin_tiny_patch4_window7_224", {"img_size": 56, "depths": (2, 2, 2, 2)}, 56, 16, 8, 0.985),
    # timm zero-initialises the last BN of each block by default: the residual branches would be 0.
    "resnet18": ModelCase("resnet18", {"zero_init_last": False}, 64, 8, 0, 0.985),
}
# Measured with these seeds (W8A8): vit_tiny 0.9970, swin_tiny 0.9984, resnet18 0.9930.


@dataclass
class Converted:
    """A float model, its state before conversion, and its calibrated W8A8 conversion."""

    case: ModelCase
    float_model: nn.Module
    before: dict[str, torch.Tensor]
    qmodel: nn.Module
    probe: torch.Tensor
    cosine: float


@pytest.fixture(scope="module", params=["vit_tiny", "swin_tiny", pytest.param("resnet18", marks=pytest.mark.slow)])
def converted(request: pytest.FixtureRequest) -> Converted:
    """Create the model (seeded, random weights), convert at W8A8 and calibrate."""
    case = CASES[request.param]
    torch.manual_seed(0)
    shape = (4, 3, case.size, case.size)
    model = timm.create_model(case.name, pretrained=False, num_classes=10, **case.kwargs)
    if case.prepare is not None:
        case.prepare(model)
    float_model = settle_batch_norms(model, seeded_batches(2, shape, seed=1))
    before, qmodel, probe, cosine = convert_and_measure(request.param, float_model, shape)
    return Converted(case, float_model, before, qmodel, probe, cosine)


def test_float_model_is_untouched(converted: Converted) -> None:
    assert_untouched(converted.float_model, converted.before)


def test_residual_adds_attention_and_layers_are_where_expected(converted: Converted) -> None:
    qmodel, float_model, case = converted.qmodel, converted.float_model, converted.case
    assert count(qmodel, QuantEltwiseAdd) == case.residual_adds
    assert count(qmodel, QuantScaledDotProductAttention) == case.attentions
    # Every linear and conv is converted, inside the attention and block twins too.
    assert count(qmodel, QuantLinear) == count(float_model, nn.Linear)
    assert count(qmodel, QuantConv2d) == count(float_model, nn.Conv2d)


def test_converted_model_computes_the_float_model_with_quantization_off(converted: Converted) -> None:
    assert_float_when_disabled(converted.float_model, converted.qmodel, converted.probe, atol=1e-4)


def test_calibrated_output_is_close_to_float(converted: Converted) -> None:
    assert converted.cosine >= converted.case.min_cosine, f"cosine similarity {converted.cosine:.5f}"


def test_forward_and_backward_reach_weights_and_scales(converted: Converted) -> None:
    scales = assert_trains(converted.qmodel, converted.probe)
    assert scales >= converted.case.residual_adds + 4 * converted.case.attentions


def test_converted_model_deep_copies_and_pickles(converted: Converted) -> None:
    assert_copies_and_pickles(converted.qmodel, converted.probe)


def test_residual_and_attention_quantization_off(converted: Converted) -> None:
    qmodel = convert(converted.float_model, **RESIDUAL_AND_ATTENTION_OFF)
    assert count(qmodel, QuantEltwiseAdd) == 0
    assert count(qmodel, QuantScaledDotProductAttention) == 0
    assert count(qmodel, ConvertedModule) == 0
    assert count(qmodel, QuantLinear) == count(converted.float_model, nn.Linear)


def test_swin_shifted_windows_are_masked() -> None:
    """The first stage of the small Swin shifts its windows: the mask goes into the scores."""
    case = CASES["swin_tiny"]
    model = timm.create_model(case.name, pretrained=False, num_classes=10, **case.kwargs)
    masked = [m for m in model.modules() if isinstance(m, SwinTransformerBlock) and m.attn_mask is not None]
    assert masked


# -- the twins on their own --------------------------------------------------------------------


def _attention(**kwargs: Any) -> Attention:
    torch.manual_seed(0)
    return Attention(32, num_heads=4, qkv_bias=True, norm_layer=nn.LayerNorm, **kwargs).eval()


@pytest.mark.parametrize(
    "kwargs", [{}, {"qk_norm": True}, {"gated": True, "scale_norm": True}], ids=["plain", "qk_norm", "gated"]
)
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "causal"])
def test_attention_twin_computes_timm_attention(kwargs: dict[str, Any], mask: str) -> None:
    attention = _attention(**kwargs)
    qattention = convert(attention)
    assert isinstance(qattention, timm_handlers.QuantAttention)
    x = torch.randn(2, 6, 32)
    call: dict[str, Any] = {}
    if mask == "bool":
        call["attn_mask"] = (torch.rand(6, 6) > 0.3) | torch.eye(6, dtype=torch.bool)
    elif mask == "additive":
        call["attn_mask"] = torch.randn(2, 1, 6, 6)
    elif mask == "causal":
        call["is_causal"] = True
    set_quantization(qattention, enabled=False)
    with torch.no_grad():
        torch.testing.assert_close(qattention(x, **call), attention(x, **call), atol=1e-5, rtol=1e-4)


def test_attention_is_left_as_is_when_attention_quantization_is_off() -> None:
    qattention = convert(_attention(), attention=None, attention_probs=None)
    assert type(qattention) is Attention
    assert isinstance(qattention.qkv, QuantLinear) and isinstance(qattention.proj, QuantLinear)


def test_block_with_layer_scale_and_drop_path() -> None:
    torch.manual_seed(0)
    block = Block(32, num_heads=4, init_values=0.1, drop_path=0.2).eval()
    qblock = convert(block)
    assert isinstance(qblock, timm_handlers.QuantBlock)
    assert isinstance(qblock.attn, timm_handlers.QuantAttention)
    assert count(qblock, QuantEltwiseAdd) == 2
    x = torch.randn(2, 5, 32)
    assert_float_when_disabled(block, qblock, x)
    qblock.attn_residual_add = qblock.mlp_residual_add = None  # float adds: the fallback
    assert_float_when_disabled(block, qblock, x)


def test_mlp_needs_only_the_linear_handler() -> None:
    qmlp = convert(Mlp(16, 32))
    assert type(qmlp) is Mlp
    assert isinstance(qmlp.fc1, QuantLinear) and isinstance(qmlp.fc2, QuantLinear)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_small_resnet_twins(block: str) -> None:
    """timm ResNet blocks (with squeeze-excitation and drop path) on a one-block-a-stage model."""
    torch.manual_seed(0)
    model = timm.models.resnet.ResNet(
        block=timm.models.resnet.BasicBlock if block == "basic" else timm.models.resnet.Bottleneck,
        layers=(1, 1, 1, 1),
        num_classes=10,
        zero_init_last=False,
        block_args={"attn_layer": "se"},
        drop_path_rate=0.1,
    )
    shape = (2, 3, 32, 32)
    float_model = settle_batch_norms(model, seeded_batches(2, shape, seed=1))
    qmodel = convert(float_model)
    assert count(qmodel, QuantEltwiseAdd) == 4
    probe = seeded_batches(1, shape, seed=3)[0]
    assert_float_when_disabled(float_model, qmodel, probe)
    cosine = calibrated_cosine(float_model, qmodel, seeded_batches(4, (8, 3, 32, 32), seed=2), probe)
    print(f"\ntimm resnet ({block}): W8A8 cosine similarity to float {cosine:.5f}")
    assert cosine >= 0.96  # measured: 0.9844 (basic), 0.9856 (bottleneck)
