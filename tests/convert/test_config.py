"""QuantConfig: validation, dict/YAML/JSON round trips, presets and per-layer overrides."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import quantwire
from quantwire.convert import PRESETS, Override, QuantConfig, TensorQuant, preset
from quantwire.convert.config import FORMATS, GRANULARITIES, METHODS, OBSERVERS, SCALES
from quantwire.errors import QuantConfigError
from quantwire.nn import QuantConv2d, QuantLinear


class SmallNet(nn.Module):
    """Two conv stages and a classifier: names ``stem``, ``body.0``, ``body.1``, ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def weight_bits(layer: nn.Module) -> int:
    return int(layer.quant_weight().bit_width)


# -- TensorQuant -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 33, -4, 2.5, True, "8"])
def test_bit_width_outside_1_to_32_is_refused(bad):
    with pytest.raises(QuantConfigError, match="bit_width"):
        TensorQuant(bit_width=bad)


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [("granularity", "chanel", "channel"), ("observer", "entropie", "entropy"), ("method", "lsqplus", "lsq_plus")],
)
def test_unknown_choice_names_the_closest_one(field, value, hint):
    with pytest.raises(QuantConfigError, match=f"did you mean '{hint}'"):
        TensorQuant(**{field: value})


tensor_quants = st.builds(
    TensorQuant,
    bit_width=st.none() | st.integers(1, 32),
    symmetric=st.none() | st.booleans(),
    signed=st.none() | st.booleans(),
    granularity=st.none() | st.sampled_from(GRANULARITIES),
    group_size=st.none() | st.integers(1, 128),
    scale=st.none() | st.sampled_from(SCALES),
    observer=st.none() | st.sampled_from(OBSERVERS),
    method=st.none() | st.sampled_from(METHODS),
    format=st.none() | st.sampled_from(FORMATS),
    dynamic=st.none() | st.booleans(),
    options=st.dictionaries(st.sampled_from(["narrow_range", "collect_stats_steps"]), st.integers(0, 9), max_size=2),
)


@given(weight=tensor_quants, act=st.none() | tensor_quants, fold_bn=st.booleans())
def test_config_survives_a_json_round_trip(weight, act, fold_bn):
    config = QuantConfig(
        weight=weight,
        input=act,
        fold_bn=fold_bn,
        overrides=(Override(name="head", weight=act), Override(type=nn.Conv2d, skip=True)),
    )
    text = json.dumps(config.to_dict())
    assert QuantConfig.from_dict(json.loads(text)) == config


def test_merged_changes_only_the_given_fields():
    base = TensorQuant(bit_width=4, granularity="channel", options={"narrow_range": True})
    merged = base.merged({"bit_width": 8, "options": {"collect_stats_steps": 3}})
    assert merged == TensorQuant(
        bit_width=8, granularity="channel", options={"narrow_range": True, "collect_stats_steps": 3}
    )


# -- reading configs -------------------------------------------------------------------------------


YAML_CONFIG = """
preset: w4a4
weight: {bit_width: 4, granularity: channel}
input: {bit_width: 4, observer: mse}
overrides:
  - {name: stem, weight: {bit_width: 8}, input: {bit_width: 8}}
  - {name: head, skip: true}
"""


def test_yaml_and_json_files_describe_the_same_config(tmp_path):
    yaml_path = tmp_path / "scheme.yaml"
    yaml_path.write_text(YAML_CONFIG)
    config = QuantConfig.from_file(yaml_path)
    json_path = tmp_path / "scheme.json"
    json_path.write_text(json.dumps(config.to_dict()))
    assert QuantConfig.from_file(json_path) == config
    assert config.attention_probs == preset("w4a4").attention_probs  # from the preset
    qmodel = quantwire.quantize_model(SmallNet(), yaml_path)
    assert weight_bits(qmodel.stem) == 8 and weight_bits(qmodel.body[0]) == 4
    assert type(qmodel.head) is nn.Linear


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("weight: {bit_width: 4", ".yaml", "not valid YAML"),
        ("{", ".json", "not valid JSON"),
        ("weights: {bit_width: 4}", ".yaml", "did you mean 'weight'"),
        ("weight: {bits: 4}", ".yaml", "unknown QuantConfig.weight key 'bits'"),
        ("weight: {}", ".toml", "is a .yaml, .yml or .json file"),
        ("preset: w3a3", ".yaml", "unknown preset 'w3a3'"),
        ("overrides: [{weight: {bit_width: 8}}]", ".yaml", "needs a layer name pattern"),
    ],
)
def test_a_bad_config_file_says_what_is_wrong(tmp_path, text, suffix, message):
    path = tmp_path / f"scheme{suffix}"
    path.write_text(text)
    with pytest.raises(QuantConfigError, match=message):
        QuantConfig.from_file(path)


# -- presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_converts_calibrates_and_runs(name):
    torch.manual_seed(0)
    model = SmallNet().eval()
    if name == "w4a16_group":  # groups of 32 input channels: the convolutions here have 3 and 8
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        model.forward_input = torch.randn(2, 64)
    x = getattr(model, "forward_input", torch.randn(2, 3, 8, 8))
    qmodel = quantwire.quantize_model(model, name)
    quantwire.calibrate(qmodel, [x], progress=False)
    with torch.no_grad():
        output = qmodel(x)
    reference = model(x)
    assert output.shape == reference.shape and torch.isfinite(output).all()
    cosine = nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.8, f"{name}: cosine {cosine:.3f}"


def test_per_group_weights_that_do_not_divide_the_channels_are_refused_at_conversion():
    with pytest.raises(QuantConfigError, match="stem: Conv2d has 3 input channels.*granularity: channel"):
        quantwire.quantize_model(SmallNet(), "w4a16_group")
    config = preset("w4a16_group").with_overrides(Override(type=nn.Conv2d, weight={"granularity": "channel"}))
    qmodel = quantwire.quantize_model(nn.Sequential(nn.Conv2d(3, 64, 1), nn.Flatten(), nn.Linear(64, 8)), config)
    scale = qmodel[2].quant_weight().scale.expand(8, 64)
    assert all(torch.unique(row).numel() == 2 for row in scale)  # two groups of 32 per output


def test_dynamic_preset_recomputes_the_input_scale_for_every_input():
    qmodel = quantwire.quantize_model(nn.Sequential(nn.Linear(8, 8)), "dynamic_int8").eval()
    proxy = qmodel[0].input_quant
    small = torch.randn(4, 8)
    assert torch.allclose(proxy(100 * small).scale, 100 * proxy(small).scale)


# -- per-layer overrides ---------------------------------------------------------------------------


def test_a_name_pattern_hits_exactly_the_layers_it_names_and_what_they_contain():
    config = QuantConfig(
        weight=TensorQuant(bit_width=4, granularity="channel"),
        overrides=[Override(name="body", weight={"bit_width": 6}), Override(name="head", weight={"bit_width": 8})],
    )
    qmodel = quantwire.quantize_model(SmallNet(), config)
    bits = {name: weight_bits(m) for name, m in qmodel.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}
    assert bits == {"stem": 4, "body.0": 6, "body.2": 6, "head": 8}
    # the override changed only the bit width: per-channel scales stay
    assert qmodel.head.quant_weight().scale.numel() == 4


def test_glob_regex_and_type_overrides():
    config = QuantConfig(
        overrides=[
            Override(name="body.*", weight={"bit_width": 5}),
            Override(name="re:st(em|ump)", weight={"bit_width": 6}),
            Override(type="torch.nn.Linear", weight={"bit_width": 7}),
        ]
    )
    qmodel = quantwire.quantize_model(SmallNet(), config)
    assert [weight_bits(m) for m in (qmodel.stem, qmodel.body[0], qmodel.body[2], qmodel.head)] == [6, 5, 5, 7]


def test_later_overrides_win_and_none_turns_a_kind_off():
    config = QuantConfig(
        overrides=[Override(name="head", weight={"bit_width": 4}), Override(name="head", weight={"bit_width": 3})]
    )
    assert weight_bits(quantwire.quantize_model(SmallNet(), config).head) == 3
    qmodel = quantwire.quantize_model(SmallNet(), QuantConfig(overrides=[Override(name="head", input=None)]))
    assert qmodel.head.input_quant is None and qmodel.stem.input_quant is not None


def test_skip_leaves_the_whole_subtree_float():
    qmodel = quantwire.quantize_model(SmallNet(), {"overrides": [{"name": "body", "skip": True}]})
    assert isinstance(qmodel.stem, QuantConv2d) and isinstance(qmodel.head, QuantLinear)
    assert all(type(m) in (nn.Conv2d, nn.ReLU) for m in qmodel.body)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (Override(name="bdy.*"), r"name='bdy\.\*' matches no layer of SmallNet"),
        (Override(name="head2"), "close names: head"),
        (Override(type=nn.LSTM), "type=LSTM matches no layer"),
        (Override(name="stem", type=nn.Linear), "matches no layer"),
    ],
)
def test_a_pattern_that_hits_nothing_is_an_error(override, message):
    model = SmallNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantConfigError, match=message):
        quantwire.quantize_model(model, QuantConfig(overrides=[override]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_override_with_an_unknown_kind_is_refused():
    with pytest.raises(QuantConfigError, match="did you mean 'weight'"):
        Override(name="head", weights={"bit_width": 8})
