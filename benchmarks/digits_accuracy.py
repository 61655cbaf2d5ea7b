"""Test accuracy of a small CNN on scikit-learn's digits, float vs quantized by every algorithm.

    python benchmarks/digits_accuracy.py [--iters 1000] [--qat-epochs 6] [--markdown PATH]

Trains :class:`quantwire.examples.digits.DigitsCNN` in float (seeded, a few seconds), then for
W8A8, W4A8 and W4A4 (weights per output channel, activations per tensor; the image itself is
always quantized to 8 bits, unsigned) reports test accuracy for:

- RTN min-max: round to nearest, abs-max weight scales, running min-max activation calibration;
- RTN MSE: MSE-optimal weight thresholds and MSE activation calibration;
- AdaRound, BRECQ, QDrop: reconstruction from the MSE model on 256 calibration images, 1000
  steps per block (AdaRound: weight rounding only; BRECQ and QDrop also learn activation scales)
  (BRECQ/QDrop reconstruct the two conv stages as blocks, then the classifier);
- GPTQ: second-order weight rounding from the MSE model;
- LSQ QAT: LSQ weights and activations initialised by calibration, fine-tuned a few epochs.

Every number comes from this one run; the float model and the data split are seeded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from quantwire.algorithms import adaround, brecq, calibrate, gptq, qdrop
from quantwire.examples.digits import DigitsCNN, DigitsSplits, accuracy, batches, load_digits_splits, train
from quantwire.quant import Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
from quantwire.quant.base import MSEStats
from quantwire.quant.observers import MinMaxObserver, MSEObserver
from quantwire.quant.qat import Int8WeightPerChannelLsq, Uint8ActLsq

SCHEMES = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


class WeightMSE(MSEStats, Int8WeightPerChannelFloat):
    """Per-channel weights with MSE-optimal thresholds."""


class ActMinMax(MinMaxObserver, Uint8ActPerTensorFloat):
    """Unsigned activations calibrated by running min-max."""


class ActMSE(MSEObserver, Uint8ActPerTensorFloat):
    """Unsigned activations calibrated by per-batch MSE-optimal thresholds (averaged)."""


def quantized_copy(float_model: nn.Module, weight_quant: type, act_quant: type, bits: tuple[int, int]) -> nn.Module:
    """A DigitsCNN with the given quantizers and the float model's weights."""
    weight_bits, act_bits = bits
    model = DigitsCNN(
        weight_quant=weight_quant,
        act_quant=act_quant,
        input_quant=ActMinMax,
        weight_bit_width=weight_bits,
        act_bit_width=act_bits,
    )
    incompatible = model.load_state_dict(float_model.state_dict(), strict=False)
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys
    for module in model.modules():
        if hasattr(module, "init_quantizers"):
            module.init_quantizers()
    return model.eval()


def run_methods(
    float_model: nn.Module, splits: DigitsSplits, bits: tuple[int, int], iters: int, qat_epochs: int
) -> dict[str, tuple[float, float]]:
    """Accuracy and seconds per method for one bit-width scheme."""
    calibration = batches(splits.calibration(256), batch_size=32)
    results: dict[str, tuple[float, float]] = {}

    def timed(name: str, build: Callable[[], nn.Module]) -> None:
        start = time.perf_counter()
        model = build()
        results[name] = (accuracy(model, splits), time.perf_counter() - start)

    def rtn(weight_quant: type, act_quant: type) -> nn.Module:
        model = quantized_copy(float_model, weight_quant, act_quant, bits)
        return calibrate(model, calibration, progress=False)

    def reconstructed(algorithm: Callable) -> nn.Module:
        model = rtn(WeightMSE, ActMSE)
        algorithm(model, calibration, iters=iters, progress=False)
        return model

    def gptq_model() -> nn.Module:
        model = rtn(WeightMSE, ActMSE)
        gptq(model, calibration, progress=False)
        return model

    def lsq_model() -> nn.Module:
        model = rtn(Int8WeightPerChannelLsq, type("ActLsqMSE", (MSEObserver, Uint8ActLsq), {}))
        train(model, splits, epochs=qat_epochs, lr=1e-3, seed=1, progress=False, desc="LSQ QAT")
        return model

    timed("RTN min-max", lambda: rtn(Int8WeightPerChannelFloat, ActMinMax))
    timed("RTN MSE", lambda: rtn(WeightMSE, ActMSE))
    timed("AdaRound", lambda: reconstructed(adaround))
    timed("BRECQ", lambda: reconstructed(brecq))
    timed("QDrop", lambda: reconstructed(qdrop))
    timed("GPTQ", gptq_model)
    timed("LSQ QAT", lsq_model)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=1000, help="reconstruction steps per block")
    parser.add_argument("--qat-epochs", type=int, default=6, help="LSQ fine-tuning epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    splits = load_digits_splits()
    torch.manual_seed(0)
    start = time.perf_counter()
    float_model = train(DigitsCNN(), splits, progress=False)
    float_accuracy = accuracy(float_model, splits)
    print(f"float model trained in {time.perf_counter() - start:.1f} s: {float_accuracy:.2f}% test accuracy")

    table = {
        scheme: run_methods(float_model, splits, bits, args.iters, args.qat_epochs) for scheme, bits in SCHEMES.items()
    }
    methods = list(next(iter(table.values())))
    lines = [
        f"Test accuracy (%) on {len(splits.test_y)} digits; float: {float_accuracy:.2f}. "
        f"Seconds per method in brackets (W4A4 column).",
        "",
        "| method | " + " | ".join(SCHEMES) + " |",
        "|---|" + "---|" * len(SCHEMES),
    ]
    for method in methods:
        cells = [f"{table[s][method][0]:.2f}" for s in SCHEMES]
        cells[-1] += f" ({table['W4A4'][method][1]:.0f} s)"
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
