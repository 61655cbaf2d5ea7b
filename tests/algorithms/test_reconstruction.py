"""Reconstruction PTQ: QDrop's per-element drop, learned rounding composed onto weight quantizers,
AdaRound, block discovery, BRECQ and QDrop.

QDrop leaves a fraction ``p`` of activation elements unquantized in training mode (none in eval).
``use_learned_rounding`` keeps a quantizer's bit width and scale and starts at round to nearest
(ties up), and refuses minifloat weights. AdaRound lowers every layer's reconstruction error and
ends with weights on the grid; ``find_blocks`` finds torchvision residual blocks, marked blocks and
the layers left over; BRECQ lowers block errors; QDrop learns activation scales, deterministically
for a seed. Bad arguments raise quantwire's errors.
"""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from quantwire.algorithms import (
    adaround,
    brecq,
    calibrate,
    find_blocks,
    mark_block,
    qdrop,
    reconstruct,
    use_learned_rounding,
)
from quantwire.core.quant import AdaRoundRounding, LearnedRoundIntQuant
from quantwire.core.stats import ParameterFromRuntimeStats
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.examples.digits import DigitsCNN
from quantwire.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from quantwire.quant import (
    Fp8e4m3WeightPerTensorFloat,
    Int4WeightPerChannelFloat,
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from quantwire.quant.ptq import Int8ActQDrop
from quantwire.quant.qat import Int4WeightPerChannelLsq


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def weight_codes(layer) -> Tensor:
    """The integers ``k`` of the layer's quantized weight ``scale * k`` (symmetric quantizers)."""
    quant = layer.quant_weight()
    return torch.round(quant.value / quant.scale).detach()


def on_grid(layer) -> bool:
    """Whether the layer's quantized weight is ``scale * k`` with integer ``k`` in the signed narrow
    range (re-quantizing with its own scale is the identity: ``value / scale`` itself may be an ulp
    off an integer)."""
    quant = layer.quant_weight()
    k = weight_codes(layer)
    limit = 2 ** (int(quant.bit_width) - 1) - 1
    return torch.equal(k * quant.scale, quant.value) and float(k.abs().max()) <= limit


def roundings(model: nn.Module) -> list[AdaRoundRounding]:
    return [m for m in model.modules() if isinstance(m, AdaRoundRounding)]


def act_values(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: module.value.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, ParameterFromRuntimeStats)
    }


# ---------------------------------------------------------------------------------------------
# QDrop in the activation proxy


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_quant_drop_leaves_a_fraction_p_unquantized_in_training(p):
    layer = QuantIdentity(act_quant=Int8ActQDrop, quant_drop_prob=p)
    assert layer.act_quant.quant_drop_prob == p
    calibrate(layer, [torch.randn(64, 64)], progress=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(250, 400, generator=generator)
    layer.eval()
    with torch.no_grad():
        quantized = layer(x)
    changed = quantized != x
    assert float(changed.float().mean()) > 0.99  # almost every element moves when quantized

    layer.train()
    torch.manual_seed(1)
    with torch.no_grad():
        out = layer(x)
    kept_float = (out == x) & changed
    assert torch.equal(out[~kept_float], quantized[~kept_float])
    n = int(changed.sum())
    fraction = float(kept_float.sum()) / n
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(fraction - p) <= 5 * sigma + 1e-12

    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), quantized)  # never in eval


def test_quant_drop_prob_out_of_range_is_refused():
    with pytest.raises(QuantConfigError, match="quant_drop_prob"):
        QuantIdentity(act_quant=Int8ActQDrop, quant_drop_prob=1.5)


# ---------------------------------------------------------------------------------------------
# use_learned_rounding


def make_layer(kind: str, quant, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "linear":
        return QuantLinear(24, 6, weight_quant=quant)
    return QuantConv2d(3, 5, 3, weight_quant=quant)


WEIGHT_QUANTS = pytest.mark.parametrize(
    "quant",
    [Int8WeightPerTensorFloat, Int8WeightPerChannelFloat, Int4WeightPerChannelFloat],
    ids=["int8_per_tensor", "int8_per_channel", "int4_per_channel"],
)


@WEIGHT_QUANTS
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_learned_rounding_starts_at_round_to_nearest(quant, kind):
    layer = make_layer(kind, quant)
    layer.eval()
    before = layer.quant_weight()
    y = layer.weight.detach() / before.scale
    ties = (y - torch.floor(y)) == 0.5
    assert not bool(ties.any())  # random weights: no exact ties (see the test below for those)

    use_learned_rounding(layer)
    tensor_quant = layer.weight_quant.tensor_quant
    assert isinstance(tensor_quant.int_quant, LearnedRoundIntQuant)
    assert isinstance(tensor_quant.int_quant.float_to_int_impl, AdaRoundRounding)
    assert tensor_quant.int_quant.float_to_int_impl.value.shape == layer.weight.shape
    after = layer.quant_weight()
    assert torch.equal(after.value, before.value)
    assert torch.equal(after.scale, before.scale)
    assert torch.equal(after.bit_width, before.bit_width)
    assert after.is_valid

    # Idempotent, and the layer still pickles (the quantizer is composed with .let).
    use_learned_rounding(layer)
    assert layer.weight_quant.tensor_quant is tensor_quant
    clone = pickle.loads(pickle.dumps(layer))
    clone.eval()
    assert torch.equal(clone.quant_weight().value, after.value)


def test_learned_rounding_rounds_exact_ties_up():
    layer = QuantLinear(4, 1, bias=False, weight_quant=Int8WeightPerTensorFloat)
    with torch.no_grad():  # abs-max 63.5: scale exactly 0.5; 1.25 and -1.25 are ties at +-2.5
        layer.weight.copy_(torch.tensor([[63.5, 1.25, -1.25, 0.3]]))
    layer.eval()
    before = layer.quant_weight()
    assert float(before.scale.detach()) == 0.5
    use_learned_rounding(layer)
    after = layer.quant_weight()
    assert (before.value / 0.5).tolist() == [[127.0, 2.0, -2.0, 1.0]]  # round half to even
    assert (after.value / 0.5).tolist() == [[127.0, 3.0, -2.0, 1.0]]  # round half up


def test_learned_rounding_keeps_a_learned_weight_scale():
    """A QAT-trained (LSQ) weight scale must survive the switch to learned rounding."""
    layer = make_layer("linear", Int4WeightPerChannelLsq)
    with torch.no_grad():
        layer.weight_quant.tensor_quant.scaling_impl.value.mul_(0.8)  # what training did
    layer.eval()
    before = layer.quant_weight()
    use_learned_rounding(layer)
    after = layer.quant_weight()
    assert torch.equal(after.scale, before.scale)
    assert torch.equal(after.value, before.value)


def test_learned_rounding_refuses_minifloat_weights_and_missing_quantizers():
    with pytest.raises(QuantConfigError, match="integer weight quantizer"):
        use_learned_rounding(QuantLinear(8, 4, weight_quant=Fp8e4m3WeightPerTensorFloat))
    with pytest.raises(QuantConfigError):
        use_learned_rounding(QuantLinear(8, 4, weight_quant=None))


# ---------------------------------------------------------------------------------------------
# AdaRound


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            inp=QuantIdentity(act_quant=Int8ActPerTensorFloat),
            fc1=QuantLinear(16, 32, weight_quant=Int4WeightPerChannelFloat),
            relu=QuantReLU(act_quant=Uint8ActPerTensorFloat),
            fc2=QuantLinear(32, 8, weight_quant=Int4WeightPerChannelFloat),
        )
    )


def correlated_batches(count: int = 4, seed: int = 1) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=generator)
    return [torch.randn(64, 16, generator=generator) @ mix for _ in range(count)]


def test_adaround_lowers_every_layers_error_and_ends_on_the_grid():
    model = mlp()
    data = correlated_batches()
    calibrate(model, data, progress=False)
    model.train()  # the modules' modes are restored afterwards
    modules = list(model.modules())
    results = adaround(model, data, iters=200, lr=1e-2, progress=False)
    assert [r.name for r in results] == ["fc1", "fc2"]
    for result in results:
        assert result.error_after < result.error_before, result
    assert all(module.training for module in modules)
    model.eval()
    assert len(roundings(model)) == 2
    for layer in (model.fc1, model.fc2):
        assert on_grid(layer)
    # The learned rounding is hard: each weight is floor(w / s) or floor(w / s) + 1 times s.
    for layer in (model.fc1, model.fc2):
        k = weight_codes(layer)
        floor = torch.floor(layer.weight.detach() / layer.quant_weight().scale)
        assert bool(((k == floor) | (k == floor + 1) | (k.abs() == 7)).all())


def test_adaround_restricted_by_pattern():
    model = mlp()
    data = correlated_batches(2)
    results = adaround(model, data, layers=["fc2"], iters=5, progress=False)
    assert [r.name for r in results] == ["fc2"]
    assert len(roundings(model)) == 1


# ---------------------------------------------------------------------------------------------
# Blocks and BRECQ


def quantize_resnet_layers(module: nn.Module) -> None:
    """Every float Conv2d/Linear below ``module`` replaced by its 4-bit per-channel quant twin."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and not isinstance(child, QuantConv2d):
            setattr(module, name, QuantConv2d.from_float(child, weight_quant=Int4WeightPerChannelFloat))
        elif isinstance(child, nn.Linear) and not isinstance(child, QuantLinear):
            setattr(module, name, QuantLinear.from_float(child, weight_quant=Int4WeightPerChannelFloat))
        else:
            quantize_resnet_layers(child)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = QuantIdentity(act_quant=Int8ActPerTensorFloat)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=downsample))
        self.extra = mark_block(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.extra(self.layer1(self.stem(self.inp(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_resnet(float_block: bool = False) -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    float_part = model.layer1[0] if float_block else None
    if float_block:
        model.layer1[0] = nn.Identity()
    quantize_resnet_layers(model)
    if float_block:
        model.layer1[0] = float_part  # a BasicBlock without weight quantizers: not a block
    model.eval()
    return model


def image_batches(count: int = 4, seed: int = 1) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=generator) for _ in range(count)]


def test_find_blocks_finds_residual_blocks_marked_blocks_and_leftover_layers():
    model = tiny_resnet()
    blocks = find_blocks(model)
    assert [name for name, _ in blocks] == ["layer1.0", "layer1.1", "extra", "stem.0", "fc"]
    assert isinstance(blocks[0][1], BasicBlock) and isinstance(blocks[1][1], BasicBlock)
    assert blocks[2][1] is model.extra
    assert isinstance(blocks[3][1], QuantConv2d) and isinstance(blocks[4][1], QuantLinear)

    partly_float = tiny_resnet(float_block=True)
    assert [name for name, _ in find_blocks(partly_float)] == ["layer1.1", "extra", "stem.0", "fc"]
    assert [name for name, _ in find_blocks(model, block_types=[])] == [
        "extra",
        "stem.0",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
        "layer1.1.downsample.0",
        "fc",
    ]


def test_brecq_lowers_block_errors_on_a_residual_model():
    model = tiny_resnet()
    data = image_batches()
    results = brecq(model, data, iters=200, lr=1e-2, progress=False)
    assert [r.name for r in results] == ["stem.0", "layer1.0", "layer1.1", "extra", "fc"]  # execution order
    for result in results:
        assert result.error_after < result.error_before, result
    assert len(roundings(model)) == 8
    for module in model.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            assert on_grid(module)


# ---------------------------------------------------------------------------------------------
# QDrop


def digits_model() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN(
        weight_quant=Int4WeightPerChannelFloat, act_quant=Uint8ActPerTensorFloat, input_quant=Int8ActPerTensorFloat
    )


def digit_batches(count: int = 3) -> list[Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.rand(16, 1, 8, 8, generator=generator) for _ in range(count)]


def test_qdrop_learns_activation_scales_deterministically():
    data = digit_batches()
    model = digits_model()
    calibrate(model, data, progress=False)
    calibrated = act_values(model)
    twin, other_seed = copy.deepcopy(model), copy.deepcopy(model)
    blocks = ["features.stage1", "features.stage2"]

    results = qdrop(model, data, blocks=blocks, iters=60, lr=1e-2, act_lr=1e-3, progress=False)
    assert [r.name for r in results] == blocks
    learned = act_values(model)
    inside = [name for name in learned if name.startswith("features.")]
    outside = [name for name in learned if not name.startswith("features.")]
    assert inside and outside
    for name in inside:
        assert not torch.equal(learned[name], calibrated[name]), name
    for name in outside:
        assert torch.equal(learned[name], calibrated[name]), name

    qdrop(twin, data, blocks=blocks, iters=60, lr=1e-2, act_lr=1e-3, progress=False)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    qdrop(other_seed, data, blocks=blocks, iters=60, lr=1e-2, act_lr=1e-3, seed=1, progress=False)
    pairs = zip(model.state_dict().values(), other_seed.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # the seed matters: the check above is not vacuous


# ---------------------------------------------------------------------------------------------
# Bad arguments


def test_bad_arguments_raise():
    data = correlated_batches(2)
    with pytest.raises(QuantConfigError, match="iters"):
        reconstruct(mlp(), data, iters=0, progress=False)
    with pytest.raises(QuantConfigError, match="drop_prob"):
        qdrop(mlp(), data, drop_prob=2.0, progress=False)
    with pytest.raises(QuantConfigError, match="drop_prob"):
        reconstruct(mlp(), data, drop_prob=-0.1, progress=False)
    with pytest.raises(QuantInputError, match="nope"):
        brecq(mlp(), data, blocks=["nope"], iters=2, progress=False)
    with pytest.raises(QuantConfigError):
        adaround(mlp(), data, layers=["conv*"], iters=2, progress=False)
    with pytest.raises(QuantConfigError):
        reconstruct(nn.Sequential(nn.Linear(16, 4)), data, iters=2, progress=False)
    with pytest.raises(QuantInputError):
        adaround(mlp(), [], iters=2, progress=False)
