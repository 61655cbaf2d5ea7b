"""quantwire's integer model on PyTorch's int8 CPU kernels, against float and PyTorch's own int8.

    python benchmarks/native_int8.py [--threads 2] [--steps 10] [--batch 16] [--size 64]

torchvision resnet18 (random weights, BatchNorm statistics settled by a few training-mode
batches), W8A8 (``w8a8``: per-channel weights, per-tensor activations), calibrated on one batch.
Eval-mode inference time (median of ``--steps`` runs after a warm-up; the models take turns, so
that a change in the machine's load falls on all of them alike) of:

- ``float``: the float model;
- ``fake-quant``: quantwire's fake-quantized model;
- ``integer``: the bit-exact integer model (:func:`quantwire.backend.to_integer`, float64);
- ``native int8``: the integer model on int8 kernels (:func:`quantwire.backend.to_native_int8`);
- ``pytorch int8``: PyTorch's own int8 resnet18 (FX ``prepare_fx``/``convert_fx``, default x86
  qconfig, calibrated on the same batch): the reference.

Each row gives milliseconds and the ratio to float. Then the agreement of the native model with
the integer model (:func:`quantwire.backend.compare_native`) on the calibration batch and on a
fresh one. :func:`benchmark_rows` returns the rows for other scripts.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import quantwire
from quantwire.backend import compare_native, to_integer, to_native_int8
from quantwire.backend.native import NativeComparison


@dataclass(frozen=True)
class Row:
    """One model's inference time: ``ms`` (median) and ``ratio`` to the float model's."""

    name: str
    ms: float
    ratio: float


def settled_resnet18(size: int) -> nn.Module:
    """A random resnet18 whose BatchNorm statistics follow a few training-mode batches."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def pytorch_int8(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """PyTorch's own int8 model: FX graph mode with the default x86 qconfig, calibrated on ``batch``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (batch,))
        with torch.no_grad():
            prepared(batch)
        return convert_fx(prepared)


def median_times(runs: dict[str, Callable[[], object]], steps: int, warmup: int = 2) -> dict[str, float]:
    """The median wall time (ms) of each of ``runs``, taking turns ``steps`` times after ``warmup``."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(warmup):
            for run in runs.values():
                run()
        for _ in range(steps):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def build(batch: int, size: int) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """The five models of the comparison, and the calibration batch."""
    model = settled_resnet18(size)
    x = torch.randn(batch, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantwire.quantize_model(copy.deepcopy(model), "w8a8")
        quantwire.calibrate(qmodel, [x], progress=False)
        qmodel.eval()
        integer = to_integer(qmodel)
        native = to_native_int8(integer, x)
    return {
        "float": model,
        "fake-quant": qmodel,
        "integer": integer,
        "native int8": native,
        "pytorch int8": pytorch_int8(model, x),
    }, x


def benchmark_rows(
    threads: int = 2, steps: int = 10, batch: int = 16, size: int = 64
) -> tuple[list[Row], dict[str, NativeComparison]]:
    """The timing rows (float first) and the native model's agreement with the integer model on
    the calibration batch (``"calibration"``) and a fresh batch (``"fresh"``)."""
    torch.set_num_threads(threads)
    models, x = build(batch, size)
    inputs = {name: x.double() if name == "integer" else x for name in models}
    runs = {name: (lambda m=model, i=inputs[name]: m(i)) for name, model in models.items()}
    medians = median_times(runs, steps)
    rows = [Row(name, ms, ms / medians["float"]) for name, ms in medians.items()]
    fresh = torch.randn_like(x)
    agreement = {
        "calibration": compare_native(models["native int8"], models["integer"], x),
        "fresh": compare_native(models["native int8"], models["integer"], fresh),
    }
    return rows, agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    rows, agreement = benchmark_rows(args.threads, args.steps, args.batch, args.size)
    print(f"resnet18 W8A8, {args.batch}x3x{args.size}x{args.size}, {args.threads} threads, median of {args.steps}")
    print(f"{'model':<14} {'ms':>10} {'x float':>9}")
    for row in rows:
        print(f"{row.name:<14} {row.ms:>10.1f} {row.ratio:>9.3f}")
    print("native int8 against the integer model (each layer fed the integer model's codes; output in")
    print("steps of the last layer's accumulator):")
    for data, report in agreement.items():
        layers, output = report.layers, report.output
        print(
            f"  {data:<12} layers: {layers.within_one:.6f} within 1 step, {layers.exact:.6f} exact, "
            f"largest {layers.largest:g} ({report.worst_layer}); output: {output.within_one:.4f} within 1 step, "
            f"largest {output.largest:.1f}"
        )


if __name__ == "__main__":
    main()
