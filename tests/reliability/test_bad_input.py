"""Bad input gives one documented exception that names what is wrong, and leaves the model as it was.

One row per (entry point, bad input). Each row checks that the exception is the documented
:mod:`quantwire.errors` type, that its message names the layer / quantizer / attribute and the bad
value, and, where a model exists before the call, that the failed call left it unchanged: the same
``state_dict`` tensors, the same module types, the same output.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import quantwire
from quantwire import nn as qnn
from quantwire import quant
from quantwire.algorithms import checking_finite
from quantwire.cli import main
from quantwire.errors import CheckpointError, ExportError, QuantConfigError, QuantInputError, QuantwireError

pytestmark = pytest.mark.filterwarnings("ignore")

BAD_BIT_WIDTHS = [(0, "0"), (-1, "-1"), (33, "33"), (2.5, "2.5"), ("8", "'8'"), (True, "True")]
IMAGE = (2, 3, 6, 6)


def float_model() -> nn.Module:
    """A small conv -> relu -> linear model with fixed random weights, in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()


def fixed(*shape: int, seed: int = 1) -> torch.Tensor:
    """The same random tensor on every call."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def images(seed: int = 1) -> torch.Tensor:
    return fixed(*IMAGE, seed=seed)


def calibrated_model(preset: str = "w8a8") -> nn.Module:
    qmodel = quantwire.quantize_model(float_model(), preset).eval()
    return quantwire.calibrate(qmodel, [images()], progress=False)


def integer_model() -> nn.Module:
    return quantwire.to_integer(calibrated_model())


def with_bad_value(tensor: torch.Tensor, bad: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = bad
    return tensor


# -- "the model is unchanged" ---------------------------------------------------------------------


@dataclass
class Snapshot:
    """What a model holds and computes, to compare before and after a failed call."""

    state: dict[str, torch.Tensor]
    types: list[tuple[str, type]]
    training: list[bool]
    output: Any


def snapshot(model: nn.Module, example: Any) -> Snapshot:
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    types = [(name, type(module)) for name, module in model.named_modules()]
    training = [module.training for module in model.modules()]
    return Snapshot(state, types, training, run_model(model, example))


def run_model(model: nn.Module, example: Any) -> Any:
    with torch.no_grad():
        output = model(example)
    return output.detach().clone() if isinstance(output, torch.Tensor) else output


def assert_unchanged(model: nn.Module, before: Snapshot, example: Any) -> None:
    after = snapshot(model, example)
    assert after.types == before.types
    assert after.training == before.training
    assert after.state.keys() == before.state.keys()
    for key, tensor in before.state.items():
        assert same(after.state[key], tensor), key
    assert same(after.output, before.output)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors, NaN equal to NaN (a model whose bad weight was refused still holds it)."""
    if a.is_floating_point():
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
        )
    return torch.equal(a, b)


# -- the matrix -----------------------------------------------------------------------------------


@dataclass
class Case:
    """``act(subject)`` must raise ``error`` matching ``message``; ``subject()`` builds what the
    call receives (None: nothing exists before the call) and ``example`` runs it."""

    act: Callable[[Any], Any]
    error: type[QuantwireError]
    message: str
    subject: Callable[[], Any] | None = None
    example: Callable[[], Any] | None = None


def keyword_bit_width_case(role: str, bit_width: Any, shown: str) -> Case:
    """A bit width given to a QuantLinear quantizer as a ``<role>_bit_width`` keyword."""
    kwargs: dict[str, Any] = {f"{role}_bit_width": bit_width}
    if role in ("input", "bias"):
        kwargs["input_quant"] = quant.Int8ActPerTensorFloat
    if role == "output":
        kwargs["output_quant"] = quant.Int8ActPerTensorFloat
    if role == "bias":
        kwargs["bias_quant"] = quant.Int32Bias
    return Case(
        act=lambda _: qnn.QuantLinear(4, 3, **kwargs),
        error=QuantConfigError,
        message=rf"QuantLinear\.{role}_quant=\w+: bit_width .*got {re.escape(shown)}$",
    )


def config_bit_width_case(kind: str, bit_width: Any, shown: str) -> Case:
    return Case(
        act=lambda model: quantwire.quantize_model(model, {kind: {"bit_width": bit_width}}),
        error=QuantConfigError,
        message=rf"QuantConfig\.{kind}: TensorQuant\.bit_width .*got {re.escape(shown)}$",
        subject=float_model,
        example=images,
    )


def option_bit_width_case(bit_width: Any, shown: str) -> Case:
    """A bad bit width reaching a quantizer through an override's options names the layer path."""
    override = {"name": "3", "weight": {"options": {"bit_width": bit_width}}}
    return Case(
        act=lambda model: quantwire.quantize_model(model, {"overrides": [override]}, inplace=True),
        error=QuantConfigError,
        message=rf"^3: QuantLinear\.weight_quant=\w+: bit_width .*got {re.escape(shown)}$",
        subject=float_model,
        example=images,
    )


def nan_weight_model(bad: float) -> nn.Module:
    model = float_model()
    with torch.no_grad():
        model[3].weight.copy_(with_bad_value(model[3].weight, bad))
    return model


def from_float_case(bad: float, name: str) -> Case:
    """The float layer's weight is checked before it is copied (a learned weight scale would be
    initialised from it): NaN/Inf there is refused, naming both layers and the tensor."""

    def subject() -> nn.Module:
        return nan_weight_model(bad)[3]

    return Case(
        act=lambda layer: qnn.QuantLinear.from_float(layer, weight_quant=quant.Int8WeightPerChannelLsq),
        error=QuantInputError,
        message=rf"QuantLinear\.from_float: Linear\.weight holds {name} values",
        subject=subject,
        example=lambda: fixed(2, 64),
    )


def calibration_data_case(bad: float, name: str) -> Case:
    return Case(
        act=lambda model: quantwire.calibrate(model, [with_bad_value(images(2), bad)], progress=False),
        error=QuantInputError,
        message=rf"calibration: 0\.input_quant \(QuantConv2d\.input_quant=\w+\): received {name} values",
        subject=calibrated_model,
        example=images,
    )


def calibration_activation_case(bad: float, name: str) -> Case:
    """Finite data whose activations overflow to Inf (or NaN: inf - inf) inside the model."""

    def subject() -> nn.Module:
        model = calibrated_model()
        with torch.no_grad():
            model[0].bias.fill_(bad)
        return model

    return Case(
        act=lambda model: quantwire.calibrate(model, [images(2)], progress=False),
        error=QuantInputError,
        message=rf"calibration: 3\.input_quant \(QuantLinear\.input_quant=\w+\): received {name} values",
        subject=subject,
        example=images,
    )


def to_integer_weight_case(bad: float, name: str) -> Case:
    def subject() -> nn.Module:
        model = calibrated_model()
        with torch.no_grad():
            model[3].weight.copy_(with_bad_value(model[3].weight, bad))
        return model

    return Case(
        act=quantwire.to_integer,
        error=QuantInputError,
        message=rf"to_integer: 3\.weight \(QuantLinear\) holds {name} values",
        subject=subject,
        example=images,
    )


def runtime_activation_case(bad: float, name: str) -> Case:
    """Opt-in run-time check: the first quantizer that sees NaN/Inf names itself."""

    def act(model: nn.Module) -> Any:
        with checking_finite(model):
            return model(with_bad_value(images(3), bad))

    return Case(
        act=act,
        error=QuantInputError,
        message=rf"^0\.input_quant \(QuantConv2d\.input_quant=\w+\): the tensor it received holds {name} values",
        subject=calibrated_model,
        example=images,
    )


def export_example_case(bad: float, name: str, tmp: Path) -> Case:
    return Case(
        act=lambda model: quantwire.export_integer(
            model, with_bad_value(images().double(), bad), tmp / "out", progress=False
        ),
        error=QuantInputError,
        message=rf"export_integer: example_input tensor 0 holds {name} values",
        subject=integer_model,
        example=lambda: images().double(),
    )


def checkpoint_path(tmp: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A calibrated LSQ model saved with ``save_quantized``, its state dict edited by ``edit``."""
    path = tmp / "model.safetensors"
    quantwire.save_quantized(calibrated_model("w8a8_lsq"), path)
    if edit is not None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        edit(state)
        save_file(state, str(path), metadata=metadata)
    return path


WEIGHT_SCALE = "3.weight_quant.tensor_quant.scaling_impl.value"
COUNTER = "0.input_quant.tensor_quant.scaling_impl.stats.runtime_stats._extra_state"
CHECKPOINT_EDITS: dict[str, tuple[Callable[[dict], None], str]] = {
    "missing-key": (lambda s: s.pop(WEIGHT_SCALE), rf"missing keys: {re.escape(WEIGHT_SCALE)}"),
    "extra-key": (
        lambda s: s.__setitem__("3.weight_quant.tensor_quant.bogus", torch.zeros(1)),
        r"unexpected keys: 3\.weight_quant\.tensor_quant\.bogus",
    ),
    "mis-shaped-counter": (
        lambda s: s.__setitem__(COUNTER, torch.zeros(7, dtype=torch.int64)),
        rf"mis-shaped keys: {re.escape(COUNTER)} \(checkpoint \(7,\), model \(\)\)",
    ),
    "mis-shaped-weight-scale": (
        lambda s: s.__setitem__(WEIGHT_SCALE, torch.ones(3, 1)),
        rf"mis-shaped keys: {re.escape(WEIGHT_SCALE)} \(checkpoint \(3, 1\), model \(5, 1\)\)",
    ),
    "nan-weight": (lambda s: s["3.weight"].view(-1).__setitem__(0, float("nan")), r"3\.weight holds NaN values"),
}


def load_quantized_case(label: str, tmp: Path) -> Case:
    edit, message = CHECKPOINT_EDITS[label]
    error = CheckpointError  # a NaN weight is one more way for a checkpoint not to fit
    if label == "mis-shaped-weight-scale":  # quantizer shapes are adapted, then the weight is quantized
        message = r"3\.weight_quant \(QuantLinear\.weight_quant=\w+\) can not quantize its weight"
    return Case(
        act=lambda model: quantwire.load_quantized(model, checkpoint_path(tmp, edit)),
        error=error,
        message=message,
        subject=float_model,
        example=images,
    )


def load_state_dict_case(label: str, tmp: Path) -> Case:
    """``load_state_dict`` into a converted model checks shapes and values before loading (missing
    and unexpected keys are PyTorch's to report: a load hook can not tell a strict load from a
    non-strict one; :func:`load_quantized` checks them first)."""
    edit, message = CHECKPOINT_EDITS[label]
    error = QuantInputError if label == "nan-weight" else CheckpointError

    def act(model: nn.Module) -> Any:
        from safetensors.torch import load_file

        return model.load_state_dict(load_file(str(checkpoint_path(tmp, edit))), strict=True)

    return Case(act=act, error=error, message=message, subject=lambda: calibrated_model("w8a8_lsq"), example=images)


def other_architecture_case(tmp: Path) -> Case:
    """A per-channel learned weight scale for 4 channels does not fit a model with 8."""

    def subject() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()

    return Case(
        act=lambda model: quantwire.load_quantized(model, checkpoint_path(tmp)),
        error=CheckpointError,
        message=r"does not fit Sequential.*mis-shaped keys: "
        r"0\.weight \(checkpoint \(4, 3, 3, 3\), model \(8, 3, 3, 3\)\)",
        subject=subject,
        example=images,
    )


def export_into_existing_folder(model: nn.Module, folder: Path) -> Path:
    folder.mkdir()
    return quantwire.export_integer(model, images().double(), folder, progress=False)


def token_scaled_identity() -> nn.Module:
    """A QuantIdentity with one learned scale per token position of 5 tokens, calibrated."""
    layer = qnn.QuantIdentity(act_quant=quant.Int8ActPerTokenLsq, num_tokens=5)
    return quantwire.calibrate(layer, [fixed(2, 5, 4)], progress=False).eval()


def cases(tmp: Path) -> dict[str, Case]:
    table: dict[str, Case] = {}
    for bit_width, shown in BAD_BIT_WIDTHS:
        for role in ("weight", "input", "output", "bias"):
            table[f"keyword-{role}-bit-width-{shown}"] = keyword_bit_width_case(role, bit_width, shown)
            table[f"config-{role}-bit-width-{shown}"] = config_bit_width_case(role, bit_width, shown)
        table[f"act-layer-bit-width-{shown}"] = Case(
            act=lambda _, b=bit_width: qnn.QuantReLU(bit_width=b),
            error=QuantConfigError,
            message=rf"QuantReLU\.act_quant=\w+: bit_width .*got {re.escape(shown)}$",
        )
        table[f"override-option-bit-width-{shown}"] = option_bit_width_case(bit_width, shown)
    for bad, name in ((float("nan"), "NaN"), (float("inf"), "Inf")):
        table[f"from-float-{name}"] = from_float_case(bad, name)
        table[f"quantize-model-{name}"] = Case(
            act=lambda model: quantwire.quantize_model(model, inplace=True),
            error=QuantInputError,
            message=rf"quantize_model: 3\.weight \(Linear\) holds {name} values",
            subject=lambda b=bad: nan_weight_model(b),
            example=images,
        )
        table[f"calibration-data-{name}"] = calibration_data_case(bad, name)
        table[f"to-integer-weight-{name}"] = to_integer_weight_case(bad, name)
        table[f"runtime-activation-{name}"] = runtime_activation_case(bad, name)
        table[f"export-example-{name}"] = export_example_case(bad, name, tmp)
    table["calibration-activation-Inf"] = calibration_activation_case(float("inf"), "Inf")
    table["calibration-empty-batch"] = Case(
        act=lambda model: quantwire.calibrate(model, [torch.zeros(0, 3, 6, 6)], progress=False),
        error=QuantInputError,
        message=r"calibration: 0\.input_quant \(QuantConv2d\.input_quant=\w+\): received an empty tensor "
        r"\(shape \(0, 3, 6, 6\)\)",
        subject=calibrated_model,
        example=images,
    )
    table["calibration-no-batch"] = Case(
        act=lambda model: quantwire.calibrate(model, [], progress=False),
        error=QuantInputError,
        message=r"calibrate: data yielded no batch",
        subject=calibrated_model,
        example=images,
    )
    table["token-scale-shape"] = Case(
        act=lambda layer: layer(fixed(2, 7, 4)),
        error=QuantInputError,
        message=r"QuantIdentity\.act_quant=\w+: can not quantize a tensor of shape \(2, 7, 4\)",
        subject=token_scaled_identity,
        example=lambda: fixed(2, 5, 4),
    )
    table["override-matches-nothing"] = Case(
        act=lambda model: quantwire.quantize_model(model, {"overrides": [{"name": "layer9", "skip": True}]}),
        error=QuantConfigError,
        message=r"override name='layer9' matches no layer of Sequential",
        subject=float_model,
        example=images,
    )
    for label in CHECKPOINT_EDITS:
        table[f"load-quantized-{label}"] = load_quantized_case(label, tmp)
        if label not in ("missing-key", "extra-key"):
            table[f"load-state-dict-{label}"] = load_state_dict_case(label, tmp)
    table["load-quantized-other-architecture"] = other_architecture_case(tmp)
    table["export-folder-exists"] = Case(
        act=lambda model: (
            (tmp / "exists").mkdir() or quantwire.export_integer(model, images().double(), tmp / "exists")
        ),
        error=ExportError,
        message=r"exists\S* already exists; pass overwrite=True",
        subject=integer_model,
        example=lambda: images().double(),
    )
    return table


CASE_IDS = sorted(cases(Path("unused")))


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_raises_a_named_error_and_changes_nothing(case_id: str, tmp_path: Path) -> None:
    case = cases(tmp_path)[case_id]
    subject = case.subject() if case.subject is not None else None
    before = snapshot(subject, case.example()) if isinstance(subject, nn.Module) else None
    with pytest.raises(case.error, match=case.message) as raised:
        case.act(subject)
    assert isinstance(raised.value, QuantwireError)
    if before is not None:
        assert_unchanged(subject, before, case.example())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "a temporary file was left behind"


# -- proxies and from_float ---------------------------------------------------------------------


def test_an_empty_activation_is_a_named_input_error() -> None:
    layer = qnn.QuantReLU(return_quant_tensor=True)
    with pytest.raises(QuantInputError, match=r"QuantReLU\.act_quant=\w+: .*empty"):
        layer(torch.zeros(0, 3))


def test_from_float_refuses_nan_weights_with_a_stats_scaled_quantizer() -> None:
    with pytest.raises(QuantInputError, match=r"QuantLinear.*weight holds NaN"):
        qnn.QuantLinear.from_float(nan_weight_model(float("nan"))[3], weight_quant=quant.Int8WeightPerTensorFloat)


def test_a_per_channel_scale_that_can_not_broadcast_is_named() -> None:
    layer = qnn.QuantConv2d(3, 4, 3, weight_quant=quant.Int8WeightPerChannelLsq)
    scale = layer.weight_quant.tensor_quant.scaling_impl.value
    with torch.no_grad():
        scale.data = torch.ones(7, 1, 1, 1)
    with pytest.raises(
        QuantConfigError,
        match=r"QuantConv2d\.weight_quant=Int8WeightPerChannelLsq: can not quantize the weight of shape \(4, 3, 3, 3\)",
    ):
        layer.quant_weight()


# -- export folder that can not be written --------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_export_into_a_read_only_folder_is_an_export_error(tmp_path: Path) -> None:
    model = integer_model()
    parent = tmp_path / "read-only"
    parent.mkdir()
    before = snapshot(model, images().double())
    parent.chmod(0o500)
    try:
        with pytest.raises(ExportError, match=r"read-only/out"):
            quantwire.export_integer(model, images().double(), parent / "out", progress=False)
    finally:
        parent.chmod(0o700)
    assert list(parent.iterdir()) == []
    assert_unchanged(model, before, images().double())


# -- the command line -----------------------------------------------------------------------------

CLI_MODEL = "torchvision:resnet18"


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main([*argv, "--no-progress"])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    argv = ["quantize", CLI_MODEL, "--image-size", "32", "--batch-size", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out / "model.safetensors"


def write_config(tmp: Path, text: str) -> str:
    path = tmp / "config.yaml"
    path.write_text(text)
    return str(path)


def write_calibration(tmp: Path, bad: float | None, empty: bool = False) -> str:
    data = np.random.default_rng(0).random((0 if empty else 4, 3, 32, 32), dtype=np.float32)
    if bad is not None:
        data[1, 0, 0, 0] = bad
    path = tmp / "data.npy"
    np.save(path, data)
    return str(path)


CLI_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    **{
        f"config-bit-width-{shown}": (
            lambda tmp, b=bit_width: ["--config", write_config(tmp, f"weight: {{bit_width: {b!r}}}\n")],
            rf"QuantConfig\.weight: TensorQuant\.bit_width .*got {re.escape(shown)}",
        )
        for bit_width, shown in BAD_BIT_WIDTHS
    },
    "config-pattern-matches-nothing": (
        lambda tmp: ["--config", write_config(tmp, "overrides:\n  - {name: layer9, skip: true}\n")],
        r"override name='layer9' matches no layer of ResNet",
    ),
    "calibration-nan": (
        lambda tmp: ["--calibration", write_calibration(tmp, float("nan"))],
        r"calibration: conv1\.input_quant \(QuantConv2d\.input_quant=\w+\): received NaN values",
    ),
    "calibration-inf": (
        lambda tmp: ["--calibration", write_calibration(tmp, float("inf"))],
        r"calibration: conv1\.input_quant .*received Inf values",
    ),
    "calibration-empty": (
        lambda tmp: ["--calibration", write_calibration(tmp, None, empty=True)],
        r"calibration: conv1\.input_quant .*received an empty tensor \(shape \(0, 3, 32, 32\)\)",
    ),
}


@pytest.mark.parametrize("case_id", sorted(CLI_CASES))
def test_cli_bad_input_is_one_line_and_non_zero(case_id: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    extra, message = CLI_CASES[case_id]
    argv = ["quantize", CLI_MODEL, "--image-size", "32", "--out", str(tmp_path / "out"), *extra(tmp_path)]
    code, err = cli(argv, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert lines[-1].startswith("quantwire: error: ") and "Traceback" not in err, err
    assert re.search(message, lines[-1]), lines[-1]
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("case_id", ["export-folder-exists", "checkpoint-other-architecture", "checkpoint-nan"])
def test_cli_checkpoint_and_export_errors_are_one_line(
    case_id: str, cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, model = cli_checkpoint, CLI_MODEL
    if case_id == "export-folder-exists":
        (tmp_path / "e").mkdir()
        message = r"/e already exists; pass --overwrite to replace it"
    elif case_id == "checkpoint-other-architecture":
        model, message = "torchvision:resnet34", r"does not fit ResNet.*(missing|unexpected|mis-shaped) keys"
    else:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(cli_checkpoint), framework="pt") as handle:
            metadata = handle.metadata()
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        state["fc.weight"].view(-1)[0] = float("nan")
        checkpoint = tmp_path / "nan.safetensors"
        save_file(state, str(checkpoint), metadata=metadata)
        message = r"fc\.weight holds NaN values"
    argv = ["export", str(checkpoint), "--model", model, "--out", str(tmp_path / "e"), "--input-shape", "1,3,32,32"]
    code, err = cli(argv, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantwire: error: "), err
    assert re.search(message, lines[0]), lines[0]
