"""From TensorQuant settings to quantizers: any combination either builds a working quantizer
that honours the settings, or is refused with a QuantConfigError naming the tensor."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantwire.convert import TensorQuant
from quantwire.convert.config import GRANULARITIES, METHODS, OBSERVERS
from quantwire.convert.quantizers import quantizer_for
from quantwire.core.quant import FloatQuant
from quantwire.errors import QuantConfigError
from quantwire.nn import QuantLinear
from quantwire.quant_tensor import FloatQuantTensor, IntQuantTensor

settings_strategy = st.builds(
    TensorQuant,
    bit_width=st.none() | st.integers(2, 8),
    symmetric=st.none() | st.booleans(),
    signed=st.none() | st.booleans(),
    granularity=st.none() | st.sampled_from(GRANULARITIES),
    group_size=st.just(8),
    scale=st.none() | st.sampled_from(("float", "po2")),
    observer=st.none() | st.sampled_from(OBSERVERS),
    method=st.none() | st.sampled_from(METHODS),
    format=st.none() | st.sampled_from(("int", "fp8_e4m3")),
    dynamic=st.none() | st.booleans(),
)


def _build(kind: str, settings: TensorQuant) -> QuantLinear | None:
    static_per_token = settings.dynamic is False or settings.method in ("lsq", "lsq_plus")
    if kind == "input" and settings.granularity == "token" and static_per_token:
        settings = settings.merged({"options": {"num_tokens": 5}})  # one learned scale per token position
    try:
        quantizer = quantizer_for(kind, settings, "net.fc")
    except QuantConfigError as error:
        assert "net.fc" in str(error)
        return None
    role = "weight_quant" if kind == "weight" else "input_quant"
    return QuantLinear(16, 4, **{"weight_quant": None, role: quantizer})


@given(settings=settings_strategy)
def test_weight_settings_build_a_weight_quantizer_that_honours_them(settings):
    torch.manual_seed(0)
    layer = _build("weight", settings)
    if layer is None:
        return
    quant = layer.quant_weight()
    assert quant.is_valid
    if isinstance(quant, IntQuantTensor):
        assert int(quant.bit_width) == (settings.bit_width or 8)
        assert bool(quant.zero_point.any()) <= (settings.symmetric is False)
        if settings.granularity == "channel":
            assert quant.scale.numel() == 4
        if settings.scale == "po2":
            assert torch.equal(torch.log2(quant.scale), torch.log2(quant.scale).round())
    else:
        assert isinstance(quant, FloatQuantTensor) and settings.format == "fp8_e4m3"
    # the declaration pickles (a model holding it deep-copies and goes to worker processes)
    assert pickle.loads(pickle.dumps(layer.weight_quant.quant_injector)).let(module=layer).tensor_quant is not None


@given(settings=settings_strategy)
def test_activation_settings_build_an_activation_quantizer_that_honours_them(settings):
    torch.manual_seed(0)
    layer = _build("input", settings)
    if layer is None:
        return
    x = torch.randn(3, 5, 16)
    layer.train()
    for _ in range(2):
        layer(x)
    layer.eval()
    quant = layer.input_quant(x)
    assert quant.is_valid
    if isinstance(quant, IntQuantTensor):
        assert int(quant.bit_width) == (settings.bit_width or 8)
        unsigned = settings.signed is False or settings.symmetric is False or settings.method in ("pact", "lsq_plus")
        assert quant.signed is not unsigned
        if settings.dynamic:
            assert torch.allclose(layer.input_quant(10 * x).scale, 10 * quant.scale)
    else:
        assert isinstance(layer.input_quant.tensor_quant, FloatQuant)
    copy.deepcopy(layer)


@pytest.mark.parametrize(
    ("kind", "settings", "message"),
    [
        ("weight", TensorQuant(method="pact"), "method='pact' is not available here"),
        ("weight", TensorQuant(granularity="token"), "weights take tensor, channel or group"),
        ("weight", TensorQuant(observer="entropy"), "weights take minmax or mse"),
        ("input", TensorQuant(method="adaround"), "AdaRound learns weight rounding"),
        ("input", TensorQuant(granularity="channel"), "activations take tensor or token"),
        ("input", TensorQuant(dynamic=True, observer="mse"), "computed from each tensor, not observed"),
        ("input", TensorQuant(format="fp8_e4m3", method="lsq"), "FP8 activations take"),
        ("bias", TensorQuant(granularity="channel"), "biases take bit_width"),
        ("input", TensorQuant(quantizer="Int8ActLsqq"), "'Int8ActLsqq' is not in quantwire.quant"),
        ("input", TensorQuant(quantizer="Int8ActLsq", options={"bit_widht": 4}), "no attribute 'bit_widht'"),
    ],
)
def test_impossible_settings_are_refused_naming_the_tensor(kind, settings, message):
    with pytest.raises(QuantConfigError, match=message) as info:
        quantizer_for(kind, settings, "encoder.layer.0.query")
    assert "encoder.layer.0.query" in str(info.value)


def test_a_named_quantizer_takes_the_fields_that_are_set():
    quantizer = quantizer_for("input", TensorQuant(quantizer="Int8ActLsq", bit_width=4), "x")
    assert quantizer.bit_width == 4
    assert quantizer_for("input", TensorQuant(quantizer="quantwire.quant:Uint8ActPact"), "x").signed is False
