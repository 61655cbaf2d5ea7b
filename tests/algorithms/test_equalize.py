"""Cross-layer equalization and SmoothQuant: float-preserving rewrites that make quantization easier.

The properties: the float model computes the same function afterwards; after equalization the
producer's output-channel ranges equal the consumer's input-channel ranges; pair discovery
follows only positively homogeneous per-channel ops; and the rewrites measurably reduce the
quantization error they are meant to reduce.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from quantwire.algorithms._utils import quantization_disabled
from quantwire.algorithms.equalize import (
    _consumer_ranges,
    _producer_ranges,
    _scale_inputs,
    _scale_outputs,
    equalize,
    find_equalization_pairs,
    find_smooth_quant_groups,
    smooth_quant,
)
from quantwire.core.function_wrapper import OverTensorView
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.nn import (
    QuantConv2d,
    QuantHardTanh,
    QuantIdentity,
    QuantLayerNorm,
    QuantLinear,
    QuantReLU,
)
from quantwire.quant import Int8WeightPerTensorFloat
from quantwire.quant.per_token import Int8ActDynamicPerTokenFloat


class Int8ActDynamicPerTensorFloat(Int8ActDynamicPerTokenFloat):
    """8-bit activations, one abs-max scale for the whole tensor recomputed on every call."""

    scaling_stats_input_view_shape_impl = OverTensorView


NO_QUANT = {"weight_quant": None, "bias_quant": None, "input_quant": None, "output_quant": None}


def spread_channels(model: nn.Module, generator: torch.Generator, decades: float = 2.0) -> None:
    """Scale every weight layer's output channels by 10^U(-decades, decades): ranges that differ
    by orders of magnitude, which is what per-tensor quantization handles badly."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
                out_dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
                channels = module.weight.shape[out_dim]
                factor = 10 ** ((torch.rand(channels, generator=generator) * 2 - 1) * decades)
                shape = [1] * module.weight.dim()
                shape[out_dim] = channels
                if out_dim == 1:  # transposed: weight dim 1 holds out_channels / groups
                    factor = factor[: module.weight.shape[1]]
                module.weight.mul_(factor.reshape(shape))
                if module.bias is not None:
                    module.bias.mul_(factor.repeat(_out(module) // factor.numel()))


def _out(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def float_output(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad(), quantization_disabled(model):
        return model(x)


def assert_same_function(before: Tensor, after: Tensor) -> None:
    scale = before.abs().max().clamp(min=1e-6)
    assert float((before - after).abs().max() / scale) < 1e-4


def output_range(layer: nn.Module, channel: int) -> float:
    """max |w| over what produces output ``channel`` (written out per layer kind, as a reference)."""
    w = layer.weight.detach()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # (in, out / groups, *k)
        per_group_in, per_group_out = w.shape[0] // layer.groups, w.shape[1]
        group, j = divmod(channel, per_group_out)
        return float(w[group * per_group_in : (group + 1) * per_group_in, j].abs().max())
    return float(w[channel].abs().max())


def input_range(layer: nn.Module, channel: int) -> float:
    """max |w| over what reads input ``channel``."""
    w = layer.weight.detach()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return float(w[channel].abs().max())
    groups = getattr(layer, "groups", 1)
    per_group_in, per_group_out = w.shape[1], w.shape[0] // groups
    group, k = divmod(channel, per_group_in)
    return float(w[group * per_group_out : (group + 1) * per_group_out, k].abs().max())


def assert_ranges_equal(model: nn.Module, pairs: list[tuple[str, str]], rtol: float = 1e-4) -> None:
    for producer_name, consumer_name in pairs:
        producer, consumer = model.get_submodule(producer_name), model.get_submodule(consumer_name)
        channels = _out(producer)
        r1 = torch.tensor([output_range(producer, i) for i in range(channels)])
        r2 = torch.tensor([input_range(consumer, i) for i in range(channels)])
        assert torch.allclose(r1, _producer_ranges(producer)) and torch.allclose(r2, _consumer_ranges(consumer))
        assert torch.allclose(r1, r2, rtol=rtol, atol=0), (producer, consumer, r1, r2)


# -- random small nets -------------------------------------------------------------------------


class Net(nn.Module):
    """conv -> act -> [depthwise conv -> act] -> conv(1x1) -> act -> pool -> flatten -> linear
    -> act -> linear; ``functional`` uses F.relu/torch.flatten instead of modules."""

    def __init__(
        self, c0: int, c1: int, c2: int, hidden: int, act: str, depthwise: bool, quant: bool, functional: bool
    ):
        super().__init__()
        conv = QuantConv2d if quant else nn.Conv2d
        linear = QuantLinear if quant else nn.Linear
        self.functional = functional
        self.conv1 = conv(c0, c1, 3, padding=1)
        self.act1 = make_act(act, quant)
        self.dw = conv(c1, c1 * 2, 3, padding=1, groups=c1) if depthwise else None
        self.act_dw = make_act(act, quant) if depthwise else None
        mid = c1 * 2 if depthwise else c1
        self.conv2 = conv(mid, c2, 1)
        self.act2 = make_act(act, quant)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = linear(c2, hidden)
        self.act3 = make_act(act, quant)
        self.fc2 = linear(hidden, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.conv1(x))
        if self.dw is not None:
            x = self.act_dw(self.dw(x))
        x = self.pool(self.act2(self.conv2(x)))
        x = torch.flatten(x, 1) if self.functional else self.flatten(x)
        x = self.fc1(x)
        x = F.relu(x) if self.functional else self.act3(x)
        return self.fc2(x)

    def expected_pairs(self) -> list[tuple[str, str]]:
        chain = ["conv1", *(["dw"] if self.dw is not None else []), "conv2", "fc1", "fc2"]
        return list(zip(chain, chain[1:], strict=False))


def make_act(kind: str, quant: bool) -> nn.Module:
    if kind == "relu":
        return QuantReLU() if quant else nn.ReLU()
    if kind == "leaky":
        return nn.LeakyReLU(0.1)
    return QuantIdentity() if quant else nn.Identity()


@st.composite
def nets(draw: st.DrawFn) -> tuple[Net, Tensor]:
    model = Net(
        c0=draw(st.integers(1, 3)),
        c1=draw(st.integers(1, 5)),
        c2=draw(st.integers(1, 6)),
        hidden=draw(st.integers(1, 6)),
        act=draw(st.sampled_from(["relu", "leaky", "identity"])),
        depthwise=draw(st.booleans()),
        quant=draw(st.booleans()),
        functional=draw(st.booleans()),
    )
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    for parameter in model.parameters():
        with torch.no_grad():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    spread_channels(model, generator)
    x = torch.randn(2, model.conv1.in_channels, 5, 5, generator=generator)
    return model, x


@settings(max_examples=25)
@given(nets())
def test_equalize_keeps_float_outputs(case: tuple[Net, Tensor]) -> None:
    model, x = case
    assert find_equalization_pairs(model) == model.expected_pairs()
    before = float_output(model, x)
    assert equalize(model) is model
    assert_same_function(before, float_output(model, x))


@settings(max_examples=25)
@given(nets())
def test_equalize_makes_producer_and_consumer_ranges_equal(case: tuple[Net, Tensor]) -> None:
    model, _ = case
    equalize(model, iterations=200)
    assert_ranges_equal(model, model.expected_pairs())


@pytest.mark.parametrize(
    "layers",
    [
        # grouped producer and grouped consumer
        lambda: [nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 4, 1, groups=2)],
        # transposed convolutions (output channels on weight dim 1), grouped
        lambda: [
            nn.ConvTranspose2d(4, 6, 3, groups=2),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3),
            nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 2),
        ],
        lambda: [nn.Conv1d(3, 5, 3), nn.MaxPool1d(2), nn.Conv1d(5, 5, 3, groups=5)],
        lambda: [nn.Conv3d(2, 4, 2), nn.LeakyReLU(0.2), nn.AvgPool3d(2), nn.Conv3d(4, 3, 1)],
    ],
    ids=["grouped", "transposed", "conv1d-depthwise", "conv3d"],
)
def test_equalize_other_conv_kinds(layers) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*layers())
    spread_channels(model, torch.Generator().manual_seed(1))
    first = model[0]
    spatial = {nn.Conv1d: (9,), nn.Conv3d: (6, 6, 6)}.get(type(first), (7, 7))
    x = torch.randn(2, first.in_channels, *spatial)
    weight_layers = [str(i) for i, m in enumerate(model) if isinstance(m, nn.modules.conv._ConvNd)]
    expected = list(zip(weight_layers, weight_layers[1:], strict=False))
    assert find_equalization_pairs(model) == expected
    before = model(x).detach()
    equalize(model, iterations=200)
    assert_same_function(before, model(x).detach())
    assert_ranges_equal(model, expected)


# -- pair discovery ----------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv1(x))  # y forks: conv1 can not be rescaled
        return self.conv3(F.relu(self.conv2(y))) + y


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(self.conv1(x)))))  # conv1 called twice


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # control flow on a value: fx can not trace it
            x = -x
        return self.fc2(F.relu(self.fc1(x)))


def test_pairs_follow_homogeneous_ops_through_quant_and_functional_layers() -> None:
    model = nn.Sequential(
        QuantConv2d(3, 4, 3),
        QuantReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.1),
        QuantConv2d(4, 5, 1),
        nn.PReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 6),
        QuantIdentity(),
        QuantLinear(6, 2),
    )
    assert find_equalization_pairs(model) == [("0", "4"), ("4", "8"), ("8", "10")]


def test_pairs_refuse_residual_forks() -> None:
    assert find_equalization_pairs(Residual()) == [("conv2", "conv3")]


def test_pairs_refuse_batchnorm_and_say_fold_it() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning, match="[Ff]old BatchNorm"):
        assert find_equalization_pairs(model) == []


@pytest.mark.parametrize(
    "act", [nn.ReLU6(), nn.Hardtanh(), QuantHardTanh(), nn.Sigmoid(), nn.GELU()], ids=lambda m: type(m).__name__
)
def test_pairs_refuse_clipping_and_saturating_activations(act: nn.Module) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.Conv2d(4, 4, 1))
    assert find_equalization_pairs(model) == []


def test_pairs_refuse_layout_changes_and_shared_modules() -> None:
    # a conv feeds a Linear only through flatten(1) with spatial size 1 (channel counts agree)
    no_flatten = nn.Sequential(nn.Conv1d(3, 4, 1), nn.ReLU(), nn.Linear(4, 4))
    assert find_equalization_pairs(no_flatten) == []
    big_spatial = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 9, 2))
    assert find_equalization_pairs(big_spatial) == []
    # pooling after a Linear would mix its features
    pooled_linear = nn.Sequential(nn.Linear(4, 8), nn.MaxPool1d(2), nn.Linear(4, 2))
    assert find_equalization_pairs(pooled_linear) == []
    assert find_equalization_pairs(Reused()) == []


def test_pairs_on_an_untraceable_model_ask_for_explicit_pairs() -> None:
    with pytest.raises(QuantConfigError, match="pairs="):
        find_equalization_pairs(DataDependent())
    with pytest.raises(QuantConfigError, match="pairs="):
        equalize(DataDependent())
    model = DataDependent()
    spread_channels(model, torch.Generator().manual_seed(0))
    x = torch.randn(8, 4)
    before = model(x).detach()
    equalize(model, pairs=[("fc1", "fc2")], iterations=50)
    assert_same_function(before, model(x).detach())
    assert_ranges_equal(model, [("fc1", "fc2")])


# -- the point of it ---------------------------------------------------------------------------


def weight_quant_error(model: nn.Module, x: Tensor) -> float:
    """Relative output error of the weight-quantized model against its float self."""
    with torch.no_grad():
        reference = float_output(model, x)
        quantized = model(x)
    return float((quantized - reference).norm() / reference.norm())


def test_equalize_reduces_per_tensor_weight_quant_error() -> None:
    torch.manual_seed(0)
    weight = {"weight_quant": Int8WeightPerTensorFloat}
    model = nn.Sequential(
        QuantConv2d(3, 16, 3, padding=1, **weight),
        nn.ReLU(),
        QuantConv2d(16, 16, 3, padding=1, groups=16, **weight),
        nn.ReLU(),
        QuantConv2d(16, 32, 1, **weight),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        QuantLinear(32, 10, **weight),
    ).eval()
    # Unbalance it without changing its function (what folding BatchNorm often does): every
    # channel still matters to the output, but its weight ranges now span four decades.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for producer, consumer in find_equalization_pairs(model):
            factor = 10 ** ((torch.rand(_out(model.get_submodule(producer)), generator=generator) * 2 - 1) * 2)
            _scale_outputs(model.get_submodule(producer), factor)
            _scale_inputs(model.get_submodule(consumer), 1 / factor)
    for layer in model:
        if hasattr(layer, "init_quantizers"):
            layer.init_quantizers()
    x = torch.randn(16, 3, 12, 12)
    before = weight_quant_error(model, x)
    equalize(model)
    after = weight_quant_error(model, x)
    print(f"per-tensor int8 weights, relative output error: {before:.4f} -> {after:.4f}")
    assert after < before / 5, (before, after)


# -- SmoothQuant -------------------------------------------------------------------------------


class Block(nn.Module):
    """LayerNorm -> q, k, v -> attention -> out; then fc1 -> ReLU -> fc2 (a Linear producer)."""

    def __init__(self, dim: int = 16, quant: bool = False, **linear_kwargs) -> None:
        super().__init__()
        linear = QuantLinear if quant else nn.Linear
        norm = QuantLayerNorm if quant else nn.LayerNorm
        self.ln = norm(dim)
        self.q = linear(dim, dim, **linear_kwargs)
        self.k = linear(dim, dim, **linear_kwargs)
        self.v = linear(dim, dim, **linear_kwargs)
        self.out = linear(dim, dim, **linear_kwargs)
        self.fc1 = linear(dim, 2 * dim, **linear_kwargs)
        self.fc2 = linear(2 * dim, dim, **linear_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        attention = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.out(attention @ v)
        return x + self.fc2(F.relu(self.fc1(x)))


def outlier_block(quant: bool = False, seed: int = 0, **linear_kwargs) -> Block:
    """A block whose LayerNorm output has a few channels ~50x larger than the rest (the
    activation outliers SmoothQuant is about)."""
    torch.manual_seed(seed)
    block = Block(quant=quant, **linear_kwargs)
    with torch.no_grad():
        block.ln.weight.copy_(1 + 0.1 * torch.randn(16))
        block.ln.weight[[2, 9, 13]] *= 50
        block.ln.bias.copy_(0.1 * torch.randn(16))
    return block


def calibration(n: int = 4, seed: int = 1) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 6, 16, generator=generator) for _ in range(n)]


def test_smooth_quant_groups_are_found_by_tracing() -> None:
    assert find_smooth_quant_groups(Block()) == [("ln", ["q", "k", "v"]), ("fc1", ["fc2"])]
    assert find_smooth_quant_groups(Block(quant=True)) == [("ln", ["q", "k", "v"]), ("fc1", ["fc2"])]
    # a LayerNorm that also feeds something else is not a group
    assert find_smooth_quant_groups(nn.Sequential(nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 4))) == []


@pytest.mark.parametrize("quant", [False, True], ids=["float", "quant"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8])
def test_smooth_quant_keeps_float_outputs(quant: bool, alpha: float) -> None:
    model = outlier_block(quant=quant)
    x = calibration(1, seed=7)[0]
    before = float_output(model, x)
    assert smooth_quant(model, calibration(), alpha=alpha, progress=False) is model
    assert_same_function(before, float_output(model, x))


def channel_ratio(model: nn.Module, consumer: str, data: list[Tensor]) -> float:
    """max / median of the per-channel max |x| of ``consumer``'s input."""
    maxima = []
    handle = model.get_submodule(consumer).register_forward_pre_hook(
        lambda _m, args: maxima.append(args[0].abs().reshape(-1, args[0].shape[-1]).amax(0))
    )
    with torch.no_grad(), quantization_disabled(model):
        for batch in data:
            model(batch)
    handle.remove()
    per_channel = torch.stack(maxima).amax(0)
    return float(per_channel.max() / per_channel.median())


def test_smooth_quant_flattens_the_consumer_input_channels() -> None:
    model = outlier_block()
    data = calibration()
    before = channel_ratio(model, "q", data)
    smooth_quant(model, data, alpha=0.5, progress=False)
    after = channel_ratio(model, "q", data)
    print(f"q input max/median channel ratio: {before:.1f} -> {after:.1f}")
    assert before > 20 and after < before / 4, (before, after)


def w8a8_error(model: nn.Module, data: list[Tensor]) -> float:
    with torch.no_grad():
        reference = torch.cat([float_output(model, x) for x in data])
        quantized = torch.cat([model(x) for x in data])
    return float((quantized - reference).norm() / reference.norm())


def test_smooth_quant_reduces_w8a8_per_tensor_error() -> None:
    # LayerNorm -> Linear with outlier channels; the Linear quantizes its input and weight per tensor
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantLayerNorm(64, weight_quant=None),
        QuantLinear(64, 64, input_quant=Int8ActDynamicPerTensorFloat, weight_quant=Int8WeightPerTensorFloat),
    ).eval()
    with torch.no_grad():
        model[0].weight.copy_(1 + 0.1 * torch.randn(64))
        model[0].weight[[3, 17, 40, 51]] *= 80
    generator = torch.Generator().manual_seed(2)
    data = [torch.randn(4, 32, 64, generator=generator) for _ in range(4)]
    test = [torch.randn(4, 32, 64, generator=generator) for _ in range(2)]
    assert find_smooth_quant_groups(model) == [("0", ["1"])]
    before = w8a8_error(model, test)
    smooth_quant(model, data, alpha=0.5, progress=False)
    after = w8a8_error(model, test)
    print(f"W8A8 per-tensor, relative output error: {before:.4f} -> {after:.4f}")
    assert after < before / 2.5, (before, after)


def test_smooth_quant_explicit_groups_on_an_untraceable_model() -> None:
    class Untraceable(Block):
        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:
                x = x * 1.0
            return super().forward(x)

    model = outlier_block()
    reference = Untraceable()
    reference.load_state_dict(model.state_dict())
    with pytest.raises(QuantConfigError, match="groups="):
        smooth_quant(reference, calibration(), progress=False)
    x = calibration(1, seed=7)[0]
    before = reference(x).detach()
    groups = [("ln", ["q", "k", "v"]), (reference.fc1, reference.fc2)]
    smooth_quant(reference, calibration(), groups=groups, num_batches=2, progress=False)
    assert_same_function(before, reference(x).detach())
    # same rescaling as the traced groups on the same data
    smooth_quant(model, calibration(), num_batches=2, progress=False)
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, reference.state_dict()[name], rtol=1e-6, atol=1e-7), name


def test_smooth_quant_forward_fn_and_dict_batches() -> None:
    model = outlier_block()
    calls = []

    def forward_fn(m: nn.Module, batch: dict) -> Tensor:
        calls.append(1)
        return m(batch["x"])

    data = [{"x": x} for x in calibration()]
    smooth_quant(model, data, forward_fn=forward_fn, num_batches=3, progress=False)
    assert len(calls) == 3


# -- errors ------------------------------------------------------------------------------------


def test_mismatched_pair_names_both_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(5, 2, 1))
    with pytest.raises(QuantConfigError, match=r"0 \(Conv2d\) has 4 output channels.*2 \(Conv2d\) has 5 input"):
        equalize(model, pairs=[("0", "2")])


def test_equalize_argument_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(QuantConfigError, match="ReLU"):
        equalize(model, pairs=[("0", "1")])
    with pytest.raises(QuantConfigError, match="no sub-module named 'nope'"):
        equalize(model, pairs=[("0", "nope")])
    with pytest.raises(QuantConfigError, match="same layer"):
        equalize(model, pairs=[("0", "0")])
    with pytest.raises(QuantConfigError, match="iterations"):
        equalize(model, iterations=0)
    with pytest.raises(QuantConfigError, match="pair is"):
        equalize(model, pairs=["0"])


def test_smooth_quant_argument_errors() -> None:
    model = outlier_block()
    data = calibration()
    with pytest.raises(QuantConfigError, match="alpha"):
        smooth_quant(model, data, alpha=1.5, progress=False)
    with pytest.raises(QuantConfigError, match="consumer ln of fc1 is a LayerNorm; consumers must be Linear"):
        smooth_quant(model, data, groups=[("fc1", ["ln"])], progress=False)
    with pytest.raises(QuantConfigError, match=r"fc1 \(Linear\) produces 32 channels but q \(Linear\) reads 16"):
        smooth_quant(model, data, groups=[("fc1", ["q"])], progress=False)
    with pytest.raises(QuantConfigError, match="more than one group"):
        smooth_quant(model, data, groups=[("ln", ["q"]), ("ln", ["q"])], progress=False)
    with pytest.raises(QuantInputError, match="no batches"):
        smooth_quant(model, [], progress=False)
    with pytest.raises(QuantInputError, match="NaN"):
        smooth_quant(model, [torch.full((1, 2, 16), float("nan"))], progress=False)

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.ln(x)

    with pytest.raises(QuantInputError, match="fc was not called"):
        smooth_quant(Skips(), [torch.randn(2, 4)], groups=[("ln", ["fc"])], progress=False)


def test_equalize_rebuilds_weight_quantizers() -> None:
    model = nn.Sequential(QuantLinear(4, 8, **{**NO_QUANT, "weight_quant": Int8WeightPerTensorFloat}), nn.ReLU())
    model.append(QuantLinear(8, 2))
    spread_channels(model, torch.Generator().manual_seed(0))
    for layer in (model[0], model[2]):
        layer.init_quantizers()
    equalize(model)
    for layer in (model[0], model[2]):
        quant = layer.quant_weight()
        assert torch.allclose(quant.scale, layer.weight.abs().max() / 127, rtol=1e-6)


def test_no_warnings_on_a_clean_model() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_equalization_pairs(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)))
