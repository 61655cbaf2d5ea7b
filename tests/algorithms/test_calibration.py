"""Calibration: ``calibrate``, ``calibration_mode`` and ``reset_calibration``.

A collected activation scale is the exact mean, over every calibration batch, of each batch's
99.999th percentile of ``|x|`` (nearest rank), divided by the quantizer's threshold-to-scale
divisor (``IntScaling``: ``2^(b-1) = 128`` for signed 8-bit, ``255`` for unsigned 8-bit),
whatever ``collect_stats_steps`` says; the learned parameter then holds it and eval uses it.
Calibration runs the model in eval mode (BatchNorm and dropout as in inference), by default
observing without quantizing (the float model's output), restores every module's mode, starts
afresh on every call and accepts tensors, ``(x, y)`` tuples, dicts and ``forward_fn``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import quantwire.config
from quantwire.algorithms import calibrate, calibration_mode, reset_calibration
from quantwire.core.stats import ParameterFromRuntimeStats
from quantwire.errors import QuantInputError
from quantwire.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from quantwire.quant import Int8ActPerTensorFloat, ShiftedUint8ActPerTensorFloat, Uint8ActPerTensorFloat

SIGNED_DIVISOR = 128.0  # IntScaling of a signed, not narrow, 8-bit range: 2^(b-1)
UNSIGNED_DIVISOR = 255.0  # IntScaling of an unsigned 8-bit range: max_int


# ---------------------------------------------------------------------------------------------
# Independent references


def nearest_rank(values: Tensor, per_hundred_thousand: int) -> Tensor:
    """The ``q = per_hundred_thousand / 1000``-th percentile of ``values`` by nearest rank, written
    with numpy's partition and integer arithmetic: rank ``k = round_half_up(q/100 * n)`` in ``[1, n]``."""
    flat = values.detach().flatten().numpy()
    n = flat.size
    k = (2 * n * per_hundred_thousand + 100_000) // 200_000
    k = min(max(k, 1), n)
    return torch.tensor(float(np.partition(flat, k - 1)[k - 1]))


def abs_p99999(x: Tensor) -> Tensor:
    return nearest_rank(x.abs(), 99_999)


def p00001(x: Tensor) -> Tensor:
    return nearest_rank(x, 1)


def batch_mean(values: list[Tensor]) -> float:
    return float(torch.stack(values).mean())


def collected(proxy) -> Tensor:
    """The learned scale parameter behind an activation proxy."""
    return proxy.tensor_quant.scaling_impl.stats.value.detach()


def collected_zero_point(proxy) -> Tensor:
    """The learned lower range end behind an asymmetric activation proxy."""
    return proxy.tensor_quant.zero_point_impl.stats.value.detach()


def eval_scale(proxy, like: Tensor) -> Tensor:
    proxy.tensor_quant.eval()
    with torch.no_grad():
        return proxy.tensor_quant(like)[1]


def stats_sources(model: nn.Module) -> list[ParameterFromRuntimeStats]:
    return [m for m in model.modules() if isinstance(m, ParameterFromRuntimeStats)]


# ---------------------------------------------------------------------------------------------
# Models


def act_model(collect_stats_steps: int = 300) -> nn.Sequential:
    """A signed 8-bit identity followed by an unsigned 8-bit ReLU."""
    return nn.Sequential(
        OrderedDict(
            inp=QuantIdentity(act_quant=Int8ActPerTensorFloat, collect_stats_steps=collect_stats_steps),
            relu=QuantReLU(act_quant=Uint8ActPerTensorFloat, collect_stats_steps=collect_stats_steps),
        )
    )


def conv_model(seed: int = 0) -> nn.Sequential:
    """QuantIdentity -> QuantConv2d(input_quant) -> BatchNorm -> QuantReLU -> Dropout -> QuantLinear(input_quant)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            inp=QuantIdentity(act_quant=Int8ActPerTensorFloat),
            conv=QuantConv2d(3, 4, 3, padding=1, input_quant=Int8ActPerTensorFloat),
            bn=nn.BatchNorm2d(4),
            relu=QuantReLU(act_quant=Uint8ActPerTensorFloat),
            drop=nn.Dropout(0.5),
            flat=nn.Flatten(),
            fc=QuantLinear(4 * 8 * 8, 5, input_quant=Uint8ActPerTensorFloat),
        )
    )
    with torch.no_grad():  # running statistics far from (0, 1): eval and training BN differ
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    return model


def float_features(model: nn.Sequential, x: Tensor) -> Tensor:
    """What the ReLU of :func:`conv_model` returns in eval mode, computed with plain torch ops."""
    bn = model.bn
    y = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
    return torch.relu(y)


def float_output(model: nn.Sequential, x: Tensor) -> Tensor:
    return F.linear(float_features(model, x).flatten(1), model.fc.weight, model.fc.bias)


def image_batches(count: int, seed: int = 1, batch: int = 16) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=generator) * (1.0 + i) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The collected scale


batch_specs = st.lists(
    st.tuples(st.integers(1, 24), st.floats(0.05, 20.0), st.integers(0, 2**31 - 1)), min_size=1, max_size=4
)


@given(specs=batch_specs, collect_stats_steps=st.sampled_from([1, 2, 3, 300]))
def test_scale_is_mean_of_per_batch_percentiles(specs, collect_stats_steps):
    """Every batch counts (also past ``collect_stats_steps``); batches of 4096 to 98304 elements,
    so the 99.999th percentile is not always the maximum."""
    batches = []
    for rows, spread, seed in specs:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, 4096, generator=generator) * spread
        x[0, 0] = 50.0 * spread  # an outlier that the percentile skips when the batch is big
        batches.append(x)
    model = act_model(collect_stats_steps)
    calibrate(model, batches, progress=False)

    signed = batch_mean([abs_p99999(x) for x in batches])
    unsigned = batch_mean([abs_p99999(torch.relu(x)) for x in batches])
    assert float(collected(model.inp.act_quant)) == pytest.approx(signed, rel=1e-5)
    assert float(collected(model.relu.act_quant)) == pytest.approx(unsigned, rel=1e-5)

    probe = batches[0]
    assert float(eval_scale(model.inp.act_quant, probe)) == pytest.approx(signed / SIGNED_DIVISOR, rel=1e-5)
    assert float(eval_scale(model.relu.act_quant, probe)) == pytest.approx(unsigned / UNSIGNED_DIVISOR, rel=1e-5)
    for source in stats_sources(model):
        assert not source.is_collecting()
        assert source.collect_stats_steps == collect_stats_steps  # the limit is restored


def test_conv_linear_model_collects_the_float_models_activations():
    """Each quantizer sees the float model's activation (eval-mode BatchNorm, dropout off)."""
    model = conv_model()
    data = image_batches(4)
    calibrate(model, data, progress=False)

    image = batch_mean([abs_p99999(x) for x in data])
    features = batch_mean([abs_p99999(float_features(model, x)) for x in data])
    assert float(collected(model.inp.act_quant)) == pytest.approx(image, rel=1e-5)
    assert float(collected(model.conv.input_quant)) == pytest.approx(image, rel=1e-5)
    assert float(collected(model.relu.act_quant)) == pytest.approx(features, rel=1e-5)
    assert float(collected(model.fc.input_quant)) == pytest.approx(features, rel=1e-5)


def test_eval_after_calibration_uses_the_learned_parameter():
    model = act_model()
    data = [torch.randn(8, 64) * 3.0 for _ in range(3)]
    calibrate(model, data, progress=False)
    model.eval()
    proxy = model.inp.act_quant
    value = proxy.tensor_quant.scaling_impl.stats.value

    x = torch.randn(8, 64) * 5.0  # a different distribution: a dynamic scale would differ
    scale = value.detach() / SIGNED_DIVISOR
    expected = torch.clamp(torch.round(x / scale), -128, 127) * scale
    with torch.no_grad():
        torch.testing.assert_close(model.inp(x), expected, rtol=0, atol=1e-6)
        value.mul_(2.0)
        assert float(eval_scale(proxy, x)) == pytest.approx(float(value) / SIGNED_DIVISOR, rel=1e-6)

    # Training after calibration learns the parameter: no collection, and it gets a gradient.
    model.train()
    before = value.detach().clone()
    model(torch.randn(8, 64) * 7.0).square().sum().backward()
    assert torch.equal(value.detach(), before)
    assert value.grad is not None and bool(value.grad.ne(0).any())


# ---------------------------------------------------------------------------------------------
# What the model does during calibration


def test_without_quantization_the_output_is_the_float_models():
    model = conv_model()
    data = image_batches(3)
    outputs = []
    calibrate(model, data, progress=False, forward_fn=lambda m, x: outputs.append(m(x)))
    assert len(outputs) == 3
    for x, y in zip(data, outputs, strict=True):
        torch.testing.assert_close(y, float_output(model, x), rtol=1e-5, atol=1e-5)


def test_quantize_true_quantizes_activations_and_weights():
    torch.manual_seed(0)
    layer = QuantLinear(32, 6, input_quant=Int8ActPerTensorFloat)
    data = [torch.randn(16, 32) * (1.0 + i) for i in range(3)]
    outputs = []
    calibrate(layer, data, progress=False, quantize=True, forward_fn=lambda m, x: outputs.append(m(x)))
    weight = layer.quant_weight().value.detach()
    assert not torch.equal(weight, layer.weight.detach())
    for x, y in zip(data, outputs, strict=True):
        # While collecting, the input is quantized with the batch's own scale.
        scale = abs_p99999(x).float() / SIGNED_DIVISOR
        x_quant = torch.clamp(torch.round(x / scale), -128, 127) * scale
        torch.testing.assert_close(y, F.linear(x_quant, weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y, F.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)


def test_batchnorm_dropout_and_modes_are_left_alone():
    model = conv_model()
    model.train()
    model.relu.eval()  # a mixture of modes, each restored
    model.fc.input_quant.eval()
    modes = {name: module.training for name, module in model.named_modules()}
    bn_state = {k: v.clone() for k, v in model.bn.state_dict().items()}

    seen = []

    def forward(m, x):
        seen.append({name: module.training for name, module in m.named_modules() if "tensor_quant" not in name})
        return m(x)

    calibrate(model, image_batches(3), progress=False, forward_fn=forward)
    for key, value in model.bn.state_dict().items():
        assert torch.equal(value, bn_state[key]), key
    assert {name: module.training for name, module in model.named_modules()} == modes
    # Inside: every module except the collecting core modules is in eval mode.
    assert seen and all(not any(flags.values()) for flags in seen)


def test_calibrating_again_starts_afresh():
    first, second = image_batches(3, seed=1), image_batches(2, seed=2)
    model = conv_model()
    fresh = copy.deepcopy(model)
    calibrate(model, first, progress=False)
    calibrate(model, second, progress=False)
    calibrate(fresh, second, progress=False)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_num_batches_is_respected():
    data = [torch.randn(8, 64) * (1.0 + i) for i in range(5)]
    pulled = []

    def stream():
        for x in data:
            pulled.append(x)
            yield x

    model = act_model()
    reference = act_model()
    calibrate(model, stream(), num_batches=2, progress=False)
    calibrate(reference, data[:2], progress=False)
    assert len(pulled) == 2
    assert torch.equal(collected(model.inp.act_quant), collected(reference.inp.act_quant))
    assert float(collected(model.inp.act_quant)) == pytest.approx(batch_mean([abs_p99999(x) for x in data[:2]]))


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantIdentity(act_quant=Int8ActPerTensorFloat)

    def forward(self, pixels: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.quant(pixels if mask is None else pixels * mask)


@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dict", "forward_fn"])
def test_batch_forms(form):
    data = [torch.randn(8, 64) * (1.0 + i) for i in range(3)]
    expected = batch_mean([abs_p99999(x) for x in data])
    model = KeywordModel()
    if form == "tensor":
        calibrate(model, data, progress=False)
    elif form == "tuple":
        calibrate(model, [(x, torch.zeros(8, dtype=torch.long)) for x in data], progress=False)
    elif form == "list":
        calibrate(model, [[x, "label"] for x in data], progress=False)
    elif form == "dict":
        calibrate(model, [{"pixels": x, "mask": torch.ones_like(x)} for x in data], progress=False)
    else:
        calibrate(model, [{"image": x} for x in data], progress=False, forward_fn=lambda m, b: m(b["image"]))
    assert float(collected(model.quant.act_quant)) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad data


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_raises_naming_the_layer_and_quantizer(bad):
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(16, 4, input_quant=Int8ActPerTensorFloat), QuantReLU())
    model.train()
    data = [torch.randn(4, 16), torch.randn(4, 16)]
    data[1][2, 3] = bad
    with pytest.raises(QuantInputError) as error:
        calibrate(model, data, progress=False)
    message = str(error.value)
    assert "QuantLinear" in message and "input_quant" in message and "Int8ActPerTensorFloat" in message
    assert ("NaN" if bad != bad else "Inf") in message
    # The model is left usable: modes restored, no check left behind.
    assert all(module.training for module in model.modules())
    model.eval()
    with torch.no_grad():
        model(data[1])


def test_empty_data_raises():
    with pytest.raises(QuantInputError):
        calibrate(act_model(), [], progress=False)
    with pytest.raises(QuantInputError):
        calibrate(act_model(), iter(()), progress=False)


@pytest.mark.parametrize(
    "bad_call",
    [
        lambda model: calibrate(model, [], progress=False),
        lambda model: calibrate(model, torch.randn(8, 64), progress=False),
        lambda model: calibrate(model, [torch.randn(8, 64)], num_batches=0, progress=False),
    ],
    ids=["empty", "bare_tensor", "zero_batches"],
)
def test_a_refused_calibration_keeps_the_earlier_one(bad_call):
    """A calibration that raises because there is nothing to calibrate on must not undo the
    previous one (which leaves the quantizers collecting again: dynamic scales in eval)."""
    model = act_model()
    calibrate(model, [torch.randn(8, 64) for _ in range(2)], progress=False)
    state = copy.deepcopy(model.state_dict())
    model.eval()
    probe = torch.randn(8, 64) * 10.0
    with torch.no_grad():
        expected = model(probe)
    with pytest.raises(QuantInputError):
        bad_call(model)
    assert all(not source.is_collecting() for source in stats_sources(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(model(probe), expected)


# ---------------------------------------------------------------------------------------------
# Progress bars


def test_progress_bar_can_be_turned_off(capsys, monkeypatch):
    data = [torch.randn(4, 16) for _ in range(3)]
    calibrate(act_model(), data, progress=True)
    assert "calibrating" in capsys.readouterr().err  # the check below is not vacuous

    calibrate(act_model(), data, progress=False)
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(quantwire.config, "PROGRESS", False)
    calibrate(act_model(), data, progress=True)
    assert capsys.readouterr().err == ""


def test_progress_env_variable_turns_bars_off():
    code = (
        "import torch, quantwire.config\n"
        "from quantwire.algorithms import calibrate\n"
        "from quantwire.nn import QuantIdentity\n"
        "assert quantwire.config.PROGRESS is False\n"
        "calibrate(QuantIdentity(), [torch.randn(4, 16) for _ in range(3)])\n"
    )
    env = {**os.environ, "QUANTWIRE_PROGRESS": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "calibrating" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Asymmetric quantizers, and the context manager on its own


def test_shifted_zero_point_is_calibrated():
    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(20, 4096, generator=generator) * 2.0 + 1.5 for _ in range(3)]  # 81920 elements each
    layer = QuantIdentity(act_quant=ShiftedUint8ActPerTensorFloat)
    calibrate(layer, data, progress=False)

    tensor_quant = layer.act_quant.tensor_quant
    low = batch_mean([torch.clamp_max(p00001(x), 0.0) for x in data])
    width = batch_mean([torch.clamp_min(nearest_rank(x, 99_999), 0.0) - torch.clamp_max(p00001(x), 0.0) for x in data])
    assert float(collected_zero_point(layer.act_quant)) == pytest.approx(low, rel=1e-5)
    assert float(collected(layer.act_quant)) == pytest.approx(width, rel=1e-5)

    layer.eval()
    with torch.no_grad():
        _, scale, zero_point, _ = tensor_quant(data[0])
    assert float(scale) == pytest.approx(width / UNSIGNED_DIVISOR, rel=1e-5)
    assert float(zero_point) == min(max(round(-low / float(scale)), 0), 255)
    assert float(zero_point) > 0


def test_calibration_mode_and_reset():
    model = act_model()
    data = [torch.randn(8, 64) * (1.0 + i) for i in range(3)]
    with calibration_mode(model), torch.no_grad():
        for x in data:
            assert torch.equal(model(x), torch.relu(x))  # observed, not quantized
    assert float(collected(model.inp.act_quant)) == pytest.approx(batch_mean([abs_p99999(x) for x in data]))
    assert all(not source.is_collecting() for source in stats_sources(model))

    reset_calibration(model)
    assert all(source.is_collecting() for source in stats_sources(model))
