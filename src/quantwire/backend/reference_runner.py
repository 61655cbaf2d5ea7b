"""A NumPy-only reference for a folder written by :func:`quantwire.backend.export.export_integer`.

Every operator call of the manifest is recomputed from its recorded inputs and parameters with
NumPy integer arithmetic (int64: matrix products with ``np.matmul``, convolutions as windows
(``sliding_window_view``) contracted with ``np.einsum``, rescales with an exact round-half-to-even
right shift) and compared with its recorded output, bit for bit. The *chain* check then runs
the operators again, feeding each input that the manifest links to an earlier operator's
output (``source``) with the runner's own result for that operator instead of the recorded
tensor: it must reproduce every recorded output too.

This module imports only NumPy and the standard library (no torch, no quantwire), so it can be
copied next to an export and run on its own::

    python -m quantwire.backend.reference_runner FOLDER [--json]
    python reference_runner.py FOLDER

It prints one line per operator call and exits with 1 when any output differs, 2 when the
folder can not be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["ManifestError", "compute", "format_report", "main", "run_manifest"]

FORMAT = "quantwire-integer-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """The folder is not a readable export, or an operator of it can not be computed (named)."""


# -- the operators --------------------------------------------------------------------------------


def _channel_view(values: np.ndarray, like: np.ndarray, channel_dim: int) -> np.ndarray:
    """Per-channel (or scalar) ``values`` shaped to broadcast along ``channel_dim`` of ``like``."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * like.ndim
    shape[channel_dim] = -1
    return values.reshape(shape)


def rounding_right_shift(x: np.ndarray, shift: int) -> np.ndarray:
    """``x / 2**shift`` rounded half to even, in int64 (a left shift when ``shift <= 0``)."""
    if shift <= 0:
        return x * np.int64(1 << -shift)
    divisor = np.int64(1 << shift)
    floor = np.floor_divide(x, divisor)
    remainder = x - floor * divisor
    half = np.int64(1 << (shift - 1))
    round_up = (remainder > half) | ((remainder == half) & (floor % 2 == 1))
    return floor + round_up.astype(np.int64)


def quantize(inputs: dict[str, np.ndarray], params: dict[str, np.ndarray], attributes: dict) -> np.ndarray:
    """``round_half_even(clip(x / scale + zero_point, qmin, qmax))`` in the recorded compute dtype."""
    dtype = np.dtype(attributes["compute_dtype"])
    x = inputs["x"].astype(dtype, copy=False)
    y = x / params["scale"].astype(dtype) + params["zero_point"].astype(dtype)
    y = np.round(np.clip(y, dtype.type(attributes["qmin"]), dtype.type(attributes["qmax"])))
    if not np.isfinite(y).all():
        raise ManifestError("Quantize: non-finite codes")
    return y.astype(np.int64)


def _fixed_point(accumulator: np.ndarray, params: dict[str, np.ndarray], attributes: dict) -> np.ndarray:
    """``acc * M + B`` in int64, refused when it could overflow."""
    multiplier = params["multiplier"].astype(np.int64)
    bias = params["bias"].astype(np.int64) if "bias" in params else None
    if accumulator.size:
        largest = int(np.abs(accumulator).max()) * int(np.abs(multiplier).max(initial=0))
        largest += int(np.abs(bias).max(initial=0)) if bias is not None else 0
        if largest >= 2**63:
            raise ManifestError("accumulator x multiplier overflows int64")
    channel_dim = attributes["channel_dim"]
    out = accumulator * _channel_view(multiplier, accumulator, channel_dim)
    if bias is not None:
        out = out + _channel_view(bias, accumulator, channel_dim)
    return out


def mul_shift(inputs: dict[str, np.ndarray], params: dict[str, np.ndarray], attributes: dict) -> np.ndarray:
    """``(acc * M + B) * 2**-sfl`` as float64."""
    return _fixed_point(inputs["accumulator"], params, attributes).astype(np.float64) * 2.0 ** -attributes["sfl"]


def mul_quant(inputs: dict[str, np.ndarray], params: dict[str, np.ndarray], attributes: dict) -> np.ndarray:
    """``clip(round_half_even((acc * M + B) / 2**sfl) + zero_point, qmin, qmax)`` in int64."""
    codes = rounding_right_shift(_fixed_point(inputs["accumulator"], params, attributes), attributes["sfl"])
    codes = codes + _channel_view(params["zero_point"].astype(np.int64), codes, attributes["channel_dim"])
    return np.clip(codes, attributes["qmin"], attributes["qmax"])


def _tuple(value: Any, count: int) -> tuple[int, ...]:
    """A convolution option as one integer per spatial dimension."""
    return tuple(value) if isinstance(value, list | tuple) else (value,) * count


def _pad(x: np.ndarray, before: tuple[int, ...], after: tuple[int, ...]) -> np.ndarray:
    """Zero padding of the spatial dimensions (``x[:, :, ...]``); negative amounts crop."""
    spatial = range(2, x.ndim)
    x = np.pad(x, [(0, 0), (0, 0)] + [(max(b, 0), max(a, 0)) for b, a in zip(before, after, strict=True)])
    crop = tuple(slice(max(-b, 0), x.shape[d] - max(-a, 0)) for d, b, a in zip(spatial, before, after, strict=True))
    return x[(slice(None), slice(None)) + crop]


def _padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple, tuple]:
    """Zero padding before and after each spatial dimension, from an int, a list or ``"valid"`` /
    ``"same"`` (as torch places it: the odd element after)."""
    if padding == "valid":
        return (0,) * len(kernel), (0,) * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        before = tuple(t // 2 for t in total)
        return before, tuple(t - b for t, b in zip(total, before, strict=True))
    amounts = _tuple(padding, len(kernel))
    return amounts, amounts


def convolution(x: np.ndarray, w: np.ndarray, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1):
    """N-d cross-correlation (``torch.nn.functional.conv{1,2,3}d``) in int64: ``x`` is
    ``(N, C, *S)``, ``w`` is ``(C_out, C / groups, *K)``."""
    spatial = w.ndim - 2
    kernel = w.shape[2:]
    stride, dilation = _tuple(stride, spatial), _tuple(dilation, spatial)
    x = _pad(x, *_padding(padding, kernel, dilation))
    reach = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
    axes = tuple(range(2, 2 + spatial))
    windows = sliding_window_view(x, reach, axis=axes)
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)]
    windows = windows[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)]
    batch, channels = x.shape[:2]
    outputs = windows.shape[2 : 2 + spatial]
    windows = windows.reshape(batch, groups, channels // groups, *outputs, *kernel)
    weight = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    letters = "abcdefghijklmnopqrstuvwxyz"
    out_letters, kernel_letters = letters[:spatial], letters[spatial : 2 * spatial]
    equation = f"NGC{out_letters}{kernel_letters},GOC{kernel_letters}->NGO{out_letters}"
    out = np.einsum(equation, windows, weight)
    return out.reshape(batch, w.shape[0], *outputs)


def transposed_convolution(
    x: np.ndarray,
    w: np.ndarray,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: int = 1,
    dilation: Any = 1,
) -> np.ndarray:
    """``torch.nn.functional.conv_transpose{1,2}d`` in int64 (``w`` is ``(C, C_out / groups, *K)``):
    the input spread out by ``stride`` (zeros between), padded by ``dilation * (k - 1) - padding``
    (plus ``output_padding`` after), convolved with the flipped, transposed kernel."""
    spatial = w.ndim - 2
    kernel = w.shape[2:]
    stride, dilation = _tuple(stride, spatial), _tuple(dilation, spatial)
    padding, output_padding = _tuple(padding, spatial), _tuple(output_padding, spatial)
    spread = np.zeros(x.shape[:2] + tuple((n - 1) * s + 1 for n, s in zip(x.shape[2:], stride, strict=True)), x.dtype)
    spread[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = x
    before = tuple(d * (k - 1) - p for k, d, p in zip(kernel, dilation, padding, strict=True))
    after = tuple(b + o for b, o in zip(before, output_padding, strict=True))
    channels_in, per_group_out = w.shape[:2]
    weight = w.reshape(groups, channels_in // groups, per_group_out, *kernel).swapaxes(1, 2)
    weight = weight.reshape(groups * per_group_out, channels_in // groups, *kernel)
    weight = np.flip(weight, axis=tuple(range(2, 2 + spatial)))
    return convolution(_pad(spread, before, after), weight, 1, 0, dilation, groups)


def _linear(x: np.ndarray, w: np.ndarray, kwargs: dict) -> np.ndarray:
    return np.matmul(x, w.T)


_PRODUCTS: dict[str, Callable[[np.ndarray, np.ndarray, dict], np.ndarray]] = {
    "matmul": lambda x, w, kwargs: np.matmul(x, w),
    "linear": _linear,
    "conv1d": lambda x, w, kwargs: convolution(x, w, **kwargs),
    "conv2d": lambda x, w, kwargs: convolution(x, w, **kwargs),
    "conv3d": lambda x, w, kwargs: convolution(x, w, **kwargs),
    "conv_transpose1d": lambda x, w, kwargs: transposed_convolution(x, w, **kwargs),
    "conv_transpose2d": lambda x, w, kwargs: transposed_convolution(x, w, **kwargs),
    "conv_transpose3d": lambda x, w, kwargs: transposed_convolution(x, w, **kwargs),
}


def int_matmul(inputs: dict[str, np.ndarray], params: dict[str, np.ndarray], attributes: dict) -> np.ndarray:
    """The exact int64 product, wrapped to the accumulator width when the overflow mode is ``wrap``."""
    op = attributes["op"]
    if op not in _PRODUCTS:
        raise ManifestError(f"unknown product {op!r}")
    w = inputs["w"] if "w" in inputs else params["weight"]
    accumulator = _PRODUCTS[op](inputs["x"].astype(np.int64), w.astype(np.int64), attributes.get("op_kwargs", {}))
    bits = attributes["accumulator_bits"]
    if attributes.get("overflow") == "wrap" and bits < 64:
        limit = np.int64(1 << (bits - 1))
        accumulator = np.mod(accumulator + limit, np.int64(1 << bits)) - limit
    return accumulator


OPERATORS: dict[str, Callable[[dict[str, np.ndarray], dict[str, np.ndarray], dict], np.ndarray]] = {
    "Quantize": quantize,
    "IntMatMul": int_matmul,
    "MulShift": mul_shift,
    "MulQuant": mul_quant,
}


def compute(entry: dict, inputs: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> np.ndarray:
    """The output of the manifest's operator ``entry`` on ``inputs`` (by role) and ``params``."""
    label = f"{entry['type']} {entry['name']} (operator {entry['index']})"
    if entry["type"] not in OPERATORS:
        raise ManifestError(f"{label}: unknown operator type")
    try:
        return OPERATORS[entry["type"]](inputs, params, entry["attributes"])
    except ManifestError as error:
        raise ManifestError(f"{label}: {error}") from error
    except (KeyError, ValueError, TypeError) as error:
        raise ManifestError(f"{label}: can not compute it: {type(error).__name__}: {error}") from error


# -- comparing ------------------------------------------------------------------------------------


def compare(computed: np.ndarray, recorded: np.ndarray) -> tuple[int, float]:
    """How many elements differ (bit for bit; every one when the shapes differ) and the largest
    absolute difference among them."""
    if computed.shape != recorded.shape:
        return int(recorded.size), float("inf")
    if recorded.dtype.kind == "f":
        computed = computed.astype(recorded.dtype)
        bits = np.dtype(f"u{recorded.dtype.itemsize}")
        differ = computed.view(bits) != recorded.view(bits)
    else:
        differ = computed != recorded
    mismatches = int(np.count_nonzero(differ))
    if not mismatches:
        return 0, 0.0
    difference = np.abs(computed[differ].astype(np.float64) - recorded[differ].astype(np.float64))
    return mismatches, float("nan") if np.isnan(difference).all() else float(np.nanmax(difference))


# -- running a folder -----------------------------------------------------------------------------


class _Folder:
    """An export folder: its manifest and its arrays, loaded on demand (each once)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        try:
            with open(self.path / MANIFEST, encoding="utf-8") as stream:
                self.manifest = json.load(stream)
        except (OSError, json.JSONDecodeError) as error:
            raise ManifestError(f"{self.path}: can not read {MANIFEST}: {error}") from error
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"{self.path}: not a {FORMAT} version {FORMAT_VERSION} export "
                f"(format {self.manifest.get('format')!r}, version {self.manifest.get('format_version')!r})"
            )
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, record: dict) -> np.ndarray:
        """The array a manifest record names, checked against its recorded dtype and shape."""
        relative = record["file"]
        if relative not in self._arrays:
            try:
                array = np.load(self.path / relative, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise ManifestError(f"{self.path}: can not read {relative}: {error}") from error
            if str(array.dtype) != record["dtype"] or list(array.shape) != record["shape"]:
                raise ManifestError(
                    f"{relative}: holds {array.dtype} {list(array.shape)}, the manifest says "
                    f"{record['dtype']} {record['shape']}"
                )
            self._arrays[relative] = array
        return self._arrays[relative]

    def params(self, entry: dict) -> dict[str, np.ndarray]:
        return {key: self.array(record) for key, record in entry["params"].items()}


def _chained_input(entry: dict, record: dict, folder: _Folder, own: dict[int, np.ndarray]) -> np.ndarray:
    """An input as the runner computed it: the source operator's own output (minus its zero
    point when the edge says so)."""
    source = record["source"]
    index = source["operator"]
    if index not in own:
        raise ManifestError(
            f"{entry['type']} {entry['name']} (operator {entry['index']}): input {record['role']} comes from "
            f"operator {index}, which does not run before it"
        )
    value = own[index]
    if source.get("subtract_zero_point"):
        producer = folder.manifest["operators"][index]
        zero_point = folder.array(producer["params"]["zero_point"])
        value = value - np.int64(np.round(zero_point.reshape(())))
    return value


def run_manifest(folder: str | Path) -> dict[str, Any]:
    """Recompute every operator call of the export in ``folder`` and compare it with its
    recorded output: from the recorded inputs, and chained (inputs with a ``source`` taken from
    the runner's own earlier outputs). Returns ``{"folder", "model_class", "operators": [{index,
    name, type, call, elements, mismatches, max_abs_diff, chain_mismatches, chain_max_abs_diff,
    chained_inputs}], "mismatches", "chain": {"mismatches", "max_abs_diff", "chained_inputs",
    "ok"}, "ok"}``. Raises :class:`ManifestError` for a folder it can not read."""
    data = _Folder(folder)
    own: dict[int, np.ndarray] = {}
    rows = []
    for entry in data.manifest["operators"]:
        params = data.params(entry)
        recorded_inputs = {record["role"]: data.array(record) for record in entry["inputs"]}
        recorded_output = data.array(entry["outputs"][0])
        direct = compute(entry, recorded_inputs, params)
        mismatches, max_abs_diff = compare(direct, recorded_output)
        chained = {
            record["role"]: _chained_input(entry, record, data, own)
            for record in entry["inputs"]
            if record.get("source") is not None
        }
        own[entry["index"]] = compute(entry, {**recorded_inputs, **chained}, params) if chained else direct
        chain_mismatches, chain_max_abs_diff = compare(own[entry["index"]], recorded_output)
        rows.append(
            {
                "index": entry["index"],
                "name": entry["name"],
                "type": entry["type"],
                "call": entry["call"],
                "elements": int(recorded_output.size),
                "mismatches": mismatches,
                "max_abs_diff": max_abs_diff,
                "chain_mismatches": chain_mismatches,
                "chain_max_abs_diff": chain_max_abs_diff,
                "chained_inputs": len(chained),
            }
        )
    total = sum(row["mismatches"] for row in rows)
    chain_total = sum(row["chain_mismatches"] for row in rows)
    return {
        "folder": str(data.path),
        "model_class": data.manifest.get("model_class"),
        "operators": rows,
        "mismatches": total,
        "max_abs_diff": max((row["max_abs_diff"] for row in rows), default=0.0),
        "chain": {
            "mismatches": chain_total,
            "max_abs_diff": max((row["chain_max_abs_diff"] for row in rows), default=0.0),
            "chained_inputs": sum(row["chained_inputs"] for row in rows),
            "ok": chain_total == 0,
        },
        "ok": total == 0 and chain_total == 0,
    }


# -- command line ---------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The report as a table, one line per operator call, and a summary."""
    rows = report["operators"]
    width = max([len(row["name"]) for row in rows] + [4])
    header = f"{'#':>5}  {'name':<{width}}  {'type':<9}  {'call':>4}  {'elements':>9}  {'diff':>6}  {'max|d|':>8}"
    header += f"  {'chained':>7}  {'chain diff':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['index']:>5}  {row['name']:<{width}}  {row['type']:<9}  {row['call']:>4}  {row['elements']:>9}  "
            f"{row['mismatches']:>6}  {row['max_abs_diff']:>8.3g}  {row['chained_inputs']:>7}  "
            f"{row['chain_mismatches']:>10}"
        )
    verdict = "OK: every output reproduced bit for bit" if report["ok"] else "MISMATCH"
    lines.append(
        f"{len(rows)} operator calls, {report['mismatches']} mismatching elements, chained run "
        f"{report['chain']['mismatches']} ({report['chain']['chained_inputs']} chained inputs): {verdict}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m quantwire.backend.reference_runner FOLDER [--json]``: 0 when every output is
    reproduced, 1 on a mismatch, 2 when the folder can not be run."""
    parser = argparse.ArgumentParser(description="Recompute an integer export with NumPy and compare, bit for bit.")
    parser.add_argument("folder", help="a folder written by quantwire.backend.export.export_integer")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    arguments = parser.parse_args(argv)
    try:
        report = run_manifest(arguments.folder)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if arguments.json else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
