"""fold_batch_norms: Conv -> BatchNorm pairs found (torch.fx, or the Sequential / convN-bnN
patterns) and replaced by QuantConvBn2d + Identity, alone or through quantize_model.

Outputs of the folded ResNet and of its ``fold_into_convs`` twin, and of a model reloaded from
its state dict, are compared with ``torch.equal``: the same float operations on the same
tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18

from quantwire.convert import Override, QuantConfig, TensorQuant, quantize_model
from quantwire.convert.fold_bn import find_conv_bn_pairs, fold_batch_norms, fold_into_convs
from quantwire.errors import QuantConfigError
from quantwire.nn import QuantConv2d
from quantwire.nn.fused import QuantConvBn1d, QuantConvBn2d

FOLD = QuantConfig(fold_bn=True)


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet18(num_classes=10)


def tiny_batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 10, (4,), generator=generator)


def train(model: nn.Module, steps: int) -> list[float]:
    """A few SGD steps on one fixed random batch; the losses."""
    x, y = tiny_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def expected_resnet18_pairs() -> list[tuple[str, str]]:
    pairs = [("conv1", "bn1")]
    for layer in range(1, 5):
        for block in range(2):
            prefix = f"layer{layer}.{block}."
            pairs += [(prefix + "conv1", prefix + "bn1"), (prefix + "conv2", prefix + "bn2")]
            if layer > 1 and block == 0:
                pairs.append((prefix + "downsample.0", prefix + "downsample.1"))
    return pairs


def assert_no_active_batch_norm(model: nn.Module) -> None:
    """Every BatchNorm left is the ``bn`` of a folded layer."""
    inside_fused = {id(m.bn) for m in model.modules() if isinstance(m, QuantConvBn2d)}
    loose = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in inside_fused]
    assert loose == []


# -- ResNet-18 ----------------------------------------------------------------------------------------


def test_resnet18_all_pairs_folded_by_quantize_model() -> None:
    model = tiny_resnet()
    assert sorted(find_conv_bn_pairs(model)) == sorted(expected_resnet18_pairs())
    qmodel = quantize_model(model, FOLD)
    for conv_name, bn_name in expected_resnet18_pairs():
        assert isinstance(qmodel.get_submodule(conv_name), QuantConvBn2d)
        assert isinstance(qmodel.get_submodule(bn_name), nn.Identity)
    assert sum(isinstance(m, QuantConvBn2d) for m in qmodel.modules()) == 20
    assert_no_active_batch_norm(qmodel)
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the float model is left alone


def test_resnet18_qat_trains_and_eval_equals_folded_convs() -> None:
    qmodel = quantize_model(tiny_resnet(), FOLD)
    losses = train(qmodel, steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in qmodel.layer1[0].conv1.bn.parameters())
    qmodel.eval()
    exported = copy.deepcopy(qmodel)
    assert len(fold_into_convs(exported)) == 20
    assert not any(isinstance(m, QuantConvBn2d | nn.BatchNorm2d) for m in exported.modules())
    assert type(exported.layer2[0].downsample[0]) is QuantConv2d
    x, _ = tiny_batch()
    with torch.no_grad():
        assert torch.equal(qmodel(x), exported(x))


def test_resnet18_state_dict_round_trip_is_bit_identical() -> None:
    config = QuantConfig(fold_bn=True, freeze_bn_step=2)
    qmodel = quantize_model(tiny_resnet(), config)
    train(qmodel, steps=3)  # past freeze_bn_step: the frozen flags are state too
    restored = quantize_model(tiny_resnet(seed=7), config)
    restored.load_state_dict(qmodel.state_dict())
    assert restored.conv1.bn_stats_frozen
    qmodel.eval()
    restored.eval()
    x, _ = tiny_batch()
    with torch.no_grad():
        assert torch.equal(qmodel(x), restored(x))


# -- which pairs --------------------------------------------------------------------------------------


class _Untraceable(nn.Module):
    """A ResNet whose forward branches on a tensor value, which torch.fx can not trace."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_resnet()

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            x = -x
        return self.net(x)


def test_untraceable_model_falls_back_to_patterns() -> None:
    model = _Untraceable()
    expected = [(f"net.{conv}", f"net.{bn}") for conv, bn in expected_resnet18_pairs()]
    assert sorted(find_conv_bn_pairs(model)) == sorted(expected)
    assert len(fold_batch_norms(model, FOLD)) == 20
    assert_no_active_batch_norm(model)


class _ConvUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _ReluBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.relu(self.conv(x)))


@pytest.mark.parametrize("model_cls", [_ConvUsedTwice, _ReluBetween])
def test_conv_output_used_elsewhere_is_not_folded(model_cls: type[nn.Module]) -> None:
    """The ``conv``/``bn`` names match the fallback pattern, but the traced graph says no."""
    assert fold_batch_norms(model_cls(), FOLD) == []


def test_shared_conv_is_not_folded() -> None:
    conv = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3))
    assert find_conv_bn_pairs(model) == []


def test_direct_call_with_default_config_and_conv1d() -> None:
    as_1d = nn.Sequential(nn.Flatten(2), nn.Conv1d(4, 2, 1), nn.BatchNorm1d(2))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), as_1d)
    assert fold_batch_norms(model) == [("0", "1"), ("3.1", "3.2")]
    assert isinstance(model[0], QuantConvBn2d) and isinstance(model[3][1], QuantConvBn1d)
    assert isinstance(model[2], nn.ReLU)  # a ReLU stays a separate module
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 2, 16)


def test_config_skip_and_freeze_bn_step() -> None:
    config = QuantConfig(fold_bn=True, freeze_bn_step=5, overrides=[Override(name="layer1.*", skip=True)])
    model = tiny_resnet()
    folded = fold_batch_norms(model, config)
    assert len(folded) == 16 and not any(name.startswith("layer1.") for name, _ in folded)
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d) and type(model.layer1[0].conv1) is nn.Conv2d
    assert model.conv1.freeze_bn_step == 5


def test_per_layer_quantizers_come_from_the_config() -> None:
    config = QuantConfig(
        fold_bn=True, input=None, overrides=[Override(name="0", weight=TensorQuant(bit_width=4, granularity="tensor"))]
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    fold_batch_norms(model, config)
    assert model[0].input_quant is None
    assert int(model[0].quant_weight().bit_width) == 4 and model[0].quant_weight().scale.numel() == 1
    assert int(model[2].quant_weight().bit_width) == 8 and model[2].quant_weight().scale.numel() == 4


def test_batch_norm_without_running_stats_is_left_with_a_warning() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.warns(UserWarning, match="1: a BatchNorm without running statistics"):
        assert fold_batch_norms(model, FOLD) == []


def test_config_errors_name_the_layer() -> None:
    config = QuantConfig(fold_bn=True, input=None, bias=TensorQuant(bit_width=32))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(QuantConfigError, match=r"^0 \(folding 1\): 0: an integer bias"):
        fold_batch_norms(model, config)
