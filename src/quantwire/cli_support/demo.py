"""``quantwire demo``: the whole library on scikit-learn's digits in well under two minutes.

Train :class:`~quantwire.examples.digits.DigitsCNN` in float, quantize it three ways (W8A8
PTQ by calibration, W4A4 PTQ with QDrop reconstruction, W4A4 LSQ QAT), run the W8A8 model on
the integer backend and compare it with its fake-quantized self, export the integer model's
test vectors and write a report (:mod:`quantwire.cli_support.report`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import quantwire
from quantwire.algorithms import calibrate, qdrop
from quantwire.examples.digits import DigitsCNN, DigitsSplits, accuracy, batches, load_digits_splits, train
from quantwire.nn.base import QuantWBIOL
from quantwire.quant import Int8WeightPerChannelFloat
from quantwire.quant.base import MSEStats
from quantwire.quant.observers import MSEObserver, Uint8ActPerTensorFloatMinMax
from quantwire.quant.qat import Int8WeightPerChannelLsq, Uint8ActLsq

__all__ = ["DemoResult", "DemoSettings", "IntegerAgreement", "run_demo"]


class WeightMSE(MSEStats, Int8WeightPerChannelFloat):
    """Per-channel weights with MSE-optimal thresholds (the start of reconstruction)."""


class ActMSE(MSEObserver, Uint8ActPerTensorFloatMinMax):
    """Unsigned per-tensor activations calibrated by per-batch MSE-optimal thresholds."""


class ActLsqMSE(MSEObserver, Uint8ActLsq):
    """LSQ activations whose step size starts from MSE calibration."""


@dataclass(frozen=True)
class DemoSettings:
    """How long each stage of the demo runs (the defaults take well under a minute on 2 cores)."""

    float_epochs: int = 20
    reconstruction_iters: int = 150
    qat_epochs: int = 3
    calibration_images: int = 256
    seed: int = 0
    progress: bool = True
    threads: int = 1
    """torch intra-op threads: the tensors are tiny, and one thread is both faster than two on a
    busy machine (no spinning thread barriers) and gives the same numbers everywhere."""


@dataclass(frozen=True)
class IntegerAgreement:
    """How closely the integer W8A8 model follows its fake-quantized twin on the test split."""

    equal_predictions: float
    max_abs_logit_diff: float


@dataclass
class DemoResult:
    """Everything the report shows: accuracies, models, agreement, export folder, timings."""

    accuracies: dict[str, float]
    models: dict[str, nn.Module]
    agreement: IntegerAgreement
    export_dir: Path
    splits: DigitsSplits
    seconds: dict[str, float] = field(default_factory=dict)


def quantized_copy(
    float_model: nn.Module, weight_quant: type, act_quant: type, bits: tuple[int, int], calibration: list
) -> nn.Module:
    """A :class:`DigitsCNN` with the given quantizers (8-bit min-max input), ``float_model``'s
    weights and activation quantizers calibrated on ``calibration`` batches."""
    weight_bits, act_bits = bits
    model = DigitsCNN(weight_quant, act_quant, Uint8ActPerTensorFloatMinMax, weight_bits, act_bits)
    model.load_state_dict(float_model.state_dict(), strict=False)
    for module in model.modules():
        if hasattr(module, "init_quantizers"):
            module.init_quantizers()
    return calibrate(model.eval(), calibration, progress=False)


def integer_ready_w8a8(float_model: nn.Module, calibration: list) -> nn.Module:
    """W8A8 as the integer backend wants it: a copy of ``float_model`` whose every conv/linear
    quantizes its weights (8-bit per channel) and its input (8-bit unsigned, min-max
    calibrated on ``calibration``); the ReLUs between them stay float."""
    model = copy.deepcopy(float_model).eval()
    for name, layer in list(model.named_modules()):
        if isinstance(layer, QuantWBIOL):
            quant_layer = type(layer).from_float(
                layer, weight_quant=Int8WeightPerChannelFloat, input_quant=Uint8ActPerTensorFloatMinMax
            )
            model.set_submodule(name, quant_layer)
    return calibrate(model, calibration, progress=False)


def integer_agreement(qmodel: nn.Module, imodel: nn.Module, images: torch.Tensor) -> IntegerAgreement:
    """Fraction of equal predictions and largest logit difference of ``imodel`` (float64 in)
    against ``qmodel`` on ``images``."""
    with torch.no_grad():
        fake = qmodel.eval()(images).double()
        integer = imodel(images.double())
    equal = (fake.argmax(dim=1) == integer.argmax(dim=1)).double().mean().item()
    return IntegerAgreement(equal, (fake - integer).abs().max().item())


class _Stopwatch:
    """Records the seconds each named stage takes into a dict."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, name: str, function, *args, **kwargs):
        """``function(*args, **kwargs)``, timed as ``name``."""
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        return result


def _reconstructed_w4a4(float_model: nn.Module, calibration: list, settings: DemoSettings) -> nn.Module:
    """W4A4 from MSE calibration, then QDrop block reconstruction."""
    model = quantized_copy(float_model, WeightMSE, ActMSE, (4, 4), calibration)
    qdrop(model, calibration, iters=settings.reconstruction_iters, seed=settings.seed, progress=settings.progress)
    return model


def _lsq_w4a4(float_model: nn.Module, splits: DigitsSplits, calibration: list, settings: DemoSettings) -> nn.Module:
    """W4A4 LSQ quantizers initialised by calibration, fine-tuned a few epochs."""
    model = quantized_copy(float_model, Int8WeightPerChannelLsq, ActLsqMSE, (4, 4), calibration)
    epochs, seed, progress = settings.qat_epochs, settings.seed + 1, settings.progress
    return train(model, splits, epochs=epochs, lr=1e-3, seed=seed, progress=progress, desc="LSQ QAT W4A4")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` torch intra-op threads, restoring the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(out_dir: Path, settings: DemoSettings | None = None) -> DemoResult:
    """Train, quantize, convert and export as the module docstring says; the export goes to
    ``out_dir / "export"`` (replaced if it exists)."""
    settings = settings or DemoSettings()
    with torch_threads(settings.threads):
        return _run(out_dir, settings)


def _run(out_dir: Path, settings: DemoSettings) -> DemoResult:
    """:func:`run_demo` with the threads set."""
    watch = _Stopwatch()
    splits = load_digits_splits(seed=settings.seed)
    calibration = batches(splits.calibration(settings.calibration_images), batch_size=32)
    torch.manual_seed(settings.seed)
    float_model = watch.time(
        "float training",
        train,
        DigitsCNN(),
        splits,
        epochs=settings.float_epochs,
        seed=settings.seed,
        progress=settings.progress,
        desc="float training",
    )
    models = {
        "float": float_model,
        "W8A8 PTQ (calibration)": watch.time("W8A8 PTQ", integer_ready_w8a8, float_model, calibration),
        "W4A4 PTQ (QDrop reconstruction)": watch.time(
            "W4A4 QDrop", _reconstructed_w4a4, float_model, calibration, settings
        ),
        "W4A4 LSQ QAT": watch.time("W4A4 LSQ QAT", _lsq_w4a4, float_model, splits, calibration, settings),
    }
    w8a8 = models["W8A8 PTQ (calibration)"]
    imodel = watch.time("integer conversion", quantwire.to_integer, w8a8)
    accuracies = {name: accuracy(model, splits) for name, model in models.items()}
    accuracies["W8A8 integer backend"] = accuracy(imodel, batches(splits.test_x.double(), splits.test_y, 256))
    agreement = integer_agreement(w8a8, imodel, splits.test_x)
    export_dir = watch.time(
        "integer export",
        quantwire.export_integer,
        imodel,
        splits.test_x[:1].double(),
        out_dir / "export",
        overwrite=True,
        progress=settings.progress,
    )
    return DemoResult(accuracies, models, agreement, export_dir, splits, watch.seconds)
