"""The ``quantwire`` command: ``demo``, ``quantize``, ``inspect`` and ``export``.

Errors from bad arguments (unknown model, missing file, bad preset) print one
``quantwire: error: ...`` line on stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from quantwire import __version__, config
from quantwire.errors import QuantwireError

METHODS = ("calibrate", "gptq", "adaround", "qdrop", "brecq")


def _demo(args: argparse.Namespace) -> int:
    """Run the digits demo and write its report folder."""
    from quantwire.cli_support.demo import DemoSettings, run_demo
    from quantwire.cli_support.report import write_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_demo(out, DemoSettings(seed=args.seed, progress=args.progress, threads=args.threads))
    for name, value in result.accuracies.items():
        print(f"{name:34s} {value:6.2f}%")
    agreement = result.agreement
    print(
        f"integer vs fake-quant W8A8: {100 * agreement.equal_predictions:.2f}% equal predictions, "
        f"max abs logit difference {agreement.max_abs_logit_diff:.3g}"
    )
    print(f"report: {write_report(result, out)}")
    return 0


def _calibration_batches(args: argparse.Namespace) -> list[Any]:
    """The ``--calibration`` data cut into batches of ``--batch-size`` (tokenized sentences
    for a Hugging Face text model)."""
    from quantwire.cli_support.models import is_text_model, load_calibration, load_text_calibration

    if is_text_model(args.model):
        return load_text_calibration(args.model, args.calibration, args.batch_size, seed=args.seed)
    data = load_calibration(args.calibration, args.image_size, seed=args.seed)
    return list(torch.split(data, args.batch_size))


def _quantize(args: argparse.Namespace) -> int:
    """Convert MODEL with the config, calibrate it, optionally optimise it, save it."""
    import quantwire
    from quantwire import algorithms
    from quantwire.cli_support.models import build_model, load_float_weights

    model = build_model(args.model)
    if args.checkpoint:
        load_float_weights(model, args.checkpoint)
    qmodel = quantwire.quantize_model(model, args.config).eval()
    calibration = _calibration_batches(args)
    quantwire.calibrate(qmodel, calibration, progress=args.progress)
    if args.method != "calibrate":
        optimise = getattr(algorithms, args.method)
        extra = {} if args.method == "gptq" else {"iters": args.iters}
        optimise(qmodel, calibration, progress=args.progress, **extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {quantwire.save_quantized(qmodel.eval(), out / 'model.safetensors')}")
    return 0


def _load(args: argparse.Namespace) -> torch.nn.Module:
    """The quantized model of CHECKPOINT on the architecture of ``--model``, in eval mode."""
    import quantwire
    from quantwire.cli_support.models import build_model

    return quantwire.load_quantized(build_model(args.model), args.checkpoint).eval()


def _inspect(args: argparse.Namespace) -> int:
    """Print one row per weight-quantized layer of CHECKPOINT."""
    from quantwire.cli_support.stats import layer_rows

    rows = layer_rows(_load(args))
    header = ("layer", "quantizer", "bits", "scale min", "scale max", "weight SQNR (dB)")
    table = [header] + [
        (r.layer, r.quantizer, r.bit_width, f"{r.scale_min:.3g}", f"{r.scale_max:.3g}", f"{r.weight_sqnr:.1f}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _export(args: argparse.Namespace) -> int:
    """Convert CHECKPOINT to the integer backend and export its test vectors."""
    import quantwire
    from quantwire.cli_support.models import CliError, parse_shape

    shape = parse_shape(args.input_shape)
    if Path(args.out).exists() and not args.overwrite:  # refused before loading and converting the model
        raise CliError(f"{args.out} already exists; pass --overwrite to replace it")
    imodel = quantwire.to_integer(_load(args))
    example = torch.rand(shape, generator=torch.Generator().manual_seed(args.seed)).double()
    out = quantwire.export_integer(imodel, example, args.out, overwrite=args.overwrite, progress=args.progress)
    print(f"exported integer test vectors to {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``quantwire: error: ...`` line (no usage)."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line on stderr and exit with status 2."""
        self.exit(2, f"quantwire: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="quantwire", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"quantwire {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    common.add_argument("--seed", type=int, default=0)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", parents=[common], help="train, quantize, convert and report on digits")
    demo.add_argument("--out", default="quantwire-demo", help="report folder (default ./quantwire-demo)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for this tiny CNN)")
    demo.set_defaults(run=_demo)

    model_help = "torchvision:NAME, timm:NAME or a Hugging Face folder"
    quantize = commands.add_parser("quantize", parents=[common], help="quantize a model and save a checkpoint")
    quantize.add_argument("model", metavar="MODEL", help=model_help)
    quantize.add_argument("--checkpoint", help="float weights (.safetensors or torch state dict)")
    quantize.add_argument("--config", default="w8a8", help="preset name or .yaml/.json config (default w8a8)")
    quantize.add_argument("--calibration", default="synthetic", help="image folder, .npy/.pt file or 'synthetic'")
    quantize.add_argument("--method", choices=METHODS, default="calibrate")
    quantize.add_argument("--iters", type=int, default=200, help="reconstruction steps (adaround, qdrop, brecq)")
    quantize.add_argument("--image-size", type=int, default=224)
    quantize.add_argument("--batch-size", type=int, default=8)
    quantize.add_argument("--out", required=True, help="folder for model.safetensors")
    quantize.set_defaults(run=_quantize)

    for name, help_text, run in (
        ("inspect", "per-layer table of a quantized checkpoint", _inspect),
        ("export", "integer-backend test vectors of a quantized checkpoint", _export),
    ):
        sub = commands.add_parser(name, parents=[common], help=help_text)
        sub.add_argument("checkpoint", metavar="CHECKPOINT")
        sub.add_argument("--model", required=True, help=model_help)
        sub.set_defaults(run=run)
        if name == "export":
            sub.add_argument("--out", required=True)
            sub.add_argument("--input-shape", default="1,3,224,224")
            sub.add_argument("--overwrite", action="store_true")
    return parser


def _one_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``quantwire`` command on ``argv`` (``sys.argv[1:]`` when None); the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            args = parser.parse_args(["demo"])
    except SystemExit as exit_:  # --help, --version and argument errors (already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    args.progress = args.progress and config.PROGRESS
    try:
        return args.run(args)
    except (QuantwireError, OSError, ValueError) as error:
        print(f"quantwire: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
