"""Round trips (issue 9): what is saved, copied or pickled computes bit for bit what it came from.

* Every quantizer of the catalogue (``quantwire.quant.__all__``) on a QuantConv2d and a
  QuantLinear (token-position quantizers: two QuantLinears on ``(batch, tokens, features)``),
  calibrated and trained a few steps so that collected and learned state is not the initial one,
  goes two ways: its ``state_dict`` (``torch.save``, read back with ``weights_only=True``) into
  a freshly constructed model, and the same float network converted by ``quantize_model`` with
  that quantizer through ``save_quantized``/``load_quantized``. Both are reloaded in a fresh
  process (one for the whole catalogue) on models whose every float is scrambled first.
* Every converted model family (torchvision resnet18 and mobilenet_v2, timm vit_tiny at 32
  pixels, the MiniLM of transformers, and every ``quantize_model`` preset on a small CNN) goes
  through ``save_quantized`` and ``load_quantized`` in a fresh process.
* ``copy.deepcopy`` and ``pickle`` of all those models compute what the originals do, and a
  DataLoader whose spawned workers receive quantized modules by pickle (in the dataset and in
  the collate function) returns what the modules compute in this process.

The fresh process imports this file for the model builders (tests/convert is not a package).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import quantwire
import quantwire.quant as catalogue
from quantwire.cli_support.demo import torch_threads
from quantwire.convert import QuantConfig, TensorQuant, load_quantized, save_quantized
from quantwire.convert.config import PRESETS
from quantwire.nn import QuantConv2d, QuantLinear
from quantwire.proxy import ActQuantProxyFromInjector, BiasQuantProxyFromInjector, WeightQuantProxyFromInjector
from quantwire.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActLsq
from quantwire.quant.qat import Int8WeightPerChannelLsq

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FEATURES, TOKENS, SIDE = 32, 6, 6
"""Layer width (a multiple of the per-group quantizers' group size), token count and image side."""

ROLES = {
    WeightQuantProxyFromInjector: "weight",
    ActQuantProxyFromInjector: "input",
    BiasQuantProxyFromInjector: "bias",
}
QUANTIZERS = sorted(catalogue.__all__)
TOKEN_POSITION = {name for name in QUANTIZERS if "PerTokenLsq" in name}
"""Learned per-token-position scales: they need a fixed number of tokens."""

NOT_QUANTIZED = {"residual": None, "attention": None, "attention_probs": None, "embedding": None}


def required_attributes(name: str) -> dict[str, Any]:
    """Attributes the catalogue quantizer ``name`` leaves to its user: the token count of a
    per-token-position scale, the range a min-max-initialised scale starts from."""
    if name in TOKEN_POSITION:
        return {"num_tokens": TOKENS}
    if "MinMaxInit" in name:
        return {"min_val": -3.0, "max_val": 3.0}
    return {}


def role(name: str) -> str:
    """``weight``, ``input`` or ``bias``: what the catalogue quantizer ``name`` quantizes."""
    return ROLES[getattr(catalogue, name).proxy_class]


def scrambled(model: nn.Module, seed: int = 1234) -> nn.Module:
    """``model`` with every floating parameter and buffer overwritten by noise: whatever a
    model reloaded from it computes came from the checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model


def first_tensor(output: Any) -> Tensor:
    """The tensor a model returns (a Hugging Face output's ``last_hidden_state``)."""
    return output if isinstance(output, Tensor) else output.last_hidden_state


def run(model: nn.Module, inputs: Any) -> Tensor:
    """``model``'s output on ``inputs`` (a tensor or a dict of keyword tensors), without grad."""
    with torch.no_grad():
        return first_tensor(model(**inputs) if isinstance(inputs, dict) else model(inputs))


# -- one network per catalogue quantizer ----------------------------------------------------------


def layer_quantizers(name: str) -> dict[str, Any]:
    """Quant-layer keyword arguments that put the catalogue quantizer ``name`` to work (a bias
    quantizer needs a quantized weight and input for its scale)."""
    quantizer = getattr(catalogue, name)
    if role(name) == "weight":
        return {"weight_quant": quantizer}
    if role(name) == "bias":
        return {
            "weight_quant": Int8WeightPerChannelFloat,
            "input_quant": Int8ActPerTensorFloat,
            "bias_quant": quantizer,
        }
    return {"input_quant": quantizer, **{f"input_{key}": value for key, value in required_attributes(name).items()}}


class TwoLayers(nn.Module):
    """A convolution (or, on tokens, a linear layer), ReLU, then a linear head."""

    def __init__(self, first: nn.Module, head: nn.Module, tokens: bool) -> None:
        super().__init__()
        self.first, self.head, self.tokens = first, head, tokens

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(self.first(x))
        return self.head(hidden if self.tokens else hidden.mean(dim=(2, 3)))


def quant_net(name: str) -> TwoLayers:
    """Quant layers built by hand with the catalogue quantizer ``name``."""
    kwargs, tokens = layer_quantizers(name), name in TOKEN_POSITION
    first = (
        QuantLinear(FEATURES, FEATURES, **kwargs) if tokens else QuantConv2d(FEATURES, FEATURES, 3, padding=1, **kwargs)
    )
    return TwoLayers(first, QuantLinear(FEATURES, 8, **kwargs), tokens)


def float_net(name: str) -> TwoLayers:
    """The float twin of :func:`quant_net`, for ``quantize_model``."""
    tokens = name in TOKEN_POSITION
    first = nn.Linear(FEATURES, FEATURES) if tokens else nn.Conv2d(FEATURES, FEATURES, 3, padding=1)
    return TwoLayers(first, nn.Linear(FEATURES, 8), tokens)


def quantizer_config(name: str) -> QuantConfig:
    """A ``quantize_model`` config that uses the catalogue quantizer ``name`` as it is."""
    spec = TensorQuant(quantizer=name, options=required_attributes(name))
    if role(name) == "weight":
        return QuantConfig(weight=spec, input=TensorQuant(bit_width=8), **NOT_QUANTIZED)
    if role(name) == "bias":
        return QuantConfig(bias=spec, **NOT_QUANTIZED)
    return QuantConfig(input=spec, **NOT_QUANTIZED)


def example_input(name: str, seed: int) -> Tensor:
    """A batch for the network of quantizer ``name``, the same on every run."""
    shape = (4, TOKENS, FEATURES) if name in TOKEN_POSITION else (4, FEATURES, SIDE, SIDE)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def calibrated_and_trained(model: nn.Module, batches: list[Any], steps: int = 3) -> nn.Module:
    """``model`` calibrated on ``batches``, then trained ``steps`` SGD steps (learned scales,
    offsets and roundings move; running statistics go on), in eval mode."""
    quantwire.calibrate(model, batches, progress=False)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for step in range(steps):
        optimizer.zero_grad()
        inputs = batches[step % len(batches)]
        output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        first_tensor(output).square().mean().backward()
        optimizer.step()
    return model.eval()


def trained_quant_net(name: str) -> TwoLayers:
    torch.manual_seed(0)
    return calibrated_and_trained(quant_net(name), [example_input(name, seed) for seed in range(3)])


def trained_converted_net(name: str) -> nn.Module:
    torch.manual_seed(0)
    qmodel = quantwire.quantize_model(float_net(name), quantizer_config(name))
    return calibrated_and_trained(qmodel, [example_input(name, seed) for seed in range(3)])


# -- model families -------------------------------------------------------------------------------


class SmallCnn(nn.Module):
    """Conv-BN-ReLU, a residual block and a linear head: every preset has something to quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, FEATURES, 3, padding=1), nn.BatchNorm2d(FEATURES), nn.ReLU())
        self.block = nn.Conv2d(FEATURES, FEATURES, 3, padding=1)
        self.head = nn.Linear(FEATURES, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + torch.relu(self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def preset_config(preset: str) -> QuantConfig:
    """The preset; per-group weights of the RGB stem (3 input channels, no whole group) go per channel."""
    stem = {"name": "stem.0", "weight": {"granularity": "channel"}}
    return QuantConfig.from_dict({"preset": preset, "overrides": [stem] if "group" in preset else []})


def images(seed: int, side: int = 32) -> Tensor:
    return torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(seed))


def minilm_inputs(seed: int) -> dict[str, Tensor]:
    from quantwire.examples.minilm import load_minilm, tokenize

    sentences = [["a quantized sentence", "integers all the way down"], ["round trips", "bit for bit"]][seed % 2]
    return tokenize(load_minilm()[1], sentences)


@dataclass(frozen=True)
class Family:
    """A float architecture (fresh random weights each call), its inputs and its config."""

    build: Callable[[], nn.Module]
    inputs: Callable[[int], Any]
    config: str | QuantConfig = "w8a8"
    train_steps: int = 0


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=10).eval()

    return build


def _vit_tiny() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()


def _minilm() -> nn.Module:
    from quantwire.examples.minilm import load_minilm

    return load_minilm()[0]


FAMILIES = {
    "torchvision:resnet18": Family(_torchvision("resnet18"), images),
    "torchvision:mobilenet_v2": Family(_torchvision("mobilenet_v2"), images),
    "timm:vit_tiny_patch16_224": Family(_vit_tiny, images),
    "transformers:all-MiniLM-L6-v2": Family(_minilm, minilm_inputs, "w8a8_per_token"),
    **{
        f"preset:{preset}": Family(SmallCnn, lambda seed: images(seed, 8), preset_config(preset), train_steps=2)
        for preset in sorted(PRESETS)
    },
}
HEAVY_FAMILIES = [name for name in FAMILIES if not name.startswith("preset:")]


def converted_family(name: str) -> nn.Module:
    """Family ``name`` converted by ``quantize_model``, calibrated (and trained, for presets)."""
    family = FAMILIES[name]
    torch.manual_seed(0)
    qmodel = quantwire.quantize_model(family.build(), family.config)
    batches = [family.inputs(seed) for seed in range(2)]
    if family.train_steps:
        return calibrated_and_trained(qmodel, batches, family.train_steps)
    quantwire.calibrate(qmodel, batches, progress=False)
    return qmodel.eval()


# -- the fresh process ----------------------------------------------------------------------------


def reload_quant_net(name: str, path: Path) -> nn.Module:
    """A freshly constructed :func:`quant_net` with the ``state_dict`` saved at ``path``."""
    model = scrambled(quant_net(name))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def reload_converted_net(name: str, path: Path) -> nn.Module:
    return load_quantized(scrambled(float_net(name)), path).eval()


def reload_family(name: str, path: Path) -> nn.Module:
    return load_quantized(scrambled(FAMILIES[name].build()), path).eval()


RELOADERS: dict[str, Callable[[str, Path], nn.Module]] = {
    "state_dict": reload_quant_net,
    "save_quantized": reload_converted_net,
    "family": reload_family,
}


def reload_all(folder: str) -> dict[str, str]:
    """Run in the fresh process: reload every case :func:`save_case` wrote below ``folder``
    and compare its output with the saved one. ``bitwise``, or what went wrong, by case."""
    results = {}
    for case in sorted(Path(folder).glob("*.io.pt")):
        saved = torch.load(case, map_location="cpu", weights_only=True)
        key = f"{saved['route']}:{saved['name']}"
        try:
            model = RELOADERS[saved["route"]](saved["name"], Path(saved["path"]))
            output = run(model, saved["inputs"])
        except Exception as error:  # reported by case name, so that one failure hides no other
            results[key] = f"{type(error).__name__}: {error}"
            continue
        same = output.shape == saved["output"].shape and torch.equal(output, saved["output"])
        results[key] = "bitwise" if same else f"differs by {(output - saved['output']).abs().max():.3g}"
    return results


def save_case(folder: Path, route: str, name: str, model: nn.Module, inputs: Any) -> None:
    """Save ``model`` the way ``route`` does, with an input and its output, for :func:`reload_all`."""
    stem = f"{route}.{name.replace(':', '-')}"
    if route == "state_dict":
        path = folder / f"{stem}.pt"
        torch.save(model.state_dict(), path)
    else:
        path = save_quantized(model, folder / f"{stem}.safetensors")
    record = {"route": route, "name": name, "path": str(path), "inputs": inputs, "output": run(model, inputs)}
    torch.save(record, folder / f"{stem}.io.pt")


FRESH_PROCESS = """
import json, sys, torch
torch.set_num_threads({threads})
sys.path.insert(0, {tests!r})
import test_round_trips
print(json.dumps(test_round_trips.reload_all({folder!r})))
"""


def reload_in_fresh_process(folder: Path) -> dict[str, str]:
    """:func:`reload_all` in a new interpreter: only what was saved carries over."""
    script = FRESH_PROCESS.format(threads=torch.get_num_threads(), tests=str(Path(__file__).parent), folder=str(folder))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "QUANTWIRE_PROGRESS": "0"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def not_bitwise(results: dict[str, str]) -> dict[str, str]:
    return {key: outcome for key, outcome in results.items() if outcome != "bitwise"}


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is many times faster than several on a busy
    machine, and the fresh process and the loader's workers run with one as well."""
    with torch_threads(1):
        yield


def test_the_catalogue_is_covered() -> None:
    """Every catalogue entry is a weight, activation or bias quantizer, and each kind is here."""
    assert {role(name) for name in QUANTIZERS} == {"weight", "input", "bias"}
    assert len(QUANTIZERS) >= 50


def test_every_catalogue_quantizer_reloads_bit_identically_in_a_fresh_process(tmp_path: Path) -> None:
    for name in QUANTIZERS:
        save_case(tmp_path, "state_dict", name, trained_quant_net(name), example_input(name, 99))
        save_case(tmp_path, "save_quantized", name, trained_converted_net(name), example_input(name, 99))
    results = reload_in_fresh_process(tmp_path)
    assert len(results) == 2 * len(QUANTIZERS)
    assert not_bitwise(results) == {}


@pytest.mark.slow
def test_every_model_family_reloads_bit_identically_in_a_fresh_process(tmp_path: Path) -> None:
    for name, family in FAMILIES.items():
        save_case(tmp_path, "family", name, converted_family(name), family.inputs(99))
    results = reload_in_fresh_process(tmp_path)
    assert len(results) == len(FAMILIES)
    assert not_bitwise(results) == {}


def assert_copies_compute_the_same(model: nn.Module, inputs: Any) -> None:
    expected = run(model, inputs)
    for how, clone in (("deepcopy", copy.deepcopy(model)), ("pickle", pickle.loads(pickle.dumps(model)))):
        assert torch.equal(run(clone.eval(), inputs), expected), how


@pytest.mark.parametrize("name", QUANTIZERS)
def test_a_model_with_any_catalogue_quantizer_deep_copies_and_pickles(name: str) -> None:
    assert_copies_compute_the_same(trained_quant_net(name), example_input(name, 99))
    assert_copies_compute_the_same(trained_converted_net(name), example_input(name, 99))


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] if name in HEAVY_FAMILIES else []) for name in FAMILIES]
)
def test_a_converted_model_family_deep_copies_and_pickles(name: str) -> None:
    assert_copies_compute_the_same(converted_family(name), FAMILIES[name].inputs(99))


class QuantizedDataset(torch.utils.data.Dataset):
    """Items are a quantized model's outputs on rows of ``inputs``: the model travels to the
    loader's workers with the dataset."""

    def __init__(self, model: nn.Module, inputs: Tensor) -> None:
        self.model, self.inputs = model, inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Tensor:
        return run(self.model, self.inputs[index : index + 1])[0]


class QuantizedCollate:
    """Stacks a batch and runs a quantized layer on it, in the worker that made the batch."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, items: list[Tensor]) -> tuple[Tensor, Tensor]:
        batch = torch.stack(items)
        return batch, run(self.layer, batch)


@pytest.mark.parametrize("start_method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_a_data_loader_with_two_workers_carries_quantized_modules(start_method: str) -> None:
    """Spawned workers (unlike forked ones, which inherit memory) get the dataset and the
    collate function by pickle; each worker imports torch and quantwire, hence slow."""
    model = converted_family("preset:w4a4_lsq")  # composed quantizer classes
    torch.manual_seed(0)
    head = QuantLinear(5, 3, weight_quant=Int8WeightPerChannelLsq, input_quant=Uint8ActLsq)
    head = calibrated_and_trained(head, [torch.randn(4, 5)])
    inputs = images(7, side=8).repeat(3, 1, 1, 1)
    loader = torch.utils.data.DataLoader(
        QuantizedDataset(model, inputs),
        batch_size=2,
        num_workers=2,
        multiprocessing_context=start_method,
        collate_fn=QuantizedCollate(head),
    )
    batches = list(loader)
    with torch_threads(1):  # what each worker runs with
        items = torch.stack([QuantizedDataset(model, inputs)[i] for i in range(len(inputs))])
        expected_head = torch.cat([run(head, items[start : start + 2]) for start in range(0, len(items), 2)])
    assert torch.equal(torch.cat([batch for batch, _ in batches]), items)
    assert torch.equal(torch.cat([head_output for _, head_output in batches]), expected_head)
