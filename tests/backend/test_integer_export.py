"""export_integer and the NumPy reference runner: every recorded operator call of small models,
resnet18, a tiny BERT and a tiny timm ViT is reproduced bit for bit (from the recorded inputs, and chained on the
runner's own outputs); the export is atomic and leaves the model as it was."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import quantwire
from quantwire import config
from quantwire.backend import export as export_module
from quantwire.backend import reference_runner as runner
from quantwire.backend.export import MANIFEST, ExportError, export_integer
from quantwire.backend.fixed_point import rounding_right_shift
from quantwire.backend.integer import to_integer
from quantwire.backend.layers import FixedPointSpec, fixed_rescale
from quantwire.backend.ops import IntMatMul, MulQuant, MulShift, Quantize

OPERATORS = (Quantize, IntMatMul, MulShift, MulQuant)


# -- models ---------------------------------------------------------------------------------------


@dataclass
class Exported:
    """An integer model, its example input, and its export folder."""

    model: nn.Module
    example: Any
    folder: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.folder / MANIFEST).read_text())


def integer_model(model: nn.Module, batches: list) -> nn.Module:
    """``model`` quantized (defaults), calibrated on ``batches`` and converted to integers."""
    qmodel = quantwire.quantize_model(model.eval())
    quantwire.calibrate(qmodel, batches, progress=False)
    return to_integer(qmodel.eval())


def small_cnn() -> nn.Module:
    """Convolutions (strided, grouped, BatchNorm folded), pooling and two linears back to back
    (the second one's input is the first one's output: a float edge)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.Linear(16, 4),
    )


def small_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))


class AllOps(nn.Module):
    """Every backend operator and product kind by hand: a float32 input quantized with a zero
    point, grouped / padded / dilated / transposed convolutions, a requantization with a zero
    point (MulQuant), a module called twice, a product of two activations, and an accumulator
    narrow enough to wrap."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)

        def codes(*shape: int) -> Tensor:
            return torch.randint(-8, 8, shape, generator=generator).double()

        def rescale(channels: int, bias: bool, swl: int = 24) -> tuple:
            multiplier = torch.rand(channels, generator=generator, dtype=torch.float64) * 0.05 + 0.01
            offset = torch.randn(channels, generator=generator, dtype=torch.float64) if bias else None
            return fixed_rescale(multiplier, offset, FixedPointSpec(swl=swl), "all_ops")

        self.quantize = Quantize(torch.tensor(0.05), torch.tensor(3.0), 0, 255, "quantize")
        self.conv2d = IntMatMul("conv2d", codes(4, 1, 3, 3), stride=2, padding=1, groups=2, name="conv2d")
        self.requant = MulQuant(*rescale(4, True), torch.tensor(-2.0), -128, 127, 1, "requant")
        self.deconv2d = IntMatMul(
            "conv_transpose2d", codes(4, 3, 3, 3), stride=2, padding=1, output_padding=1, dilation=2, name="deconv"
        )
        self.shift = MulShift(*rescale(3, True), 1, "shift")
        self.quantize_signed = Quantize(torch.tensor(0.02), torch.tensor(0.0), -128, 127, "signed")
        self.conv1d = IntMatMul("conv1d", codes(5, 3, 3), padding="same", dilation=2, name="conv1d")
        self.deconv1d = IntMatMul("conv_transpose1d", codes(3, 2, 4), stride=3, groups=1, name="deconv1d")
        self.conv3d = IntMatMul("conv3d", codes(2, 3, 1, 2, 3), padding=(0, 1, 1), stride=(1, 1, 2), name="conv3d")
        self.scores = IntMatMul("matmul", name="scores")
        self.scores_rescale = MulShift(*rescale(1, False), -1, "scores_rescale")
        self.wrapping = IntMatMul("linear", codes(6, 64), accumulator_bits=10, overflow="wrap", name="wrap")
        self.narrow = MulQuant(*rescale(6, False, swl=16), torch.tensor(0.0), -8, 7, -1, "narrow")

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        codes = self.quantize(x) - 3.0  # an input equal to an output minus its zero point
        requantized = self.requant(self.conv2d(codes))
        spread = self.deconv2d(requantized + 2.0)  # the requantized codes minus their zero point (-2)
        y = self.shift(spread)
        y_flipped = self.shift(spread.flip(-1))  # the same module, a second call
        signed = self.quantize_signed((y + y_flipped).flatten(2))
        outputs = [self.conv1d(signed), self.deconv1d(signed), self.conv3d(signed.reshape(1, 3, 4, 4, 4))]
        outputs.append(self.scores_rescale(self.scores(signed, signed.transpose(-2, -1))))
        outputs.append(self.narrow(self.wrapping(signed)))
        return tuple(outputs)


def all_ops_input() -> Tensor:
    return torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(1)) * 4


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        vocab_size=100,
        num_hidden_layers=1,
        num_attention_heads=2,
        attn_implementation="sdpa",
    )
    return BertModel(config)


def export_to(folder: Path, model: nn.Module, example: Any) -> Exported:
    export_integer(model, example, folder, progress=False)
    return Exported(model, example, folder)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    batch = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = integer_model(small_cnn(), [batch])
    return export_to(tmp_path_factory.mktemp("cnn") / "export", model, batch[:2].double())


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    batch = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    model = integer_model(small_mlp(), [batch])
    return export_to(tmp_path_factory.mktemp("mlp") / "export", model, batch[:3].double())


@pytest.fixture(scope="module")
def all_ops(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return export_to(tmp_path_factory.mktemp("all_ops") / "export", AllOps().double(), all_ops_input())


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    calibration = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model = integer_model(torchvision.models.resnet18(num_classes=10), [calibration])
    return export_to(tmp_path_factory.mktemp("resnet18") / "export", model, calibration[:1].double())


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    pytest.importorskip("transformers")
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(5))
    model = integer_model(tiny_bert(), [{"input_ids": ids}])
    return export_to(tmp_path_factory.mktemp("bert") / "export", model, {"input_ids": ids[:1]})


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
    )
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LayerNorm.*left float")
        imodel = integer_model(model, [images])
    return export_to(tmp_path_factory.mktemp("vit") / "export", imodel, images[:1].double())


EXPORTS = ["mlp", "cnn", "all_ops", "resnet18", "bert", "vit"]


# -- the runner reproduces every operator ---------------------------------------------------------


@pytest.mark.parametrize("case", EXPORTS)
def test_runner_reproduces_every_operator_bit_exactly(case: str, request: pytest.FixtureRequest) -> None:
    exported: Exported = request.getfixturevalue(case)
    report = runner.run_manifest(exported.folder)
    assert report["ok"], runner.format_report(report)
    assert report["mismatches"] == 0 and report["chain"]["mismatches"] == 0
    assert all(row["mismatches"] == row["chain_mismatches"] == 0 for row in report["operators"])
    # the chained run really ran on the runner's own outputs
    assert report["chain"]["chained_inputs"] >= len(report["operators"]) // 3
    assert len(report["operators"]) == len(exported.manifest["operators"])


def test_every_operator_call_is_recorded_in_execution_order(all_ops: Exported) -> None:
    order = []
    hooks = [
        module.register_forward_hook(lambda module, args, out, name=name: order.append(name))
        for name, module in all_ops.model.named_modules()
        if isinstance(module, OPERATORS)
    ]
    try:
        with torch.no_grad():
            all_ops.model(all_ops.example)
    finally:
        for hook in hooks:
            hook.remove()
    operators = all_ops.manifest["operators"]
    assert [entry["name"] for entry in operators] == order
    assert [entry["index"] for entry in operators] == list(range(len(order)))
    assert {entry["type"] for entry in operators} == {"Quantize", "IntMatMul", "MulShift", "MulQuant"}
    shift_calls = [entry["call"] for entry in operators if entry["name"] == "shift"]
    assert shift_calls == [0, 1]


def test_bert_attention_products_take_two_recorded_activations(bert: Exported) -> None:
    operators = bert.manifest["operators"]
    scores = next(entry for entry in operators if entry["name"].endswith("quant_attention.scores"))
    assert [item["role"] for item in scores["inputs"]] == ["x", "w"] and scores["params"] == {}
    assert not scores["attributes"]["weight_from_buffer"]
    sources = [operators[item["source"]["operator"]]["name"] for item in scores["inputs"]]
    assert [source.rsplit(".", 1)[-1] for source in sources] == ["quantize_q", "quantize_k"]
    adds = [entry["call"] for entry in operators if entry["name"].endswith("attention.output.residual_add.quantize")]
    assert adds == [0, 1]


# -- manifest and files ---------------------------------------------------------------------------


def test_manifest_describes_format_operators_and_parameters(resnet18: Exported) -> None:
    manifest = resnet18.manifest
    assert manifest["format"] == export_module.FORMAT and manifest["format_version"] == export_module.FORMAT_VERSION
    assert manifest["model_class"] == "torchvision.models.resnet.ResNet"
    assert manifest["rounding"] == "half-to-even"
    assert manifest["model_inputs"] == [{"name": "0", "dtype": "float64", "shape": [1, 3, 32, 32]}]
    by_type: dict[str, list[dict]] = {}
    for entry in manifest["operators"]:
        assert set(entry) == {"index", "name", "type", "call", "inputs", "outputs", "params", "attributes"}
        by_type.setdefault(entry["type"], []).append(entry)
    conv1 = next(entry for entry in by_type["IntMatMul"] if entry["name"] == "conv1.matmul")
    assert conv1["attributes"] == {
        "op": "conv2d",
        "op_kwargs": {"stride": [2, 2], "padding": [3, 3], "dilation": [1, 1], "groups": 1},
        "accumulator_bits": 32,
        "overflow": "raise",
        "weight_from_buffer": True,
    }
    # weights are stored in the narrowest integer dtype that holds them: int8 codes take 1 byte
    assert conv1["params"]["weight"]["shape"] == [64, 3, 7, 7] and conv1["params"]["weight"]["dtype"] == "int8"
    assert conv1["outputs"][0]["role"] == "acc" and len(conv1["outputs"][0]["range"]) == 2
    rescale = by_type["MulShift"][0]
    assert {"swl", "sfl", "channel_dim", "has_bias"} <= set(rescale["attributes"])
    assert rescale["attributes"]["swl"] == 32 and set(rescale["params"]) == {"multiplier", "bias"}
    assert rescale["outputs"][0]["dtype"] == "float64"
    quantize = by_type["Quantize"][0]
    assert quantize["attributes"] == {
        "qmin": -128,
        "qmax": 127,
        "bit_width": 8,
        "signed": True,
        "rounding": "half-to-even",
        "compute_dtype": "float64",
    }
    assert quantize["inputs"][0]["dtype"] == "float64" and quantize["outputs"][0]["dtype"] == "int64"
    assert {record["dtype"] for record in quantize["params"].values()} == {"float64"}


def test_mul_quant_and_product_options_are_in_the_manifest(all_ops: Exported) -> None:
    operators = {(entry["name"], entry["call"]): entry for entry in all_ops.manifest["operators"]}
    requant = operators["requant", 0]
    assert requant["attributes"]["qmin"] == -128 and requant["attributes"]["bit_width"] == 8
    assert requant["attributes"]["sfl"] == all_ops.model.requant.sfl
    assert set(requant["params"]) == {"multiplier", "bias", "zero_point"}
    assert operators["quantize", 0]["attributes"]["compute_dtype"] == "float32"
    assert operators["quantize", 0]["inputs"][0]["dtype"] == "float32"
    assert operators["conv1d", 0]["attributes"]["op_kwargs"] == {"padding": "same", "dilation": 2}
    assert operators["wrapping", 0]["attributes"]["overflow"] == "wrap"
    assert operators["narrow", 0]["attributes"]["bit_width"] == 4


def test_files_exist_once_and_match_their_records(resnet18: Exported) -> None:
    manifest = resnet18.manifest
    records = [
        record
        for entry in manifest["operators"]
        for record in entry["inputs"] + entry["outputs"] + list(entry["params"].values())
    ]
    files = {record["file"] for record in records}
    on_disk = {str(path.relative_to(resnet18.folder)) for path in resnet18.folder.rglob("*.npy")}
    assert files == on_disk
    for record in records[:60]:
        array = np.load(resnet18.folder / record["file"], allow_pickle=False)
        assert str(array.dtype) == record["dtype"] and list(array.shape) == record["shape"]
        if "range" in record:
            assert record["range"] == [int(array.min()), int(array.max())]
    # a module's parameters are written once, however often it is called
    adds = [entry for entry in manifest["operators"] if entry["name"] == "layer1.0.residual_add.quantize"]
    assert len(adds) == 2 and adds[0]["params"] == adds[1]["params"]


def test_int64_files_hold_the_operators_integers(all_ops: Exported) -> None:
    seen: list[tuple[nn.Module, Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda module, args, out: seen.append((module, out.clone())))
        for module in all_ops.model.modules()
        if isinstance(module, OPERATORS)
    ]
    try:
        with torch.no_grad():
            all_ops.model(all_ops.example)
    finally:
        for hook in hooks:
            hook.remove()
    for entry, (module, output) in zip(all_ops.manifest["operators"], seen, strict=True):
        array = np.load(all_ops.folder / entry["outputs"][0]["file"])
        if isinstance(module, MulShift):
            assert array.dtype == np.float64
        else:
            assert array.dtype == np.int64
            assert output.dtype == torch.float64 and torch.equal(output, output.round())
        assert np.array_equal(array, output.numpy().astype(array.dtype))
        assert torch.equal(torch.from_numpy(array).double(), output)
    weight = np.load(all_ops.folder / "params" / "conv2d.weight.npy")
    assert weight.dtype == np.int8 and np.array_equal(weight, all_ops.model.conv2d.weight.numpy())


def test_edges_link_inputs_to_the_outputs_they_equal(all_ops: Exported) -> None:
    manifest = all_ops.manifest
    operators = manifest["operators"]
    by_name = {(entry["name"], entry["call"]): entry for entry in operators}

    def source(name: str, role: str = "x", call: int = 0) -> dict[str, Any] | None:
        record = next(item for item in by_name[name, call]["inputs"] if item["role"] == role)
        return record["source"]

    conv_source = source("conv2d")
    assert operators[conv_source["operator"]]["name"] == "quantize" and conv_source["subtract_zero_point"]
    deconv_source = source("deconv2d")
    assert operators[deconv_source["operator"]]["name"] == "requant" and deconv_source["subtract_zero_point"]
    requant_source = source("requant", "accumulator")
    assert requant_source == {
        "operator": by_name["conv2d", 0]["index"],
        "output": "acc",
        "subtract_zero_point": False,
        "match": "identity",
    }
    assert source("shift", "accumulator", call=1) is None  # flipped by float glue
    assert source("conv3d") is None  # reshaped by float glue
    assert source("scores", "w") is None  # transposed
    assert operators[source("scores")["operator"]]["name"] == "quantize_signed"
    edges = {(tuple(edge["from"]), tuple(edge["to"])) for edge in manifest["edges"]}
    expected = {
        ((item["source"]["operator"], item["source"]["output"]), (entry["index"], item["role"]))
        for entry in operators
        for item in entry["inputs"]
        if item["source"] is not None
    }
    assert edges == expected and len(edges) >= 6
    for edge in manifest["edges"]:
        assert edge["from"][0] < edge["to"][0]


# -- the runner -----------------------------------------------------------------------------------


def corrupted_copy(exported: Exported, destination: Path, name: str, role: str) -> Path:
    """A copy of the export with one element of operator ``name``'s ``role`` tensor off by one."""
    folder = Path(shutil.copytree(exported.folder, destination))
    entry = next(entry for entry in exported.manifest["operators"] if entry["name"] == name)
    record = next(item for item in entry["inputs"] + entry["outputs"] if item["role"] == role)
    array = np.load(folder / record["file"])
    array.reshape(-1)[0] += 1
    np.save(folder / record["file"], array)
    return folder


def test_runner_reports_a_corrupted_output(mlp: Exported, tmp_path: Path) -> None:
    folder = corrupted_copy(mlp, tmp_path / "bad", "0.matmul", "acc")
    report = runner.run_manifest(folder)
    assert not report["ok"] and report["mismatches"] == 1 and report["chain"]["mismatches"] == 1
    row = next(row for row in report["operators"] if row["name"] == "0.matmul")
    assert row["mismatches"] == 1 and row["max_abs_diff"] == 1.0
    assert runner.main([str(folder)]) == 1
    assert runner.main([str(mlp.folder)]) == 0


def test_chain_detects_what_recorded_inputs_hide(mlp: Exported, tmp_path: Path) -> None:
    """A corrupted *input* that has a source: the direct check disagrees with its recorded
    output, the chained one (fed with the runner's own outputs) does not."""
    folder = corrupted_copy(mlp, tmp_path / "bad", "0.rescale", "accumulator")
    report = runner.run_manifest(folder)
    row = next(row for row in report["operators"] if row["name"] == "0.rescale")
    assert row["mismatches"] >= 1 and row["chain_mismatches"] == 0 and row["chained_inputs"] == 1


def test_runner_refuses_what_is_not_an_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(runner.ManifestError, match="manifest.json"):
        runner.run_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other", "format_version": 1}))
    with pytest.raises(runner.ManifestError, match="not a quantwire-integer-export"):
        runner.run_manifest(tmp_path)
    assert runner.main([str(tmp_path)]) == 2
    assert "not a quantwire-integer-export" in capsys.readouterr().err


def test_runner_names_an_operator_it_can_not_compute(mlp: Exported, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(mlp.folder, tmp_path / "copy"))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["operators"][1]["attributes"]["op"] = "bilinear"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(runner.ManifestError, match=r"IntMatMul 0\.matmul \(operator 1\): unknown product 'bilinear'"):
        runner.run_manifest(folder)


def test_runner_runs_without_torch(cnn: Exported) -> None:
    """The runner file alone, torch made unimportable: the table and exit code 0."""
    script = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['reference_runner', sys.argv[1]]; "
        f"runpy.run_path({str(Path(runner.__file__))!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", script, str(cnn.folder)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "OK: every output reproduced bit for bit" in result.stdout and "0.matmul" in result.stdout


def test_command_line_exits_non_zero_on_a_mismatch(mlp: Exported, tmp_path: Path) -> None:
    folder = corrupted_copy(mlp, tmp_path / "bad", "3.rescale", "y")
    result = subprocess.run(
        [sys.executable, "-m", "quantwire.backend.reference_runner", str(folder)], capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr
    assert "MISMATCH" in result.stdout


CONVOLUTIONS = [
    ("conv1d", (2, 4, 9), (6, 2, 3), {"stride": 2, "padding": 1, "dilation": 2, "groups": 2}),
    ("conv1d", (1, 3, 8), (4, 3, 4), {"padding": "same", "dilation": 1}),
    ("conv1d", (1, 3, 8), (4, 3, 3), {"padding": "valid"}),
    ("conv2d", (2, 4, 7, 6), (6, 2, 3, 2), {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2}),
    ("conv3d", (1, 2, 4, 5, 6), (3, 2, 2, 3, 3), {"stride": (1, 2, 2), "padding": 1}),
    ("conv_transpose1d", (2, 4, 5), (4, 3, 3), {"stride": 3, "padding": 2, "output_padding": 1, "dilation": 2}),
    ("conv_transpose1d", (1, 2, 5), (2, 2, 2), {"stride": 4, "padding": 2}),
    ("conv_transpose2d", (1, 4, 4, 5), (4, 2, 3, 2), {"stride": (2, 3), "padding": (1, 0), "groups": 2}),
    ("conv_transpose2d", (1, 2, 3, 3), (2, 3, 4, 4), {"stride": 2, "padding": 5, "output_padding": 1, "dilation": 3}),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("op, x_shape, w_shape, kwargs", CONVOLUTIONS)
def test_runner_convolutions_match_torch(op: str, x_shape: tuple, w_shape: tuple, kwargs: dict) -> None:
    generator = torch.Generator().manual_seed(6)
    x = torch.randint(-128, 128, x_shape, generator=generator)
    w = torch.randint(-128, 128, w_shape, generator=generator)
    expected = getattr(F, op)(x.double(), w.double(), **kwargs)
    attributes = {"op": op, "op_kwargs": export_module._jsonable(kwargs), "accumulator_bits": 64}
    computed = runner.int_matmul({"x": x.numpy(), "w": w.numpy()}, {}, attributes)
    assert computed.dtype == np.int64
    assert np.array_equal(computed, expected.numpy().astype(np.int64))


def test_runner_rounding_shift_matches_the_backend() -> None:
    generator = torch.Generator().manual_seed(7)
    values = torch.randint(-(2**40), 2**40, (4000,), generator=generator)
    values = torch.cat([values, torch.arange(-40, 41) * 4, torch.arange(-40, 41) * 4 + 2])  # ties
    for shift in (-3, 0, 1, 2, 3, 17):
        expected = rounding_right_shift(values, shift)
        assert np.array_equal(runner.rounding_right_shift(values.numpy(), shift), expected.numpy())


# -- atomicity and failures -----------------------------------------------------------------------


@dataclass
class Snapshot:
    """What an export must leave unchanged: outputs, state dict, accumulator statistics."""

    output: Tensor
    state: dict[str, Tensor]
    statistics: dict[str, float]

    @classmethod
    def of(cls, model: nn.Module, example: Tensor) -> Snapshot:
        statistics = _statistics(model)
        with torch.no_grad():
            output = model(example)
        _restore_statistics(model, statistics)
        return cls(output, {key: value.clone() for key, value in model.state_dict().items()}, statistics)

    def assert_unchanged(self, model: nn.Module, example: Tensor) -> None:
        for name, module in model.named_modules():
            assert not module._forward_hooks and not module._forward_hooks_with_kwargs, name
            assert not module._forward_pre_hooks, name
        assert _statistics(model) == self.statistics
        state = model.state_dict()
        assert state.keys() == self.state.keys()
        assert all(torch.equal(state[key], value) for key, value in self.state.items())
        with torch.no_grad():
            assert torch.equal(model(example), self.output)


def _statistics(model: nn.Module) -> dict[str, float]:
    return {name: m.max_abs_accumulator for name, m in model.named_modules() if isinstance(m, IntMatMul)}


def _restore_statistics(model: nn.Module, statistics: dict[str, float]) -> None:
    for name, value in statistics.items():
        model.get_submodule(name).max_abs_accumulator = value


@pytest.fixture
def fresh(cnn: Exported) -> Exported:
    """The small CNN's integer model (a copy) with a snapshot to compare against, no folder yet."""
    return Exported(copy.deepcopy(cnn.model), cnn.example, Path())


def test_export_leaves_the_model_as_it_was(fresh: Exported, tmp_path: Path) -> None:
    snapshot = Snapshot.of(fresh.model, fresh.example)
    export_integer(fresh.model, fresh.example, tmp_path / "out", progress=False)
    snapshot.assert_unchanged(fresh.model, fresh.example)


def test_existing_folder_is_kept_without_overwrite(fresh: Exported, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    snapshot = Snapshot.of(fresh.model, fresh.example)
    with pytest.raises(ExportError, match="already exists; pass overwrite=True") as raised:
        export_integer(fresh.model, fresh.example, out, progress=False)
    assert isinstance(raised.value, quantwire.errors.QuantwireError)  # one hierarchy: quantwire.errors
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    snapshot.assert_unchanged(fresh.model, fresh.example)


def test_overwrite_replaces_the_folder_once_the_new_one_is_complete(fresh: Exported, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert export_integer(fresh.model, fresh.example, str(out), overwrite=True, progress=False) == out
    assert not (out / "old.txt").exists() and (out / MANIFEST).is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert runner.run_manifest(out)["ok"]


def test_overwrite_refuses_a_file(fresh: Exported, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ExportError, match="not a folder"):
        export_integer(fresh.model, fresh.example, tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out").read_text() == "a file"


@pytest.mark.parametrize("parent", ["missing", "file"])
def test_parent_that_is_no_folder_is_refused(fresh: Exported, tmp_path: Path, parent: str) -> None:
    if parent == "file":
        (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="is not an existing folder"):
        export_integer(fresh.model, fresh.example, tmp_path / parent / "out", progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ([] if parent == "missing" else ["file"])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_parent_leaves_nothing(fresh: Exported, tmp_path: Path) -> None:
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o500)
    snapshot = Snapshot.of(fresh.model, fresh.example)
    try:
        with pytest.raises(ExportError, match="can not write the export"):
            export_integer(fresh.model, fresh.example, parent / "out", progress=False)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)
    snapshot.assert_unchanged(fresh.model, fresh.example)


def test_parent_refusing_writes_leaves_nothing(
    fresh: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent refusing new folders (what a read-only folder does to a non-root user)."""
    mkdir = Path.mkdir

    def refusing_mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if self.parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    snapshot = Snapshot.of(fresh.model, fresh.example)
    with pytest.raises(ExportError, match="can not write the export .*Permission denied"):
        export_integer(fresh.model, fresh.example, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
    snapshot.assert_unchanged(fresh.model, fresh.example)


def test_write_failure_midway_leaves_nothing(fresh: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk refusing the 10th file (as an unwritable or full disk would, even for root):
    the partly written temporary folder is removed, an existing folder kept."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    save, calls = np.save, []

    def failing_save(*args: Any, **kwargs: Any) -> None:
        calls.append(args[0])
        if len(calls) == 10:
            raise PermissionError(13, "Permission denied", str(args[0]))
        save(*args, **kwargs)

    monkeypatch.setattr(export_module.np, "save", failing_save)
    snapshot = Snapshot.of(fresh.model, fresh.example)
    with pytest.raises(ExportError, match="can not write the export .*Permission denied"):
        export_integer(fresh.model, fresh.example, out, overwrite=True, progress=False)
    assert len(calls) == 10
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in out.iterdir()] == ["old.txt"]
    snapshot.assert_unchanged(fresh.model, fresh.example)


def test_exception_mid_run_leaves_nothing(fresh: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = Snapshot.of(fresh.model, fresh.example)
    forward, calls = MulShift.forward, []

    def failing_forward(self: MulShift, accumulator: Tensor) -> Tensor:
        calls.append(self.name)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return forward(self, accumulator)

    monkeypatch.setattr(MulShift, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="device lost"):
        export_integer(fresh.model, fresh.example, tmp_path / "out", progress=False)
    monkeypatch.undo()
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
    snapshot.assert_unchanged(fresh.model, fresh.example)


class NotIntegers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.product = IntMatMul("linear", torch.ones(2, 3), name="product")

    def forward(self, x: Tensor) -> Tensor:
        return self.product(x)


def test_non_integers_are_refused_naming_the_operator(tmp_path: Path) -> None:
    model = NotIntegers()
    with pytest.raises(ExportError, match=r"IntMatMul product input x: expected integers .*, found 0\.5"):
        export_integer(model, torch.full((1, 3), 0.5, dtype=torch.float64), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert not model.product._forward_hooks_with_kwargs and model.product.max_abs_accumulator == 0.0


def test_a_model_without_backend_operators_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no integer backend operator .*to_integer"):
        export_integer(nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_while_writing(
    mlp: Exported, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "PROGRESS", True)
    export_integer(mlp.model, mlp.example, tmp_path / "shown", progress=True)
    assert "export_integer" in capsys.readouterr().err
    monkeypatch.setattr(config, "PROGRESS", False)
    export_integer(mlp.model, mlp.example, tmp_path / "hidden", progress=True)
    assert "export_integer" not in capsys.readouterr().err
