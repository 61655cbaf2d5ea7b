"""quantwire's whole performance table in one command: QAT step, eval, calibration, integer
backend, peak memory and torch.compile, each against float, and against Brevitas when installed.

    python benchmarks/suite.py [--threads 2] [--steps N] [--quick] [--markdown PATH] [--only SECTION ...]

Sections (``--only`` picks some; the default runs every section but ``compile``):

- ``qat``: one QAT step (forward, backward, SGD step, training mode) of torchvision resnet18 at
  16x3x64x64 and timm vit_tiny_patch16_224 at 8x3x112x112: float vs W8A8 vs W4A4 LSQ;
- ``eval``: an eval forward under ``torch.no_grad`` of the same models, quantized weights cached;
- ``calibration``: :func:`quantwire.calibrate` time per batch against a float forward of the batch;
- ``integer``: the bit-exact integer model and its native int8 version against the fake-quantized
  and the float model (:func:`native_int8.benchmark_rows`: resnet18 with 10 classes and settled
  BatchNorm statistics, the ``w8a8`` preset, eval);
- ``memory``: peak resident memory of a process that runs a few QAT steps, one process per model;
- ``compile``: the resnet18 QAT step with the model under ``torch.compile`` (default inductor):
  first-call seconds, steady-state time against eager and against compiled float, and the graph
  breaks ``torch._dynamo.explain`` finds, listing those inside quantwire's source tree. Not in the
  default run, because compiling takes minutes on a cold cache: add it with ``--only ... compile``.

W8A8 is the hand-built :func:`qat_resnet18.quantize_w8a8`: every Conv2d/Linear gets 8-bit
per-channel weights (``Int8WeightPerChannelFloat``) and an 8-bit per-tensor input quantizer
(``Int8ActPerTensorFloat``), nothing else; the Brevitas twin is built the same way from Brevitas'
quantizers of the same names. W4A4 LSQ is the ``w4a4_lsq`` preset (which also quantizes residual
adds and attention). Quantized models are calibrated on one batch before QAT, as in the real flow
(the learned scales are parameters by then).

Each time is the median of ``--steps`` runs after ``--warmup`` runs, the models taking turns so
that a change in the machine's load falls on all of them alike. ``--quick`` is a smoke run: 3
steps, resnet18 only. :func:`run_suite` returns the rows for other code (and the smoke test).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import quantwire

BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:  # the sibling scripts, also when this file is imported by path
    sys.path.insert(0, str(BENCHMARKS))

from qat_resnet18 import eval_forward, qat_step, quantize_w8a8, set_weight_cache  # noqa: E402

QUANTWIRE_SOURCE = Path(quantwire.__file__).resolve().parent
SECTIONS_IN_ORDER = ("qat", "eval", "calibration", "integer", "memory", "compile")
DEFAULT_SECTIONS = ("qat", "eval", "calibration", "integer", "memory")
RSS_STEPS = 3  # QAT steps an RSS child runs before reading its peak: the optimizer state exists by then
FLOAT = "float"
W8A8 = "W8A8"
W4A4_LSQ = "W4A4 LSQ"
BREVITAS_W8A8 = "Brevitas W8A8"


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table: quantwire's ``value`` against ``reference`` (both in ``unit``), the
    ``target`` it is held to as text, and whether it met it (``passed`` is None without a target)."""

    section: str
    case: str
    value: float
    reference: float | None
    unit: str = "ms"
    target: str = ""
    passed: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """``value / reference``, or None without a (nonzero) reference."""
        return None if not self.reference else self.value / self.reference

    @property
    def result(self) -> str:
        """``PASS``, ``MISS``, or empty when the row has no target."""
        return "" if self.passed is None else ("PASS" if self.passed else "MISS")


def compared(
    section: str, case: str, value: float, reference: float, at_most: float | None = None, unit: str = "ms"
) -> Row:
    """A row whose target, when ``at_most`` is given, is ``value / reference <= at_most``."""
    if at_most is None:
        return Row(section, case, value, reference, unit)
    return Row(section, case, value, reference, unit, f"<= {at_most:g}x", value / reference <= at_most)


TABLE_HEADER = ("section", "case", "quantwire", "reference", "ratio", "target", "result")


def _cells(row: Row) -> tuple[str, ...]:
    def amount(number: float | None) -> str:
        if number is None:
            return "-"
        return f"{number:.0f} {row.unit}" if row.unit == "breaks" else f"{number:.{_decimals(number)}f} {row.unit}"

    ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
    return (row.section, row.case, amount(row.value), amount(row.reference), ratio, row.target or "-", row.result)


def _decimals(number: float) -> int:
    # Enough digits for the small times of the smoke run, few for the long ones of the full run.
    return 1 if abs(number) >= 10 else 2 if abs(number) >= 1 else 3


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table, followed by the rows' notes."""
    lines = [TABLE_HEADER, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_HEADER))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text + _notes(rows))


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table, followed by the rows' notes."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    notes = _notes(rows)
    return "\n".join(lines + ([""] + notes if notes else []))


def _notes(rows: Sequence[Row]) -> list[str]:
    return [f"- {row.section} / {row.case}: {row.note}" for row in rows if row.note]


# -- models and schemes ----------------------------------------------------------------------


def resnet18(size: int) -> nn.Module:
    """torchvision resnet18 with random weights (``size`` is unused: it takes any input size)."""
    import torchvision

    return torchvision.models.resnet18(weights=None)


def vit_tiny(size: int) -> nn.Module:
    """timm vit_tiny_patch16_224 with random weights, for ``size`` x ``size`` images."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size)


MODELS: dict[str, Callable[[int], nn.Module]] = {"resnet18": resnet18, "vit_tiny": vit_tiny}


def quantwire_calibrate(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """quantwire's calibration over ``batches``."""
    quantwire.calibrate(model, batches, progress=False)


def quantwire_w4a4_lsq(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The ``w4a4_lsq`` preset applied to ``model``."""
    return quantwire.quantize_model(model, "w4a4_lsq", inplace=inplace)


def brevitas_w8a8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The Brevitas twin of :func:`quantize_w8a8`: every Conv2d/Linear becomes Brevitas'
    ``QuantConv2d``/``QuantLinear`` with ``Int8WeightPerChannelFloat`` weights and an
    ``Int8ActPerTensorFloat`` input quantizer, the float weights copied."""
    from brevitas import nn as brevitas_nn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    quantizers = {"weight_quant": Int8WeightPerChannelFloat, "input_quant": Int8ActPerTensorFloat}
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                twin = brevitas_nn.QuantConv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                    **quantizers,
                )
            elif type(child) is nn.Linear:
                twin = brevitas_nn.QuantLinear(
                    child.in_features, child.out_features, bias=child.bias is not None, **quantizers
                )
            else:
                continue
            with torch.no_grad():
                twin.weight.copy_(child.weight)
                if child.bias is not None:
                    twin.bias.copy_(child.bias)
            setattr(parent, name, twin.train(child.training))
    return model


def brevitas_calibrate(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Brevitas' calibration over ``batches`` (``brevitas.graph.calibrate.calibration_mode``)."""
    from brevitas.graph.calibrate import calibration_mode

    with torch.no_grad(), calibration_mode(model):
        for batch in batches:
            model(batch)


def set_brevitas_weight_cache(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn Brevitas' cache of quantized weights in eval mode on or off (off also empties it)."""
    from brevitas.proxy import WeightQuantProxyFromInjector as BrevitasWeightProxy

    for module in model.modules():
        if isinstance(module, BrevitasWeightProxy):
            module.cache_inference_quant_weight = enabled
    return model


@dataclass(frozen=True)
class Scheme:
    """A way to quantize a float model (``convert(model, inplace)``), to calibrate it
    (``calibrate(model, batches)``) and to switch its eval-mode weight cache on or off."""

    name: str
    convert: Callable[[nn.Module, bool], nn.Module]
    calibrate: Callable[[nn.Module, Sequence[torch.Tensor]], object]
    weight_cache: Callable[[nn.Module, bool], nn.Module]


def brevitas_version() -> str | None:
    """Brevitas' version when it is installed, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its import warns about optional kernels it does without
            import brevitas
    except ImportError:
        return None
    return brevitas.__version__


SCHEMES: dict[str, Scheme] = {
    "w8a8": Scheme(W8A8, quantize_w8a8, quantwire_calibrate, set_weight_cache),
    "w4a4_lsq": Scheme(W4A4_LSQ, quantwire_w4a4_lsq, quantwire_calibrate, set_weight_cache),
    "brevitas": Scheme(BREVITAS_W8A8, brevitas_w8a8, brevitas_calibrate, set_brevitas_weight_cache),
}
"""The quantized variants the suite can compare, by their ``--schemes`` key."""


def schemes(keys: Sequence[str]) -> dict[str, Scheme]:
    """The :data:`SCHEMES` called ``keys``, by their table name."""
    return {SCHEMES[key].name: SCHEMES[key] for key in keys}


@dataclass
class Prepared:
    """One model's benchmark inputs: the float model and its calibrated quantized variants."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    float_model: nn.Module
    quantized: dict[str, nn.Module] = field(default_factory=dict)
    schemes: dict[str, Scheme] = field(default_factory=dict)

    def copied(self) -> Prepared:
        """A deep copy, for a section that changes the models (QAT steps, calibration), so that
        what one section does (a diverging QAT run) does not reach the next."""
        return copy.deepcopy(self)

    def models(self) -> dict[str, nn.Module]:
        """Every model of the comparison, float first."""
        return {FLOAT: self.float_model, **self.quantized}


def model_input(args: argparse.Namespace, name: str) -> tuple[int, int]:
    """The batch size and image size ``name`` runs at."""
    return (args.vit_batch, args.vit_size) if name == "vit_tiny" else (args.batch, args.size)


def make_batch(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and ImageNet labels."""
    return torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))


def convert_and_calibrate(scheme: Scheme, model: nn.Module, batch: torch.Tensor, inplace: bool) -> nn.Module:
    """``model`` quantized by ``scheme`` and calibrated on ``batch`` (in eval mode), then put in
    training mode, ready for QAT."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left in float are expected (pooling, norms)
        quantized = scheme.convert(model, inplace)
    scheme.calibrate(quantized.eval(), [batch])
    return quantized.train()


def prepare(args: argparse.Namespace, name: str, keys: Sequence[str]) -> Prepared:
    """``name`` with random weights, its batch, and its quantized variants (the :data:`SCHEMES`
    called ``keys``), calibrated."""
    torch.manual_seed(0)
    batch, size = model_input(args, name)
    images, labels = make_batch(batch, size)
    prepared = Prepared(name, images, labels, MODELS[name](size), schemes=schemes(keys))
    for scheme in prepared.schemes.values():
        prepared.quantized[scheme.name] = convert_and_calibrate(scheme, prepared.float_model, images, inplace=False)
    return prepared


# -- timing -----------------------------------------------------------------------------------


def interleaved_medians(runs: dict[str, Callable[[], object]], steps: int, warmup: int) -> dict[str, float]:
    """The median wall time (ms) of each of ``runs``; they take turns, ``warmup`` untimed turns
    and then ``steps`` timed ones."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for turn in range(warmup + steps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if turn >= warmup:
                times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def versus_float(
    section: str, prepared: Prepared, ms: dict[str, float], target: Callable[[str], float | None]
) -> list[Row]:
    """Each quantwire variant against float, and quantwire W8A8 against Brevitas' when it ran."""
    quantwire_variants = [name for name in prepared.quantized if name != BREVITAS_W8A8]
    rows = [
        compared(section, f"{prepared.name} {name} / float", ms[name], ms[FLOAT], target(name))
        for name in quantwire_variants
    ]
    if BREVITAS_W8A8 in ms:
        rows.append(
            compared(
                section,
                f"{prepared.name} {W8A8} / {BREVITAS_W8A8}",
                ms[W8A8],
                ms[BREVITAS_W8A8],
                target(BREVITAS_W8A8),
            )
        )
    return rows


# -- sections ---------------------------------------------------------------------------------


class Workspace:
    """What sections share in one run: the parsed arguments and the prepared models (built on
    first use, so that a section that needs none builds none)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._prepared: dict[str, Prepared] = {}

    def prepared(self, name: str) -> Prepared:
        """A fresh copy of ``name``'s calibrated :class:`Prepared`, the section's to change."""
        if name not in self._prepared:
            _progress(f"building and calibrating {name}")
            self._prepared[name] = prepare(self.args, name, self.args.schemes)
        return self._prepared[name].copied()


def qat_section(work: Workspace) -> list[Row]:
    """A QAT step of every variant against float (and W8A8 against Brevitas')."""
    rows = []
    for name in work.args.models:
        prepared = work.prepared(name)
        runs = {
            label: qat_step(model.train(), prepared.images, prepared.labels)
            for label, model in prepared.models().items()
        }
        ms = interleaved_medians(runs, work.args.steps, work.args.warmup)

        def target(variant: str, model: str = name) -> float | None:
            if model != "resnet18":
                return None
            return {W8A8: 1.3, BREVITAS_W8A8: 0.65}.get(variant)

        rows += [_flag_divergence(row, prepared) for row in versus_float("qat", prepared, ms, target)]
    return rows


def _flag_divergence(row: Row, prepared: Prepared) -> Row:
    """``row`` with a note when the variant it times trained into NaN/inf parameters: its time is
    then not that of a healthy QAT step."""
    variant = row.case.removeprefix(f"{prepared.name} ").split(" / ")[0]
    model = prepared.quantized.get(variant)
    if model is None or all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return row
    return dataclasses.replace(row, note=f"{variant} parameters are NaN/inf after the timed QAT steps")


def eval_section(work: Workspace) -> list[Row]:
    """An eval forward with the quantized weights cached, every variant against float."""
    rows = []
    for name in work.args.models:
        prepared = work.prepared(name)
        for label, model in prepared.quantized.items():
            prepared.schemes[label].weight_cache(model.eval(), True)
        runs = {label: eval_forward(model.eval(), prepared.images) for label, model in prepared.models().items()}
        ms = interleaved_medians(runs, work.args.steps, work.args.warmup)
        rows += versus_float("eval", prepared, ms, lambda variant: None if variant == BREVITAS_W8A8 else 1.1)
    return rows


def calibration_section(work: Workspace) -> list[Row]:
    """Calibration time per batch of every variant against a float forward of the same batches."""
    rows = []
    count = work.args.calibration_batches
    for name in work.args.models:
        prepared = work.prepared(name)
        batches = [torch.randn_like(prepared.images) for _ in range(count)]
        runs = {FLOAT: _float_forwards(prepared.float_model.eval(), batches)}
        for label, model in prepared.quantized.items():
            runs[label] = _calibrations(prepared.schemes[label], model.eval(), batches)
        ms = interleaved_medians(runs, work.args.steps, work.args.warmup)
        per_batch = {label: value / count for label, value in ms.items()}
        rows += versus_float(
            "calibration", prepared, per_batch, lambda variant: None if variant == BREVITAS_W8A8 else 1.3
        )
    return rows


def _calibrations(scheme: Scheme, model: nn.Module, batches: Sequence[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        scheme.calibrate(model, batches)

    return run


def _float_forwards(model: nn.Module, batches: Sequence[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)

    return run


def integer_section(work: Workspace) -> list[Row]:
    """Integer-backend inference (bit-exact and native int8) against fake-quant and float."""
    from native_int8 import benchmark_rows  # imported here: the other sections run without the int8 backend

    args = work.args
    _progress("integer backend: building float, fake-quant, integer, native int8 and PyTorch int8 resnet18")
    timing, agreement = benchmark_rows(args.threads, args.steps, args.batch, args.size)
    ms = {row.name: row.ms for row in timing}
    targets = {"integer": 2.0, "native int8": 0.3}
    rows = [
        compared("integer", f"resnet18 {name} / float", value, ms["float"], targets.get(name))
        for name, value in ms.items()
        if name != "float"
    ]
    fresh = agreement["fresh"].output
    rows.append(
        Row(
            "integer",
            "resnet18 integer / fake-quant",
            ms["integer"],
            ms["fake-quant"],
            note=f"native int8 output within 1 step of the integer model on a fresh batch: {fresh.within_one:.4f}",
        )
    )
    return rows


def memory_section(work: Workspace) -> list[Row]:
    """Peak resident memory of a QAT run, each variant in its own process, against float."""
    rows = []
    for name in work.args.models:
        labels = [FLOAT, *schemes(work.args.schemes)]
        peak = {label: _child_peak_mb(work.args, name, label) for label in labels}
        for label in labels[1:]:
            if label == BREVITAS_W8A8:
                rows.append(compared("memory", f"{name} {W8A8} / {label} peak RSS", peak[W8A8], peak[label], unit="MB"))
            else:
                rows.append(compared("memory", f"{name} {label} / float peak RSS", peak[label], peak[FLOAT], unit="MB"))
    return rows


def _child_peak_mb(args: argparse.Namespace, name: str, label: str) -> float:
    _progress(f"memory: {name} {label} in its own process")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--rss-child",
        name,
        label,
        "--threads",
        str(args.threads),
    ]
    command += ["--batch", str(args.batch), "--size", str(args.size)]
    command += ["--vit-batch", str(args.vit_batch), "--vit-size", str(args.vit_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the RSS child for {name} {label} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def rss_child(args: argparse.Namespace) -> dict[str, float]:
    """The body of a ``--rss-child MODEL SCHEME`` process: build, quantize in place (so that no
    float copy stays alive), calibrate, run :data:`RSS_STEPS` QAT steps; returns the peak RSS."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name, label = args.rss_child
    batch, size = model_input(args, name)
    images, labels = make_batch(batch, size)
    model = MODELS[name](size)
    if label != FLOAT:
        scheme = next(scheme for scheme in SCHEMES.values() if scheme.name == label)
        model = convert_and_calibrate(scheme, model, images, inplace=True)
    step = qat_step(model.train(), images, labels)
    for _ in range(RSS_STEPS):
        step()
    return {"peak_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. On Linux it is ``VmHWM`` from
    ``/proc/self/status``: ``ru_maxrss`` would not do there, because a child started from this
    (large) suite process inherits the parent's peak through fork and exec. Elsewhere it is
    ``ru_maxrss`` (bytes on macOS, KiB on the other Unixes)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def compile_section(work: Workspace) -> list[Row]:
    """The resnet18 W8A8 QAT step with the model under ``torch.compile``, against eager and
    against compiled float, and the graph breaks inside quantwire."""
    args = work.args
    _progress("compile: building and calibrating resnet18 W8A8")
    prepared = prepare(args, "resnet18", ["w8a8"])
    quantized = prepared.quantized[W8A8]
    breaks_row = graph_breaks_row(copy.deepcopy(quantized).train(), prepared.images)
    torch._dynamo.reset()
    eager = {FLOAT: prepared.float_model, W8A8: quantized}
    compiled = {f"compiled {label}": torch.compile(copy.deepcopy(model).train()) for label, model in eager.items()}
    runs = {label: qat_step(model.train(), prepared.images, prepared.labels) for label, model in eager.items()}
    first_call_s = {}
    for label, model in compiled.items():
        _progress(f"compile: first call of the {label} QAT step")
        runs[label] = qat_step(model, prepared.images, prepared.labels)
        start = time.perf_counter()
        runs[label]()
        first_call_s[label] = time.perf_counter() - start
    ms = interleaved_medians(runs, args.steps, args.warmup)
    compiled_w8a8, compiled_float = f"compiled {W8A8}", f"compiled {FLOAT}"
    speedup = ms[compiled_w8a8] / ms[W8A8]
    return [
        compared(
            "compile",
            "resnet18 W8A8 compiled first call / float compiled first call",
            first_call_s[compiled_w8a8],
            first_call_s[compiled_float],
            unit="s",
        ),
        Row("compile", "resnet18 W8A8 compiled / eager", ms[compiled_w8a8], ms[W8A8], "ms", "< 1x", speedup < 1),
        compared("compile", "resnet18 W8A8 compiled / float compiled", ms[compiled_w8a8], ms[compiled_float]),
        compared("compile", "resnet18 float compiled / eager", ms[compiled_float], ms[FLOAT]),
        breaks_row,
    ]


def graph_breaks_row(model: nn.Module, images: torch.Tensor) -> Row:
    """The graph breaks ``torch._dynamo.explain`` finds in ``model``'s training forward: the count
    with a frame inside quantwire's source tree against the total; the target is none there."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(images)
    inside = []
    for reason in explained.break_reasons:
        frames = [frame for frame in reason.user_stack if _inside_quantwire(frame.filename)]
        if frames:
            inside.append(f"{frames[-1].filename}:{frames[-1].lineno} ({reason.reason.splitlines()[0]})")
    note = "; ".join(inside)
    return Row(
        "compile",
        "resnet18 W8A8 graph breaks inside quantwire / all",
        len(inside),
        explained.graph_break_count,
        "breaks",
        "0 inside",
        not inside,
        note,
    )


def _inside_quantwire(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(QUANTWIRE_SOURCE)


SECTIONS: dict[str, Callable[[Workspace], list[Row]]] = {
    "qat": qat_section,
    "eval": eval_section,
    "calibration": calibration_section,
    "integer": integer_section,
    "memory": memory_section,
    "compile": compile_section,
}


# -- entry points -----------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"[suite] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The suite's arguments, with ``--quick`` applied to the defaults it changes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="timed runs per row (default 10, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per model before timing")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 steps, resnet18 only")
    parser.add_argument("--markdown", help="also write the table to this file as Markdown")
    parser.add_argument("--only", nargs="+", choices=SECTIONS_IN_ORDER, help="run only these sections")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all, resnet18 with --quick")
    parser.add_argument("--batch", type=int, default=16, help="resnet18 batch size")
    parser.add_argument("--size", type=int, default=64, help="resnet18 image size")
    parser.add_argument("--vit-batch", type=int, default=8, help="vit_tiny batch size")
    parser.add_argument("--vit-size", type=int, default=112, help="vit_tiny image size")
    parser.add_argument("--calibration-batches", type=int, default=2, help="batches per timed calibration")
    parser.add_argument(
        "--schemes", nargs="+", choices=list(SCHEMES), help="quantized variants (default: all; brevitas if installed)"
    )
    parser.add_argument("--rss-child", nargs=2, metavar=("MODEL", "SCHEME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 10
    if args.models is None:
        args.models = ["resnet18"] if args.quick else list(MODELS)
    if args.schemes is None:
        args.schemes = [key for key in SCHEMES if key != "brevitas" or brevitas_version() is not None]
    elif "brevitas" in args.schemes and brevitas_version() is None:
        parser.error("--schemes brevitas: Brevitas is not installed (pip install brevitas)")
    if "w8a8" not in args.schemes:
        parser.error("--schemes must include w8a8: every comparison with Brevitas and the compile section use it")
    wanted = set(args.only or DEFAULT_SECTIONS)
    args.only = [section for section in SECTIONS_IN_ORDER if section in wanted]
    return args


def run_suite(args: argparse.Namespace) -> list[Row]:
    """Run the sections ``args.only`` names, in the suite's order; returns the table's rows."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Workspace(args)
    rows: list[Row] = []
    for section in args.only:
        _progress(f"section {section}")
        rows += SECTIONS[section](work)
    return rows


def header(args: argparse.Namespace) -> str:
    """What the run measured on: versions, threads, sizes."""
    compared_to = f"Brevitas {brevitas_version()}" if "brevitas" in args.schemes else "no Brevitas"
    return (
        f"quantwire {quantwire.__version__}, torch {torch.__version__}, {args.threads} threads, {compared_to}; "
        f"median of {args.steps} after {args.warmup} warm-up; resnet18 {args.batch}x3x{args.size}x{args.size}, "
        f"vit_tiny {args.vit_batch}x3x{args.vit_size}x{args.vit_size}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args)))
        return
    rows = run_suite(args)
    print(header(args))
    print(format_table(rows))
    if "compile" not in args.only:
        print("(torch.compile not measured: it compiles for minutes on a cold cache; add it with --only ... compile)")
    if args.markdown:
        Path(args.markdown).write_text(header(args) + "\n\n" + markdown_table(rows) + "\n")


if __name__ == "__main__":
    main()
