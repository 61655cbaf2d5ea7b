"""quantize_model on torch.nn building blocks: what is converted, what is left alone, and the
float model staying untouched."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import quantwire
from quantwire.convert import Conversion, QuantConfig, TensorQuant, register_handler
from quantwire.convert.registry import _HANDLERS
from quantwire.errors import QuantConfigError
from quantwire.nn import (
    QuantActivation,
    QuantAdaptiveAvgPool2d,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantEltwiseAdd,
    QuantEmbedding,
    QuantLayerNorm,
    QuantLinear,
    QuantMaxPool2d,
    QuantMultiheadAttention,
)
from quantwire.nn.base import QuantLayer


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.act = nn.GELU()
        self.image = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.ConvTranspose2d(4, 4, 2, stride=2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(20, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens))
        h, _ = self.attn(h, h, h)
        h = self.act(self.conv1d(h.transpose(1, 2))).mean(dim=2)
        g = self.pool(self.image(image)).flatten(1)
        return self.head(torch.cat([h, g], dim=1))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (2, 6), generator=generator), torch.randn(2, 1, 8, 8, generator=generator)


def test_every_torch_nn_kind_is_converted_and_the_float_model_is_untouched():
    torch.manual_seed(0)
    model = Zoo().eval()
    before = copy.deepcopy(model.state_dict())
    config = QuantConfig(activation=TensorQuant(bit_width=8), norm=TensorQuant(bit_width=8))
    qmodel = quantwire.quantize_model(model, config)
    expected = {
        "embed": QuantEmbedding,
        "norm": QuantLayerNorm,
        "attn": QuantMultiheadAttention,
        "conv1d": QuantConv1d,
        "act": QuantActivation,
        "image.0": QuantConv2d,
        "image.1": QuantActivation,
        "image.2": QuantMaxPool2d,
        "image.3": QuantConvTranspose2d,
        "pool": QuantAdaptiveAvgPool2d,
        "head": QuantLinear,
    }
    modules = dict(qmodel.named_modules())
    for name, cls in expected.items():
        assert isinstance(modules[name], cls), name
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # ReLU's output quantizer is unsigned by default; GELU's is signed
    assert modules["image.1"].act_quant.signed is False and modules["act"].act_quant.signed is True
    quantwire.calibrate(qmodel, [inputs()], progress=False, forward_fn=lambda m, batch: m(*batch))
    with torch.no_grad():
        output, reference = qmodel(*inputs()), model(*inputs())
    assert torch.nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0) > 0.99


def test_defaults_leave_activations_norms_and_pooling_float():
    qmodel = quantwire.quantize_model(Zoo())
    assert type(qmodel.act) is nn.GELU and type(qmodel.norm) is nn.LayerNorm
    assert type(qmodel.pool) is nn.AdaptiveAvgPool2d and type(qmodel.image[1]) is nn.ReLU


def test_the_converted_model_keeps_the_training_mode_trains_and_pickles():
    model = Zoo().train()
    qmodel = quantwire.quantize_model(model)
    assert qmodel.training and all(m.training for m in qmodel.modules())
    qmodel(*inputs()).square().mean().backward()
    assert qmodel.head.weight.grad is not None
    restored = pickle.loads(pickle.dumps(qmodel.eval()))
    with torch.no_grad():
        assert torch.equal(restored(*inputs()), qmodel(*inputs()))


def test_converting_a_converted_model_changes_nothing():
    qmodel = quantwire.quantize_model(Zoo())
    again = quantwire.quantize_model(qmodel, QuantConfig(weight=TensorQuant(bit_width=3)))
    assert int(again.head.quant_weight().bit_width) == 8
    assert [type(m) for m in again.modules()] == [type(m) for m in qmodel.modules()]


def test_a_bare_layer_is_converted_too():
    qlayer = quantwire.quantize_model(nn.Linear(4, 2))
    assert isinstance(qlayer, QuantLinear)


def test_an_integer_bias_needs_a_quantized_input():
    with pytest.raises(QuantConfigError, match="head: an integer bias"):
        quantwire.quantize_model(_Head(), QuantConfig(bias=TensorQuant(bit_width=32), input=None))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)


class Residual(nn.Module):
    """A user block: ``x + f(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class QuantResidual(quantwire.convert.ConvertedModule, Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.f(x))


def test_a_user_registers_a_handler_for_their_own_block():
    @register_handler(Residual, recurse=True)
    def convert_residual(block: Residual, conversion: Conversion) -> nn.Module:
        block.add = conversion.residual_add()
        block.__class__ = QuantResidual
        return block

    try:
        model = nn.Sequential(Residual(), Residual())
        qmodel = quantwire.quantize_model(model)
        assert all(isinstance(block, QuantResidual) for block in qmodel)
        assert all(isinstance(block.add, QuantEltwiseAdd) and isinstance(block.f, QuantLinear) for block in qmodel)
        assert all(type(block) is Residual for block in model)
        x = torch.randn(3, 8)
        quantwire.calibrate(qmodel, [x], progress=False)
        with torch.no_grad():
            assert torch.allclose(qmodel(x), model(x), atol=0.1)
    finally:
        del _HANDLERS[Residual]


def test_a_handler_registration_names_a_type():
    with pytest.raises(QuantConfigError, match="neither a class nor a dotted class name"):
        register_handler(42)(lambda module, conversion: None)


class TiedLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 30, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def test_tied_weights_stay_tied_through_conversion_and_training():
    qmodel = quantwire.quantize_model(TiedLanguageModel())
    assert qmodel.head.weight is qmodel.embed.weight
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    qmodel(torch.randint(0, 30, (2, 5))).square().mean().backward()
    optimizer.step()
    assert qmodel.head.weight is qmodel.embed.weight
    assert len(list(qmodel.parameters())) == len({id(p) for p in qmodel.parameters()})


class LinearWithItsOwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).relu()


def test_a_subclass_with_its_own_forward_is_left_float_with_a_warning():
    model = nn.Sequential(LinearWithItsOwnForward(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"LinearWithItsOwnForward \(subclasses Linear\): 0"):
        qmodel = quantwire.quantize_model(model)
    assert type(qmodel[0]) is LinearWithItsOwnForward and isinstance(qmodel[1], QuantLinear)
