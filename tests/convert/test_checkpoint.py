"""Fake-quant checkpoints: save, rebuild on the float architecture in a fresh process, and the
checkpoints that must be refused."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import quantwire
from quantwire.convert import CheckpointError, QuantConfig, TensorQuant, load_quantized, save_quantized
from quantwire.convert.checkpoint import read_checkpoint
from quantwire.nn import QuantLinear
from quantwire.proxy.base import adapting_quantizer_shapes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Run in a subprocess: a fresh interpreter proves the checkpoint carries everything needed.
FRESH_PROCESS = """
import sys, torch, quantwire
sys.path.insert(0, {tests!r})
from test_checkpoint import build_float
data = torch.load({io!r}, weights_only=True)
qmodel = quantwire.load_quantized(build_float(), {checkpoint!r}).eval()
with torch.no_grad():
    output = qmodel(data["x"])
print("BITWISE" if torch.equal(output, data["y"]) else f"DIFFERENT {{(output - data['y']).abs().max()}}")
"""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.head(x.mean(dim=(2, 3)))


def build_float() -> nn.Module:
    """The architecture, with weights unrelated to the saved ones."""
    return Net()


def trained_quantized(config: QuantConfig | str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Net()
    qmodel = quantwire.quantize_model(model, config)
    x = torch.randn(4, 3, 8, 8)
    quantwire.calibrate(qmodel, [x], progress=False)
    qmodel.train()
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        qmodel(x).square().mean().backward()
        optimizer.step()
    return qmodel.eval(), x


def run_fresh(tmp_path: Path, checkpoint: Path, x: torch.Tensor, y: torch.Tensor) -> str:
    io = tmp_path / "io.pt"
    torch.save({"x": x, "y": y}, io)
    script = FRESH_PROCESS.format(tests=str(Path(__file__).parent), io=str(io), checkpoint=str(checkpoint))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "QUANTWIRE_PROGRESS": "0"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


CONFIGS = {
    "w8a8": "w8a8",
    "w4a4_lsq_fold_bn": QuantConfig.from_dict({"preset": "w4a4_lsq", "fold_bn": True}),
    "mixed": QuantConfig(
        weight=TensorQuant(bit_width=4, granularity="channel", symmetric=False),
        input=TensorQuant(bit_width=6, method="lsq_plus"),
        overrides=[{"name": "head", "weight": {"bit_width": 8, "symmetric": True}}],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_then_load_in_a_fresh_process_is_bit_identical(tmp_path, name, suffix):
    qmodel, x = trained_quantized(CONFIGS[name])
    with torch.no_grad():
        y = qmodel(x)
    checkpoint = save_quantized(qmodel, tmp_path / f"model{suffix}")
    assert run_fresh(tmp_path, checkpoint, x, y) == "BITWISE"


def test_quantizers_an_algorithm_redeclared_are_rebuilt_from_the_checkpoint(tmp_path):
    gptq = __import__("importlib").import_module("quantwire.algorithms.gptq").gptq
    qmodel, x = trained_quantized("w4a8")
    gptq(qmodel, [x], progress=False)  # freezes every weight scale (a redeclared quantizer)
    quantwire.prune(qmodel, method="nm", n=2, m=4, layers=["head"])
    qmodel.eval()
    with torch.no_grad():
        y = qmodel(x)
    checkpoint = save_quantized(qmodel, tmp_path / "model.safetensors")
    restored = load_quantized(build_float(), checkpoint).eval()
    with torch.no_grad():
        assert torch.equal(restored(x), y)
    assert restored.head.weight_quant.pruning is not None
    assert quantwire.sparsity(restored)["head"].fraction == pytest.approx(0.5)


def test_a_quantizer_shape_learned_from_data_adapts_on_load():
    """Torch2Chip's reshape_quantizer: one learned scale per token position."""
    torch.manual_seed(0)
    layer = QuantLinear(8, 4, input_quant=quantwire.quant.Int8ActPerTokenLsq, input_num_tokens=6)
    layer(torch.randn(2, 6, 8))
    state = layer.state_dict()
    fresh = QuantLinear(8, 4, input_quant=quantwire.quant.Int8ActPerTokenLsq, input_num_tokens=1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(state)
    with adapting_quantizer_shapes():
        fresh.load_state_dict(state)
    x = torch.randn(3, 6, 8)
    layer.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    qmodel, _ = trained_quantized("w8a8")
    checkpoint = save_quantized(qmodel, tmp_path / "model.safetensors")
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 5))
    with pytest.raises(CheckpointError, match="does not fit Sequential"):
        load_quantized(other, checkpoint)
    wider = Net()
    wider.head = nn.Linear(8, 7)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_quantized(wider, checkpoint)


def test_a_float_checkpoint_or_a_foreign_file_is_refused(tmp_path):
    plain = tmp_path / "float.pt"
    torch.save(Net().state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a quantwire checkpoint"):
        load_quantized(build_float(), plain)
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="can not read the checkpoint"):
        read_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_with_code_is_never_executed(tmp_path):
    malicious = tmp_path / "model.pt"
    malicious.write_bytes(pickle.dumps({"state_dict": {}, "quantwire": _Payload()}))
    with pytest.raises(CheckpointError, match="can not read the checkpoint"):
        read_checkpoint(malicious)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    qmodel, _ = trained_quantized("w8a8")
    path = save_quantized(qmodel, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("quantwire.convert.checkpoint._write", crash)
    with pytest.raises(CheckpointError, match="disk full"):
        save_quantized(qmodel, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind


def test_saving_needs_the_config_and_a_known_suffix(tmp_path):
    qlayer = QuantLinear(4, 2)
    with pytest.raises(CheckpointError, match="not converted by quantize_model"):
        save_quantized(qlayer, tmp_path / "layer.safetensors")
    qmodel = quantwire.quantize_model(Net())
    with pytest.raises(CheckpointError, match=".safetensors or .pt"):
        save_quantized(qmodel, tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="does not exist"):
        save_quantized(qmodel, tmp_path / "no" / "model.pt")
