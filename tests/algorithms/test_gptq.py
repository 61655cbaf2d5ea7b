"""GPTQ and the weight-grid freezing it relies on.

freeze_weight_quantizer: the quantized weight is bit-identical afterwards, and an edited weight
stays on the frozen grid. GPTQ: beats round-to-nearest on correlated inputs, lands exactly on
the layer's grid (per tensor, per channel, per group, asymmetric, power of two), equals
round-to-nearest when the input Hessian is diagonal, handles act_order, grouped and depthwise
convolutions (against the equivalent Linear on unfolded inputs) and is deterministic.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantwire.algorithms._utils import capture
from quantwire.algorithms.freeze import freeze_weight_quantizer, quantize_weight_tensors
from quantwire.algorithms.gptq import gptq, gptq_quantize_matrix, input_hessian
from quantwire.core.scaling import ParameterScaling
from quantwire.core.zero_point import ParameterZeroPoint
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.nn import QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLinear
from quantwire.quant import (
    Fp8e4m3WeightPerTensorFloat,
    Int4WeightPerChannelFloat,
    Int4WeightPerGroupFloat,
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFixedPoint,
    Int8WeightPerTensorFloat,
    Int32Bias,
    ShiftedUint8WeightPerTensorFloat,
    SignedBinaryWeightPerTensorConst,
)

gptq_module = importlib.import_module("quantwire.algorithms.gptq")  # the module, not the function it exports

# name -> (quantizer, extra layer kwargs); every one has an integer grid.
GRIDS = {
    "per_tensor_int8": (Int8WeightPerTensorFloat, {}),
    "per_channel_int4": (Int4WeightPerChannelFloat, {}),
    "per_group_int4": (Int4WeightPerGroupFloat, {"weight_group_size": 8}),
    "shifted_uint4": (ShiftedUint8WeightPerTensorFloat, {"weight_bit_width": 4}),
    "shifted_uint4_per_channel": (
        ShiftedUint8WeightPerTensorFloat,
        {"weight_bit_width": 4, "weight_scaling_per_output_channel": True},
    ),
    "fixed_point_per_channel_int4": (Int8WeightPerChannelFixedPoint, {"weight_bit_width": 4}),
}

RATIOS: dict[str, list[float]] = {}  # measured GPTQ / RTN output MSE, printed with -s


def make_linear(grid: str, in_features: int = 32, out_features: int = 16, seed: int = 0, **kwargs) -> QuantLinear:
    quant, extra = GRIDS[grid]
    torch.manual_seed(seed)
    return QuantLinear(in_features, out_features, weight_quant=quant, **extra, **kwargs)


def correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs whose features are strongly correlated (a random mixing of a few sources)."""
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randn(rows, features, generator=generator)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    mixing += 0.9 * torch.randn(1, features, generator=generator)  # a shared component
    return sources @ mixing


def quantized_weight(layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return layer.weight_quant.fake_quant(layer.weight).clone()


def assert_on_grid(layer: nn.Module) -> None:
    """The layer's fake-quantized weight equals its weight and every code is an in-range integer."""
    scale, zero_point, low, high = quantize_weight_tensors(layer)
    weight = layer.weight.detach()
    assert torch.equal(quantized_weight(layer), weight)
    codes = weight / scale + zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert bool((codes.round() >= low).all()) and bool((codes.round() <= high).all())


def output_mse(weight: torch.Tensor, reference: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ reference.T) ** 2).mean())


# -- freeze_weight_quantizer ---------------------------------------------------------------------


@settings(max_examples=25)
@given(
    grid=st.sampled_from(sorted(GRIDS)),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
    edit=st.floats(0.0, 3.0),
)
def test_freeze_is_bit_identical_and_edits_stay_on_grid(grid: str, conv: bool, seed: int, edit: float) -> None:
    quant, extra = GRIDS[grid]
    torch.manual_seed(seed)
    if conv:
        layer = QuantConv2d(16, 8, 3, groups=2, weight_quant=quant, **extra)
    else:
        layer = QuantLinear(16, 8, weight_quant=quant, **extra)
    before = layer.weight_quant(layer.weight)
    freeze_weight_quantizer(layer)
    after = layer.weight_quant(layer.weight)
    assert isinstance(layer.weight_quant.tensor_quant.scaling_impl, ParameterScaling)
    for name in ("value", "scale", "zero_point", "bit_width"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name
    # Edit the weight (including past the old range): the grid does not move.
    with torch.no_grad():
        layer.weight.add_(edit * torch.randn_like(layer.weight) * layer.weight.abs().max())
    edited = layer.weight_quant(layer.weight)
    assert torch.equal(edited.scale, before.scale)
    assert torch.equal(edited.zero_point, before.zero_point)
    scale, zero_point, low, high = quantize_weight_tensors(layer)
    codes = edited.value / scale + zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert bool((codes.round() >= low).all()) and bool((codes.round() <= high).all())
    assert torch.equal(layer.weight_quant(edited.value).value, edited.value)  # on the grid: a fixed point


def test_freeze_keeps_the_zero_point_of_asymmetric_weights() -> None:
    layer = make_linear("shifted_uint4_per_channel")
    with torch.no_grad():
        layer.weight.add_(0.1)  # a range far from symmetric: zero points away from the middle
    before = layer.weight_quant(layer.weight)
    freeze_weight_quantizer(layer)
    assert isinstance(layer.weight_quant.tensor_quant.zero_point_impl, ParameterZeroPoint)
    after = layer.weight_quant(layer.weight)
    assert torch.equal(after.zero_point, before.zero_point) and torch.equal(after.value, before.value)
    assert bool((before.zero_point != 0).any())


def test_freeze_power_of_two_scales_stay_powers_of_two() -> None:
    layer = make_linear("fixed_point_per_channel_int4")
    freeze_weight_quantizer(layer)
    with torch.no_grad():
        layer.weight.mul_(1.7)
    scale = layer.weight_quant(layer.weight).scale
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)


def test_freeze_is_bit_identical_in_float64_and_idempotent() -> None:
    torch.manual_seed(1)
    layer = QuantLinear(24, 6, weight_quant=Int4WeightPerGroupFloat, weight_group_size=8, dtype=torch.float64)
    before = quantized_weight(layer)
    freeze_weight_quantizer(layer)
    freeze_weight_quantizer(layer)
    assert layer.weight_quant.tensor_quant.scaling_impl.value.dtype == torch.float64
    assert torch.equal(quantized_weight(layer), before)


def test_frozen_grid_lives_in_the_state_dict() -> None:
    layer = make_linear("per_channel_int4")
    freeze_weight_quantizer(layer)
    with torch.no_grad():
        layer.weight_quant.tensor_quant.scaling_impl.value.mul_(2.0)  # a grid of its own
    state = copy.deepcopy(layer.state_dict())
    assert "weight_quant.tensor_quant.scaling_impl.value" in state
    other = make_linear("per_channel_int4", seed=5)
    freeze_weight_quantizer(other)
    other.load_state_dict(state)
    assert torch.equal(quantized_weight(other), quantized_weight(layer))


@pytest.mark.parametrize("quant", [SignedBinaryWeightPerTensorConst, Fp8e4m3WeightPerTensorFloat])
def test_freeze_refuses_quantizers_without_an_integer_grid(quant: type) -> None:
    layer = QuantLinear(8, 4, weight_quant=quant)
    with pytest.raises(QuantConfigError, match=f"QuantLinear.weight_quant={quant.__name__}"):
        freeze_weight_quantizer(layer)
    with pytest.raises(QuantConfigError, match=quant.__name__):
        gptq(nn.Sequential(layer), [torch.randn(4, 8)], progress=False)


def test_freeze_refuses_shared_quantizers_and_missing_ones() -> None:
    first = QuantLinear(8, 4, weight_quant=Int4WeightPerChannelFloat)
    second = QuantLinear(8, 4, weight_quant=first.weight_quant)
    with pytest.raises(QuantConfigError, match="shared"):
        freeze_weight_quantizer(second)
    with pytest.raises(QuantConfigError, match="no weight quantizer"):
        freeze_weight_quantizer(QuantLinear(8, 4, weight_quant=None))


# -- GPTQ on one matrix / one layer --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("grid", ["per_channel_int4", "per_group_int4", "shifted_uint4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest(seed: int, grid: str, act_order: bool) -> None:
    layer = make_linear(grid, seed=seed, bias=False)
    x = correlated_inputs(512, 32, seed)
    float_weight = layer.weight.detach().clone()
    rtn_error = output_mse(quantized_weight(layer), float_weight, x)
    gptq(nn.Sequential(layer), [x[:256], x[256:]], act_order=act_order, progress=False)
    gptq_error = output_mse(quantized_weight(layer), float_weight, x)
    RATIOS.setdefault(f"{grid}, act_order={act_order}", []).append(gptq_error / rtn_error)
    assert gptq_error < rtn_error
    assert_on_grid(layer)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_gptq_weights_lie_on_the_original_grid(grid: str) -> None:
    layer = make_linear(grid, in_features=24 if "group" in grid else 20, out_features=12)
    _, before_scale, before_zero_point, _ = layer.weight_quant.tensor_quant(layer.weight)
    x = correlated_inputs(256, layer.in_features, 3)
    gptq(nn.Sequential(layer), [x], block_size=7, progress=False)
    assert_on_grid(layer)
    after = layer.weight_quant(layer.weight)
    assert torch.equal(after.scale.expand_as(layer.weight), before_scale.expand_as(layer.weight))
    assert torch.equal(after.zero_point.expand_as(layer.weight), before_zero_point.expand_as(layer.weight))


@settings(max_examples=30)
@given(
    grid=st.sampled_from(sorted(GRIDS)),
    in_groups=st.integers(1, 4),
    out_features=st.integers(1, 9),
    dead=st.integers(0, 3),
    act_order=st.booleans(),
    block_size=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(
    grid: str, in_groups: int, out_features: int, dead: int, act_order: bool, block_size: int, seed: int
) -> None:
    """Inputs that are scaled one-hot rows give a diagonal Hessian: no column can compensate
    another, so GPTQ must round to nearest, except inputs that are always zero (weight 0)."""
    in_features = 8 * in_groups
    layer = make_linear(grid, in_features=in_features, out_features=out_features, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    live = torch.randperm(in_features, generator=generator)[dead:]
    magnitudes = torch.rand(live.numel(), generator=generator) * 4 + 0.1
    x = torch.zeros(2 * live.numel(), in_features)
    rows = torch.arange(live.numel())
    x[rows, live] = magnitudes
    x[rows + live.numel(), live] = -magnitudes * 0.5
    rtn = quantized_weight(layer)
    gptq(nn.Sequential(layer), [x], act_order=act_order, block_size=block_size, progress=False)
    expected = torch.zeros_like(rtn)
    expected[:, live] = rtn[:, live]
    assert torch.equal(layer.weight.detach(), expected)


def obs_reference(weight, hessian, scale, zero_point, low, high, damp):
    """GPTQ's column-by-column OBS update written the textbook way (Frantar et al., eq. 2-3):
    keep the inverse Hessian of the columns not yet quantized, remove each quantized column
    from it by Gaussian elimination; no Cholesky factor, no blocks. Float64."""
    W = weight.double().clone()
    H = hessian.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    for i in range(W.shape[1]):
        s, z = scale[:, i].double(), zero_point[:, i].double()
        k = torch.round(torch.clamp(W[:, i] / s + z, float(low), float(high)))
        codes[:, i] = k
        err = (W[:, i] - (k - z) * s) / Hinv[i, i]
        W[:, i:] -= err.unsqueeze(1) * Hinv[i, i:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    return codes


@settings(max_examples=20)
@given(
    grid=st.sampled_from(["per_channel_int4", "per_group_int4", "shifted_uint4"]),
    columns=st.sampled_from([8, 16, 24]),
    block_size=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_blocked_gptq_matches_the_textbook_obs_update(grid: str, columns: int, block_size: int, seed: int) -> None:
    """The lazy-batch Cholesky form in blocks of any size makes the same decisions as the
    plain OBS update (float64 weights, so both sides compute to ~1e-15)."""
    layer = make_linear(grid, in_features=columns, out_features=6, seed=seed, dtype=torch.float64)
    x = correlated_inputs(128, columns, seed).double()
    hessian = 2.0 * x.T @ x / x.shape[0]
    freeze_weight_quantizer(layer)
    scale, zero_point, low, high = quantize_weight_tensors(layer)
    weight = layer.weight.detach()
    codes = gptq_quantize_matrix(weight, hessian, scale, zero_point, low, high, block_size=block_size)
    assert torch.equal(codes, obs_reference(weight, hessian, scale, zero_point, low, high, 0.01))


@pytest.mark.parametrize("grid", ["per_group_int4", "shifted_uint4_per_channel"])
def test_act_order_is_gptq_on_the_permuted_problem(grid: str) -> None:
    """act_order = permute columns (and the grid) by descending Hessian diagonal, run plain
    GPTQ, un-permute: checked against doing exactly that by hand."""
    layer = make_linear(grid, in_features=32, out_features=8)
    x = correlated_inputs(256, 32, 7) * torch.linspace(0.2, 3.0, 32)  # a spread-out diagonal
    freeze_weight_quantizer(layer)
    scale, zero_point, low, high = quantize_weight_tensors(layer)
    weight = layer.weight.detach()
    hessian = 2.0 * x.double().T @ x.double() / x.shape[0]
    ordered = gptq_quantize_matrix(weight, hessian, scale, zero_point, low, high, block_size=5, act_order=True)
    perm = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    by_hand = gptq_quantize_matrix(
        weight[:, perm],
        hessian[perm][:, perm],
        scale[:, perm],
        zero_point[:, perm],
        low,
        high,
        block_size=5,
    )[:, torch.argsort(perm)]
    assert torch.equal(ordered, by_hand)
    assert not torch.equal(perm, torch.arange(32))


def test_input_hessian_sees_the_input_quantizer() -> None:
    torch.manual_seed(0)
    layer = QuantLinear(6, 3, weight_quant=Int4WeightPerChannelFloat, input_quant=Int8ActPerTensorFloat)
    layer.train()
    for _ in range(5):
        layer(torch.randn(32, 6))
    layer.eval()
    x = torch.randn(2, 10, 6)
    captured = capture(layer, layer, [x], outputs=False)
    with torch.no_grad():
        xq = layer.input_quant.fake_quant(x).reshape(-1, 6).double()
    assert not torch.equal(xq, x.reshape(-1, 6).double())
    assert torch.allclose(input_hessian(layer, captured)[0], 2.0 * xq.T @ xq / 20, rtol=1e-12, atol=0)


# -- convolutions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("groups", "stride", "padding", "padding_mode"),
    [(1, 1, 1, "zeros"), (2, 2, 1, "reflect"), (4, 1, 0, "zeros"), (8, 1, "same", "zeros")],
)
def test_conv_equals_linear_on_unfolded_inputs(groups: int, stride: int, padding, padding_mode: str) -> None:
    torch.manual_seed(0)
    conv = QuantConv2d(
        8, 8, 3, stride=stride, padding=padding, padding_mode=padding_mode, groups=groups, bias=False,
        weight_quant=Int4WeightPerChannelFloat,
    )  # fmt: skip
    x = correlated_inputs(12 * 7 * 7, 8, 0).reshape(12, 7, 7, 8).permute(0, 3, 1, 2).contiguous()
    original = conv.weight.detach().clone()
    # The reference: each group as a Linear on the unfolded (padded) inputs of its channels.
    padded = F.pad(
        x, conv._reversed_padding_repeated_twice, mode="constant" if padding_mode == "zeros" else padding_mode
    )
    per_group = 8 // groups
    expected = []
    for group in range(groups):
        part = padded[:, group * per_group : (group + 1) * per_group]
        columns = F.unfold(part, 3, stride=stride)
        rows = columns.transpose(1, 2).reshape(-1, columns.shape[1])
        linear = QuantLinear(rows.shape[1], per_group, bias=False, weight_quant=Int4WeightPerChannelFloat)
        with torch.no_grad():
            linear.weight.copy_(original[group * per_group : (group + 1) * per_group].reshape(per_group, -1))
        gptq(nn.Sequential(linear), [rows], block_size=4, progress=False)
        expected.append(linear.weight.detach())
    gptq(nn.Sequential(conv), [x], block_size=4, progress=False)
    assert torch.equal(conv.weight.detach().reshape(8, -1), torch.cat(expected))
    assert_on_grid(conv)


def test_conv1d_and_depthwise_conv_beat_round_to_nearest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantConv1d(8, 8, 3, padding=1, weight_quant=Int4WeightPerChannelFloat),
        nn.ReLU(),
        QuantConv1d(8, 8, 5, groups=8, padding=2, weight_quant=Int4WeightPerChannelFloat),
    )
    x = correlated_inputs(32 * 40, 8, 1).reshape(32, 40, 8).transpose(1, 2).contiguous()
    with torch.no_grad():
        reference = copy.deepcopy(model)
        for layer in (reference[0], reference[2]):
            layer.weight_quant.disable_quant = True
        target = reference(x)
        rtn_error = float(((model(x) - target) ** 2).mean())
    gptq(model, [x[:16], x[16:]], progress=False)
    with torch.no_grad():
        gptq_error = float(((model(x) - target) ** 2).mean())
    RATIOS.setdefault("conv1d + depthwise conv1d model output", []).append(gptq_error / rtn_error)
    assert gptq_error < rtn_error
    assert_on_grid(model[0])
    assert_on_grid(model[2])


# -- the loop over a model ------------------------------------------------------------------------


class Reversed(nn.Module):
    """Registers its layers in the opposite order of the one it calls them in."""

    def __init__(self) -> None:
        super().__init__()
        self.last = QuantLinear(16, 4, weight_quant=Int4WeightPerChannelFloat)
        self.first = QuantLinear(8, 16, weight_quant=Int4WeightPerChannelFloat)
        self.unused = QuantLinear(4, 4, weight_quant=Int4WeightPerChannelFloat)
        self.up = QuantConvTranspose2d(2, 2, 2, weight_quant=Int4WeightPerChannelFloat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.last(torch.relu(self.first(x)))
        return y + self.up(y.reshape(-1, 2, 1, 2)).mean()


def test_layers_run_in_execution_order_on_the_quantized_predecessors(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Reversed()
    x = correlated_inputs(64, 8, 2)
    seen = []
    original = gptq_module._gptq_layer

    def spy(layer, hessian, *args):
        seen.append((layer, hessian.clone()))
        original(layer, hessian, *args)

    monkeypatch.setattr(gptq_module, "_gptq_layer", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gptq(model, [x], progress=False)
    messages = " ".join(str(w.message) for w in caught)
    assert "up (QuantConvTranspose2d)" in messages and "unused" in messages
    assert [layer for layer, _ in seen] == [model.first, model.last]
    # The second layer's Hessian was built from the already-GPTQ-quantized first layer.
    with torch.no_grad():
        hidden = torch.relu(model.first(x)).double()
    assert torch.allclose(seen[1][1][0], 2.0 * hidden.T @ hidden / 64, rtol=1e-10, atol=1e-12)
    assert all(module.training for module in model.modules())  # modes restored, rebuilt quantizers too


def test_gptq_is_deterministic_and_keeps_bias_and_input_quantizers_working() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantLinear(
            16, 8, weight_quant=Int4WeightPerChannelFloat, input_quant=Int8ActPerTensorFloat, bias_quant=Int32Bias
        ),
        nn.ReLU(),
        QuantLinear(8, 4, weight_quant=Int4WeightPerGroupFloat, weight_group_size=4),
    )
    model.train()
    for _ in range(5):
        model(correlated_inputs(32, 16, 9))
    model.eval()
    data = [correlated_inputs(64, 16, seed) for seed in range(3)]
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    gptq(first, data, num_batches=2, act_order=True, progress=False)
    gptq(second, data, num_batches=2, act_order=True, progress=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first(data[2]), second(data[2]))
    assert not torch.equal(first[0].weight, model[0].weight)


def test_gptq_rejects_bad_options_and_data() -> None:
    layer = make_linear("per_channel_int4")
    with pytest.raises(QuantInputError, match="block_size"):
        gptq(nn.Sequential(layer), [torch.randn(4, 32)], block_size=0)
    with pytest.raises(QuantInputError, match="damp"):
        gptq(nn.Sequential(layer), [torch.randn(4, 32)], damp=-1.0)
    bad = torch.randn(4, 32)
    bad[0, 0] = float("nan")
    with pytest.raises(QuantInputError, match="NaN"):
        gptq(nn.Sequential(layer), [bad], progress=False)
    with pytest.raises(QuantInputError, match="no weight quantizer"):
        gptq(nn.Sequential(layer, nn.ReLU()), [torch.randn(4, 32)], layers=["1"], progress=False)


def test_disabled_weight_quantizer_is_skipped() -> None:
    layer = make_linear("per_channel_int4")
    layer.weight_quant.disable_quant = True
    before = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="disabled"):
        gptq(nn.Sequential(layer), [torch.randn(8, 32)], progress=False)
    assert torch.equal(layer.weight, before)


def test_report_ratios() -> None:
    """Not a check: prints the GPTQ / RTN error ratios measured by the tests above (run with -s)."""
    for name, ratios in sorted(RATIOS.items()):
        print(f"GPTQ/RTN output MSE {name}: " + ", ".join(f"{r:.3f}" for r in ratios))
