"""Empirical bias correction: the mean per-channel output error on the calibration data goes
to zero, sequentially through a model, and layers without weight quantization are untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantwire.algorithms.bias_correction import bias_correction
from quantwire.errors import QuantInputError
from quantwire.nn import QuantConv2d, QuantLinear
from quantwire.quant import (
    Int4WeightPerChannelFloat,
    Int4WeightPerGroupFloat,
    Int8ActPerTensorFloat,
    Int8WeightPerTensorFloat,
    Int32Bias,
    ShiftedUint8WeightPerTensorFloat,
)

GRIDS = {
    "per_tensor_int8": (Int8WeightPerTensorFloat, {"weight_bit_width": 3}),
    "per_channel_int4": (Int4WeightPerChannelFloat, {}),
    "per_group_int4": (Int4WeightPerGroupFloat, {"weight_group_size": 4}),
    "shifted_uint4": (ShiftedUint8WeightPerTensorFloat, {"weight_bit_width": 4}),
}


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every weight quantizer disabled (the float-weight reference)."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if getattr(module, "weight_quant", None) is not None:
            module.weight_quant.disable_quant = True
    return reference


def channel_mean(output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    output = output.double().movedim(channel_dim, -1)
    return output.reshape(-1, output.shape[-1]).mean(dim=0)


def biased_inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Inputs with a non-zero mean, so that the weight error has a mean effect to correct."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) + 0.5 + torch.rand(shape[-1], generator=generator)


@settings(max_examples=25)
@given(
    grid=st.sampled_from(sorted(GRIDS)),
    conv=st.booleans(),
    has_bias=st.booleans(),
    batches=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_mean_output_error_per_channel_vanishes(grid: str, conv: bool, has_bias: bool, batches: int, seed: int) -> None:
    quant, extra = GRIDS[grid]
    torch.manual_seed(seed)
    if conv:
        layer = QuantConv2d(8, 6, 3, padding=1, groups=2, bias=has_bias, weight_quant=quant, **extra)
        data = [biased_inputs((4, 5, 5, 8), seed + i).permute(0, 3, 1, 2) for i in range(batches)]
        channel_dim = 1
    else:
        layer = QuantLinear(8, 6, bias=has_bias, weight_quant=quant, **extra)
        data = [biased_inputs((4, 3, 8), seed + i) for i in range(batches)]
        channel_dim = -1
    model = nn.Sequential(layer)
    reference = float_copy(model)
    x = torch.cat(data)
    with torch.no_grad():
        target = channel_mean(reference(x), channel_dim)
        error_before = target - channel_mean(model(x), channel_dim)
    bias_correction(model, data, progress=False)
    with torch.no_grad():
        error_after = target - channel_mean(model(x), channel_dim)
    assert isinstance(layer.bias, nn.Parameter) and layer.bias.shape == (6,)
    tolerance = 1e-5 * (1.0 + float(target.abs().max()))
    assert float(error_after.abs().max()) <= tolerance
    assert float(error_before.abs().max()) > 10 * tolerance or float(error_before.abs().max()) <= tolerance


def test_layers_are_corrected_in_sequence() -> None:
    """In a chain of linear layers the mean error of the whole model vanishes only if each
    layer is corrected on the inputs coming from the already-corrected layers before it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantLinear(8, 12, weight_quant=Int4WeightPerChannelFloat, weight_bit_width=3),
        QuantLinear(12, 12, bias=False, weight_quant=Int4WeightPerChannelFloat, weight_bit_width=3),
        QuantLinear(12, 5, weight_quant=Int4WeightPerChannelFloat, weight_bit_width=3),
    )
    data = [biased_inputs((32, 8), seed) for seed in range(2)]
    x = torch.cat(data)
    reference = float_copy(model)
    with torch.no_grad():
        target = channel_mean(reference(x), -1)
        before = float((target - channel_mean(model(x), -1)).abs().max())
    model.train()
    bias_correction(model, data, progress=False)
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        after = float((target - channel_mean(model(x), -1)).abs().max())
    assert before > 1e-3
    assert after < 1e-5


def test_created_bias_follows_the_weight_dtype() -> None:
    torch.manual_seed(0)
    layer = QuantLinear(8, 4, bias=False, weight_quant=Int4WeightPerChannelFloat, dtype=torch.float64)
    bias_correction(nn.Sequential(layer), [biased_inputs((16, 8), 0).double()], progress=False)
    assert isinstance(layer.bias, nn.Parameter)
    assert layer.bias.dtype == torch.float64 and layer.bias.device == layer.weight.device
    assert "bias" in dict(layer.named_parameters())
    assert bool((layer.bias != 0).any())


def test_disabled_weight_quantizer_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantLinear(8, 4, bias=False, weight_quant=Int4WeightPerChannelFloat),
        QuantLinear(4, 4, weight_quant=Int4WeightPerChannelFloat),
    )
    for layer in model:
        layer.weight_quant.disable_quant = True
    state = copy.deepcopy(model.state_dict())
    bias_correction(model, [biased_inputs((16, 8), 0)], progress=False)
    assert model[0].bias is None
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[key], after[key]) for key in state)


def test_bias_quantizer_is_rebuilt_and_input_calibration_kept() -> None:
    torch.manual_seed(0)
    layer = QuantLinear(
        8,
        4,
        bias=False,
        weight_quant=Int4WeightPerChannelFloat,
        input_quant=Int8ActPerTensorFloat,
        bias_quant=Int32Bias,
    )
    data = [biased_inputs((64, 8), seed) for seed in range(2)]
    layer.train()
    for x in data:
        layer(x)
    layer.eval()
    input_scale = layer.input_quant(data[0]).scale.detach().clone()
    reference = float_copy(nn.Sequential(layer))
    x = torch.cat(data)
    with torch.no_grad():
        target = channel_mean(reference(x), -1)
    layer.train()
    bias_correction(nn.Sequential(layer), data, progress=False)
    assert all(module.training for module in layer.modules())  # modes restored, rebuilt quantizer too
    layer.eval()
    assert torch.equal(layer.input_quant(data[0]).scale, input_scale)  # calibration kept
    with torch.no_grad():
        error = (target - channel_mean(layer(x), -1)).abs()
        weight_scale = layer.weight_quant(layer.weight).scale.reshape(-1)
    # What remains is the bias quantizer's rounding: at most half of its step.
    assert bool((error <= 0.5 * input_scale * weight_scale + 1e-6).all())


def test_bad_layers_and_data_are_reported() -> None:
    layer = QuantLinear(8, 4, weight_quant=Int4WeightPerChannelFloat)
    with pytest.raises(QuantInputError, match="no weight quantizer"):
        bias_correction(nn.Sequential(layer, nn.ReLU()), [torch.randn(4, 8)], layers=["1"], progress=False)
    with pytest.raises(QuantInputError, match="no sub-module"):
        bias_correction(nn.Sequential(layer), [torch.randn(4, 8)], layers=["missing"], progress=False)
    bad = torch.randn(4, 8)
    bad[0, 0] = float("inf")
    with pytest.raises(QuantInputError):
        bias_correction(nn.Sequential(layer), [bad], progress=False)
