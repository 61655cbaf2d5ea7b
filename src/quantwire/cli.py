"""The ``quantwire`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from quantwire import __version__


def _core_check() -> list[str]:
    """Quantize a tensor with quantizers declared through the injector and check the results."""
    from quantwire.core.bit_width import BitWidthConst
    from quantwire.core.function_wrapper import OverChannelView
    from quantwire.core.quant import FloatQuant, IntQuant, RescalingIntQuant
    from quantwire.core.scaling import ConstScaling, IntScaling, StatsScaling
    from quantwire.core.stats import AbsMax
    from quantwire.core.zero_point import ZeroZeroPoint
    from quantwire.inject import ExtendedInjector

    class Int8WeightPerChannel(ExtendedInjector):
        tensor_quant = RescalingIntQuant
        int_quant = IntQuant
        scaling_impl = StatsScaling
        scaling_stats_impl = AbsMax
        scaling_stats_input_view_shape_impl = OverChannelView
        int_scaling_impl = IntScaling
        zero_point_impl = ZeroZeroPoint
        bit_width_impl = BitWidthConst
        bit_width = 8
        signed = True
        narrow_range = True

    class Fp8E4M3(ExtendedInjector):
        tensor_quant = FloatQuant
        scaling_impl = ConstScaling
        scaling_init = 1.0
        exponent_bit_width = 4
        mantissa_bit_width = 3

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=generator)
    lines = []
    for bits in (8, 4, 2):
        value, scale, _, _ = Int8WeightPerChannel.let(bit_width=bits).tensor_quant(weight)
        on_grid = bool(torch.equal(torch.round(value / scale) * scale, value))
        sqnr = 10 * torch.log10(weight.pow(2).sum() / (weight - value).pow(2).sum()).item()
        lines.append(f"int{bits} per-channel weight: SQNR {sqnr:5.1f} dB, on integer grid: {on_grid}")
    fp8 = Fp8E4M3.tensor_quant(weight)[0]
    matches = bool(torch.equal(fp8, weight.to(torch.float8_e4m3fn).float()))
    lines.append(f"fp8 e4m3 equals torch.float8_e4m3fn cast: {matches}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantwire", description=__doc__)
    parser.add_argument("--version", action="version", version=f"quantwire {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("demo", help="end-to-end check on embedded default data")
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        for line in _core_check():
            print(line)
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
