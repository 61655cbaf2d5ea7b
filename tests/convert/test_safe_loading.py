"""Safe loading and atomic writes (issue 9).

A pickle whose unpickling would run code is refused, with a quantwire error and without running
it, by every path that reads a checkpoint: ``load_quantized``/``read_checkpoint`` and the command
line's loaders (float weights, calibration tensors, Hugging Face folders, ``quantwire inspect``,
``export`` and ``quantize``). Every writer (checkpoints, the ONNX file, the integer export folder,
the demo report) leaves the previous file or the complete new one: a failure in the middle of a
write, a failing rename, or a process killed mid-write never leaves half of one.
"""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import quantwire
from quantwire import cli
from quantwire.backend import ExportError, export_integer, export_onnx
from quantwire.cli_support import models as cli_models
from quantwire.convert import CheckpointError, load_quantized, save_quantized
from quantwire.convert.checkpoint import read_checkpoint
from quantwire.errors import QuantwireError
from quantwire.files import atomic_write, atomic_write_text

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class OpensAFile:
    """Unpickling this calls ``open(marker, "w")``: the marker file proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def zip_checkpoint(path: Path, marker: Path) -> Path:
    """A ``torch.save`` (zip) file shaped like a quantwire checkpoint with the payload inside."""
    torch.save({"state_dict": {"weight": torch.ones(2)}, "quantwire": OpensAFile(marker)}, path)
    return path


def legacy_pickle(path: Path, marker: Path) -> Path:
    """A bare pickle (the pre-zip ``torch.save`` format) that is only the payload."""
    path.write_bytes(pickle.dumps({"state_dict": OpensAFile(marker)}))
    return path


MALICIOUS_FILES = {"zip.pt": zip_checkpoint, "legacy.pth": legacy_pickle, "pickle.safetensors": legacy_pickle}


@pytest.fixture(params=sorted(MALICIOUS_FILES))
def malicious(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """A malicious checkpoint file and the marker its unpickling would create."""
    marker = tmp_path / "marker"
    return MALICIOUS_FILES[request.param](tmp_path / request.param, marker), marker


def test_the_payload_runs_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control: the files the tests below refuse really would run code."""
    for name, make in MALICIOUS_FILES.items():
        marker = tmp_path / f"marker-{name}"
        path = make(tmp_path / name, marker)
        if make is zip_checkpoint:
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.exists(), name


def small_float() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_load_quantized_refuses_a_pickle_with_code(malicious: tuple[Path, Path]) -> None:
    path, marker = malicious
    with pytest.raises(CheckpointError, match="can not read the checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_quantized(small_float(), path)
    assert not marker.exists()


def test_the_cli_loaders_refuse_a_pickle_with_code(malicious: tuple[Path, Path]) -> None:
    path, marker = malicious
    with pytest.raises(cli_models.CliError, match="can not be read safely"):
        cli_models.load_float_weights(small_float(), path)
    if path.suffix != ".safetensors":  # calibration data is .npy or .pt
        with pytest.raises(cli_models.CliError, match="calibration data .* can not be read safely"):
            cli_models.load_calibration(str(path), image_size=8)
    assert not marker.exists()


@pytest.mark.slow  # importing transformers' BERT dominates
def test_a_hugging_face_folder_with_a_pickle_with_code_is_refused(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    config.save_pretrained(folder)
    marker = tmp_path / "marker"
    torch.save({"embeddings.word_embeddings.weight": OpensAFile(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(cli_models.CliError, match="can not be read safely"):
        cli_models.build_model(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{path}", "--model", "torchvision:resnet18"],
        ["export", "{path}", "--model", "torchvision:resnet18", "--out", "{out}"],
        ["quantize", "torchvision:resnet18", "--checkpoint", "{path}", "--out", "{out}"],
        ["quantize", "torchvision:resnet18", "--calibration", "{path}", "--out", "{out}"],
    ],
    ids=["inspect", "export", "quantize-checkpoint", "quantize-calibration"],
)
def test_the_command_refuses_a_pickle_with_code(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    path = zip_checkpoint(tmp_path / "evil.pt", marker)
    out = tmp_path / "out"
    argv = [part.format(path=path, out=out) for part in command] + ["--no-progress"]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("quantwire: error: ") and "evil.pt" in error and len(error.splitlines()) == 1
    assert not marker.exists()
    assert not (out / "model.safetensors").exists()


# -- atomic checkpoints ---------------------------------------------------------------------------


def quantized(seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    qmodel = quantwire.quantize_model(small_float(), "w8a8")
    x = torch.randn(4, 8)
    quantwire.calibrate(qmodel, [x], progress=False)
    return qmodel.eval(), x


def half_then(exception: BaseException, real: Callable[..., Any]) -> Callable[..., Any]:
    """A serializer that writes the real bytes, truncates the file to half of them, then raises
    ``exception``: a crash in the middle of the write."""

    def serialise(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        real(obj, target, *args, **kwargs)
        size = os.path.getsize(target)
        os.truncate(target, size // 2)
        raise exception

    return serialise


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize(
    ("exception", "expected"),
    [(OSError(28, "No space left on device"), CheckpointError), (KeyboardInterrupt(), KeyboardInterrupt)],
    ids=["disk-full", "interrupted"],
)
def test_a_crash_mid_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, exception: BaseException, expected: type
) -> None:
    old, x = quantized(0)
    path = save_quantized(old, tmp_path / f"model{suffix}")
    before = path.read_bytes()
    new, _ = quantized(1)
    if suffix == ".safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", half_then(exception, safetensors.torch.save_file))
    else:
        monkeypatch.setattr(torch, "save", half_then(exception, torch.save))
    with pytest.raises(expected):
        save_quantized(new, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with torch.no_grad():
        assert torch.equal(load_quantized(small_float(), path).eval()(x), old(x))


def test_a_failing_rename_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, _ = quantized(0)
    path = save_quantized(old, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def refuse(source: Any, destination: Any) -> None:
        raise PermissionError(13, "Permission denied", str(destination))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(CheckpointError, match="model.safetensors: can not write the checkpoint.*Permission denied"):
        save_quantized(quantized(1)[0], path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_written_file_has_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    """The temporary file becomes the checkpoint: it must not stay private to its owner."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    checkpoint = save_quantized(quantized(0)[0], tmp_path / "model.pt")
    text = atomic_write_text(tmp_path / "report.md", "# report\n")
    mode = stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE(checkpoint.stat().st_mode) == mode
    assert stat.S_IMODE(text.stat().st_mode) == mode


def test_atomic_write_replaces_whole_files_and_cleans_up(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(ValueError, match="refused"):
        atomic_write(path, lambda temporary: (temporary.write_text("half"), int("refused")))
    assert path.read_text() == "old"
    assert atomic_write_text(path, "new").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "a.txt", "text")


# -- atomic exports -------------------------------------------------------------------------------


def integer_model() -> tuple[nn.Module, torch.Tensor]:
    qmodel, x = quantized(0)
    return quantwire.to_integer(qmodel), x.double()


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failing_rename_of_the_new_export_folder_puts_the_old_one_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imodel, x = integer_model()
    out = export_integer(imodel, x, tmp_path / "export", progress=False)
    before = folder_contents(out)
    replace = os.replace

    def refuse_the_new_folder(source: Any, destination: Any) -> None:
        if Path(source).name.endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(destination))
        replace(source, destination)

    monkeypatch.setattr(os, "replace", refuse_the_new_folder)
    with pytest.raises(ExportError, match="can not write the export .*Permission denied"):
        export_integer(imodel, x, out, overwrite=True, progress=False)
    monkeypatch.undo()
    assert folder_contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_an_exception_mid_write_of_the_export_folder_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only OSError: whatever interrupts the write, the temporary folder goes."""
    imodel, x = integer_model()
    out = export_integer(imodel, x, tmp_path / "export", progress=False)
    before = folder_contents(out)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("quantwire.backend.export.json.dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_integer(imodel, x, out, overwrite=True, progress=False)
    monkeypatch.undo()
    assert folder_contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.fixture
def onnx_model() -> tuple[nn.Module, torch.Tensor]:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    return quantized(0)


def test_a_crash_mid_write_keeps_the_previous_onnx_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, onnx_model: tuple[nn.Module, torch.Tensor]
) -> None:
    qmodel, x = onnx_model
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")

    def half_then_full_disk(target: Path) -> None:
        os.truncate(target, os.path.getsize(target) // 2)  # the traced graph, half written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("quantwire.backend.onnx_export._constants_to_initializers", half_then_full_disk)
    with pytest.raises(ExportError, match="can not write the ONNX file .*No space left"):
        export_onnx(qmodel, x, path)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_failing_rename_keeps_the_previous_onnx_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, onnx_model: tuple[nn.Module, torch.Tensor]
) -> None:
    qmodel, x = onnx_model
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")

    def refuse(source: Any, destination: Any) -> None:
        raise PermissionError(13, "Permission denied", str(destination))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(ExportError, match="can not write the ONNX file .*Permission denied"):
        export_onnx(qmodel, x, path)
    monkeypatch.undo()
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


# -- a process killed mid-write -------------------------------------------------------------------

# Each script saves a new model over the one the test wrote, and dies (os._exit: no cleanup, no
# finally blocks, as a kill would) once half of the new bytes are on disk.
KILLED_MID_WRITE = {
    "checkpoint": """
        import os, sys, torch, safetensors.torch, quantwire
        sys.path.insert(0, {tests!r})
        from test_safe_loading import quantized
        real = safetensors.torch.save_file
        def dies(tensors, target, *args, **kwargs):
            real(tensors, target, *args, **kwargs)
            os.truncate(target, os.path.getsize(target) // 2)
            os._exit(17)
        safetensors.torch.save_file = dies
        quantwire.save_quantized(quantized(1)[0], {path!r})
    """,
    "integer export": """
        import os, sys, numpy, quantwire
        sys.path.insert(0, {tests!r})
        from test_safe_loading import integer_model
        imodel, x = integer_model()
        real, calls = numpy.save, []
        def dies(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os._exit(17)
            real(*args, **kwargs)
        numpy.save = dies
        quantwire.export_integer(imodel, x, {path!r}, overwrite=True, progress=False)
    """,
}


@pytest.mark.slow  # two fresh interpreters
def test_a_process_killed_mid_write_leaves_the_previous_file(tmp_path: Path) -> None:
    """What a crash leaves: the previous checkpoint / export folder, whole and loadable (a
    killed process can not remove its hidden temporary, which never shadows the real name)."""
    old, x = quantized(0)
    checkpoint = save_quantized(old, tmp_path / "model.safetensors")
    imodel, x_int = integer_model()
    export = export_integer(imodel, x_int, tmp_path / "export", progress=False)
    before = {"checkpoint": checkpoint.read_bytes(), "integer export": folder_contents(export)}
    paths = {"checkpoint": checkpoint, "integer export": export}
    env = {**os.environ, "QUANTWIRE_PROGRESS": "0"}
    tests = str(Path(__file__).parent)
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script.format(tests=tests, path=str(paths[name])))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, script in KILLED_MID_WRITE.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 17, f"{name}: {stderr}"
    assert checkpoint.read_bytes() == before["checkpoint"]
    assert folder_contents(export) == before["integer export"]
    with torch.no_grad():
        assert torch.equal(load_quantized(small_float(), checkpoint).eval()(x), old(x))
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("model.safetensors", "export"))
    assert all(name.startswith((".model.safetensors.", ".export.")) for name in leftovers), leftovers


def test_refusals_are_quantwire_errors() -> None:
    assert issubclass(CheckpointError, QuantwireError)
    assert issubclass(cli_models.CliError, QuantwireError)
