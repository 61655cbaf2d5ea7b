"""QAT step and eval forward of torchvision resnet18, float vs quantwire W8A8, in one run.

W8A8 here: every Conv2d/Linear becomes its quantwire twin with 8-bit per-channel weights
(``Int8WeightPerChannelFloat``) and an 8-bit per-tensor input quantizer
(``Int8ActPerTensorFloat``), so every matrix product sees 8-bit operands.

    python benchmarks/qat_resnet18.py [--threads 2] [--steps 10] [--batch 16] [--size 64]

Prints median milliseconds and quantized/float ratios for: a QAT step (forward, backward,
SGD step) in training mode, and an eval forward under ``torch.no_grad`` with the quantized
weights cached, and without the cache (weights re-quantized on every call).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from quantwire.nn import QuantConv2d, QuantLinear
from quantwire.proxy import WeightQuantProxyFromInjector
from quantwire.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat


def quantize_w8a8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace=True``) with every Conv2d/Linear
    replaced by its W8A8 quantwire twin."""
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            twin = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}.get(type(child))
            if twin is not None:
                setattr(
                    parent,
                    name,
                    twin.from_float(child, weight_quant=Int8WeightPerChannelFloat, input_quant=Int8ActPerTensorFloat),
                )
    return model


def median_ms(step: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def qat_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def eval_forward(model: nn.Module, images: torch.Tensor) -> Callable[[], object]:
    def step() -> object:
        with torch.no_grad():
            return model(images)

    return step


def set_weight_cache(model: nn.Module, enabled: bool) -> nn.Module:
    for module in model.modules():
        if isinstance(module, WeightQuantProxyFromInjector):
            module.cache_inference_quant_weight = enabled
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    float_model = torchvision.models.resnet18(weights=None)
    quant_model = quantize_w8a8(float_model)
    rows = []
    for label, make in (
        ("QAT step (train)", lambda m: qat_step(m.train(), images, labels)),
        ("eval, cached weights", lambda m: eval_forward(set_weight_cache(m.eval(), True), images)),
        ("eval, no weight cache", lambda m: eval_forward(set_weight_cache(m.eval(), False), images)),
    ):
        float_ms = median_ms(make(float_model), args.steps)
        quant_ms = median_ms(make(quant_model), args.steps)
        rows.append((label, float_ms, quant_ms))
    print(f"resnet18, batch {args.batch}x3x{args.size}x{args.size}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'':26s}{'float ms':>10s}{'W8A8 ms':>10s}{'ratio':>8s}")
    for label, float_ms, quant_ms in rows:
        print(f"{label:26s}{float_ms:10.1f}{quant_ms:10.1f}{quant_ms / float_ms:8.2f}")


if __name__ == "__main__":
    main()
