"""Conversion of real torchvision models (random weights, nothing downloaded): ResNet-18,
MobileNetV2 and VGG-11-BN at W8A8 end to end, and the other residual twins (ResNet
Bottleneck, MobileNetV3, EfficientNet MBConv / FusedMBConv) on small instances."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pytest
import torch
import torchvision
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
    settle_batch_norms,
)
from torch import nn
from torchvision.models import efficientnet, resnet

from quantwire.convert import ConvertedModule
from quantwire.convert.handlers import torchvision as tv_handlers
from quantwire.nn import QuantConv2d, QuantEltwiseAdd, QuantLinear


@dataclass(frozen=True)
class ModelCase:
    """A torchvision model to convert, the input size it runs at, and what conversion gives."""

    build: object
    size: int
    residual_adds: int
    min_cosine: float


CASES = {
    # Cosine similarities measured with these seeds: resnet18 0.9953, mobilenet_v2 0.9266,
    # vgg11_bn 0.9955. Random MobileNets are very sensitive to any rounding (8-bit weights
    # alone give ~0.96, 8-bit activations alone ~0.91): their bar is lower.
    # 8 BasicBlocks, each with its skip connection.
    "resnet18": ModelCase(partial(torchvision.models.resnet18, num_classes=10), 64, 8, 0.985),
    # 17 InvertedResiduals; 10 keep width and stride (use_res_connect), the other 7 have no skip.
    "mobilenet_v2": ModelCase(partial(torchvision.models.mobilenet_v2, num_classes=10), 64, 10, 0.85),
    # No residual: convolutions, linears and pooling only.
    "vgg11_bn": ModelCase(partial(torchvision.models.vgg11_bn, num_classes=10), 32, 0, 0.985),
}
MODEL_NAMES = ["resnet18", "mobilenet_v2", pytest.param("vgg11_bn", marks=pytest.mark.slow)]


@dataclass
class Converted:
    """A float model, its state before conversion, and its calibrated W8A8 conversion."""

    case: ModelCase
    float_model: nn.Module
    before: dict[str, torch.Tensor]
    qmodel: nn.Module
    probe: torch.Tensor
    cosine: float


@pytest.fixture(scope="module", params=MODEL_NAMES)
def converted(request: pytest.FixtureRequest) -> Converted:
    """Build the model (seeded), settle its BatchNorms, convert at W8A8 and calibrate."""
    case = CASES[request.param]
    torch.manual_seed(0)
    shape = (4, 3, case.size, case.size)
    float_model = settle_batch_norms(case.build(), seeded_batches(4, shape, seed=1))
    before, qmodel, probe, cosine = convert_and_measure(request.param, float_model, shape)
    return Converted(case, float_model, before, qmodel, probe, cosine)


def test_float_model_is_untouched(converted: Converted) -> None:
    assert_untouched(converted.float_model, converted.before)


def test_residual_adds_and_layers_are_where_expected(converted: Converted) -> None:
    qmodel, float_model = converted.qmodel, converted.float_model
    assert count(qmodel, QuantEltwiseAdd) == converted.case.residual_adds
    assert count(qmodel, ConvertedModule) == converted.case.residual_adds
    # The handlers recurse: every conv and linear, inside the blocks too, is converted.
    assert count(qmodel, QuantConv2d) == count(float_model, nn.Conv2d)
    assert count(qmodel, QuantLinear) == count(float_model, nn.Linear)


def test_converted_model_computes_the_float_model_with_quantization_off(converted: Converted) -> None:
    assert_float_when_disabled(converted.float_model, converted.qmodel, converted.probe)


def test_calibrated_output_is_close_to_float(converted: Converted) -> None:
    assert converted.cosine >= converted.case.min_cosine, f"cosine similarity {converted.cosine:.5f}"


def test_forward_and_backward_reach_weights_and_scales(converted: Converted) -> None:
    scales = assert_trains(converted.qmodel, converted.probe)
    assert scales >= converted.case.residual_adds


def test_converted_model_deep_copies_and_pickles(converted: Converted) -> None:
    assert_copies_and_pickles(converted.qmodel, converted.probe)


def test_residual_quantization_off_leaves_blocks_float(converted: Converted) -> None:
    qmodel = convert(converted.float_model, **RESIDUAL_AND_ATTENTION_OFF)
    assert count(qmodel, QuantEltwiseAdd) == 0
    assert count(qmodel, ConvertedModule) == 0
    assert count(qmodel, QuantConv2d) == count(converted.float_model, nn.Conv2d)


# -- the other twins, on small models --------------------------------------------------------------


def _small_efficientnet() -> nn.Module:
    """An EfficientNet with FusedMBConv and MBConv stages, two blocks each (the second of
    each stage has a skip connection), with stochastic depth."""
    settings = [
        efficientnet.FusedMBConvConfig(1, 3, 1, 16, 16, 2),
        efficientnet.MBConvConfig(4, 3, 2, 16, 24, 2),
    ]
    return efficientnet.EfficientNet(settings, dropout=0.1, stochastic_depth_prob=0.2, num_classes=10, last_channel=64)


SMALL_MODELS = {  # builder, input size, minimum cosine similarity (measured: 0.9867, 0.9584, 0.9995)
    "bottleneck_resnet": (partial(resnet.ResNet, resnet.Bottleneck, [1, 1, 1, 1], num_classes=10), 32, 0.96),
    "mobilenet_v3_small": (partial(torchvision.models.mobilenet_v3_small, num_classes=10), 64, 0.90),
    "efficientnet_mbconv_fused": (_small_efficientnet, 32, 0.98),
}


def _expected_residual_adds(model: nn.Module) -> int:
    """The blocks with a skip connection, which the torchvision handlers give a residual add."""
    twins = tuple(tv_handlers._TWINS)
    return sum(getattr(m, "use_res_connect", True) for m in model.modules() if isinstance(m, twins))


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_model_twins(name: str) -> None:
    build, size, min_cosine = SMALL_MODELS[name]
    torch.manual_seed(0)
    shape = (2, 3, size, size)
    float_model = settle_batch_norms(build(), seeded_batches(2, shape, seed=1))
    qmodel = convert(float_model)
    expected = _expected_residual_adds(float_model)
    assert expected > 0
    assert count(qmodel, QuantEltwiseAdd) == expected
    probe = seeded_batches(1, shape, seed=3)[0]
    assert_float_when_disabled(float_model, qmodel, probe)
    cosine = calibrated_cosine(float_model, qmodel, seeded_batches(4, (8, *shape[1:]), seed=2), probe)
    print(f"\n{name}: W8A8 cosine similarity to float {cosine:.5f}")
    assert cosine >= min_cosine


def test_twin_without_residual_add_falls_back_to_the_float_add() -> None:
    torch.manual_seed(0)
    block = resnet.BasicBlock(8, 8).eval()
    qblock = convert(block, input=None, weight=None)
    assert isinstance(qblock, tv_handlers.QuantBasicBlock)
    qblock.residual_add = None
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(qblock(x), block(x))


def test_blocks_without_skip_connection_are_not_swapped() -> None:
    block = torchvision.models.mobilenetv2.InvertedResidual(8, 16, stride=2, expand_ratio=2)
    qblock = convert(block)
    assert type(qblock) is torchvision.models.mobilenetv2.InvertedResidual
    assert count(qblock, QuantConv2d) == 3


class _CustomBlock(resnet.BasicBlock):
    """A user's BasicBlock with its own forward: its twin would not compute it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_subclass_of_a_block_is_left_float_with_a_warning_naming_it() -> None:
    model = nn.Sequential(_CustomBlock(8, 8))
    with pytest.warns(UserWarning, match=r"overrides forward.*_CustomBlock \(subclasses BasicBlock\): 0"):
        qmodel = convert(model)
    assert type(qmodel[0]) is _CustomBlock
    assert count(qmodel, QuantConv2d) == 2
