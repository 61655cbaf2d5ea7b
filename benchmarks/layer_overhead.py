"""Per-call overhead of a tiny QuantLinear against nn.Linear, in one run.

A QuantLinear(16, 16) with the default weight quantizer (Int8WeightPerTensorFloat) and an
nn.Linear(16, 16) with the same weights, on a (4, 16) input:

* training mode, autograd on: the weight is quantized on every call;
* eval mode under ``torch.no_grad()``: the quantized weight comes from the proxy's cache.

At this size the matrix product costs next to nothing, so the figures are the Python and
dispatch overhead of the quantization path.

    python benchmarks/layer_overhead.py [--threads 1] [--repeats 300] [--inner 200]

Prints the median microseconds per call (medians over ``--repeats`` timings of ``--inner``
calls each) and the QuantLinear / nn.Linear ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from quantwire.nn import QuantLinear


def median_us(call: Callable[[], object], repeats: int, inner: int, warmup: int = 50) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` back-to-back calls, in µs."""
    for _ in range(warmup):
        call()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            call()
        timings.append((time.perf_counter() - start) / inner)
    return 1e6 * statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--inner", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    quant = QuantLinear(16, 16)
    linear = nn.Linear(16, 16)
    with torch.no_grad():
        linear.weight.copy_(quant.weight)
        linear.bias.copy_(quant.bias)
    x = torch.randn(4, 16)

    def train_call(layer: nn.Module) -> Callable[[], object]:
        layer.train()
        return lambda: layer(x)

    def eval_call(layer: nn.Module) -> Callable[[], object]:
        layer.eval()

        def call() -> object:
            with torch.no_grad():
                return layer(x)

        return call

    rows = []
    for label, make in (("train forward (autograd on)", train_call), ("eval forward (no_grad, cached)", eval_call)):
        float_us = median_us(make(linear), args.repeats, args.inner)
        quant_us = median_us(make(quant), args.repeats, args.inner)
        rows.append((label, float_us, quant_us))
    if quant.weight_quant._cache is None:
        raise RuntimeError("the eval forward did not use the weight cache")

    print(
        f"QuantLinear(16, 16) vs nn.Linear(16, 16), input (4, 16), {args.threads} thread(s), "
        f"median of {args.repeats} x {args.inner} calls, torch {torch.__version__}"
    )
    print(f"{'':32s}{'nn.Linear us':>14s}{'QuantLinear us':>16s}{'ratio':>8s}")
    for label, float_us, quant_us in rows:
        print(f"{label:32s}{float_us:14.2f}{quant_us:16.2f}{quant_us / float_us:8.2f}")


if __name__ == "__main__":
    main()
