"""Export of an integer model's operator calls, for checking another implementation against it.

:func:`export_integer` runs a model built by :func:`~quantwire.backend.integer.to_integer` on an
example input and records, in execution order, every call of its backend operators
(:class:`~quantwire.backend.ops.Quantize`, :class:`~quantwire.backend.ops.IntMatMul`,
:class:`~quantwire.backend.ops.MulShift`, :class:`~quantwire.backend.ops.MulQuant`): the
tensors each call received and returned, and the operator's parameters, as ``.npy`` files,
plus a JSON manifest. :mod:`quantwire.backend.reference_runner` (NumPy only) recomputes every
call from these files and must reproduce each output bit for bit.

Folder layout::

    manifest.json
    tensors/0007.layer1.0.conv1.matmul.x.npy     one file per input / output of each call
    params/layer1.0.conv1.matmul.weight.npy      one file per array parameter of each operator

Tensor files: integer tensors (codes, accumulators, fixed-point multipliers and biases) are
``int64``; the real tensor a :class:`Quantize` reads is stored in the dtype it was computed in
(float64, or float32 when the model was fed float32); a :class:`MulShift` output is float64.

Manifest (``format_version`` 1)::

    format, format_version, model_class, torch_version, quantwire_version, rounding,
    model_inputs: [{name, dtype, shape}],
    operators: [{
        index, name, type, call,                 # call: the how-manieth call of this module
        inputs:  [{role, file, dtype, shape, range?, source?}],
        outputs: [{role, file, dtype, shape, range?}],
        params:  {key: {file, dtype, shape, range?}},
        attributes: {...},                       # per type, see below
    }],
    edges: [{from: [index, role], to: [index, role], subtract_zero_point, match}]

``range`` is ``[min, max]`` of an integer tensor. An input's ``source`` (and the matching
entry of ``edges``) names the earlier operator call whose output it equals bit for bit:
``{operator, output, subtract_zero_point, match}``, with ``subtract_zero_point`` when it
equals that output minus the producing operator's (scalar) ``zero_point`` (an
``IntegerWBIOL`` feeds ``codes - zero_point`` to its product) and ``match`` ``"identity"``
(the very tensor object) or ``"equal"`` (found by value). Inputs without a source come from
floating-point glue (ReLU, pooling, softmax, ...) or the model input.

Attributes: ``Quantize``: ``qmin``, ``qmax``, ``bit_width``, ``signed``, ``compute_dtype``,
``rounding`` (params ``scale``, ``zero_point``: float64). ``IntMatMul``: ``op``, ``op_kwargs``,
``accumulator_bits``, ``overflow``, ``weight_from_buffer`` (param ``weight`` when the second
operand is the module's buffer, else input ``w``). ``MulShift``: ``swl``, ``sfl``,
``channel_dim``, ``has_bias`` (params ``multiplier``, ``bias``). ``MulQuant``: as ``MulShift``
plus ``qmin``, ``qmax``, ``bit_width``, ``signed``, ``rounding`` (param ``zero_point``).

The export is atomic: everything is written into a temporary sibling folder that is renamed to
``out_dir`` once complete; a failure leaves no folder behind and the model as it was.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import quantwire
from quantwire import config
from quantwire.backend.fixed_point import ROUNDING
from quantwire.backend.ops import IntMatMul, MulQuant, MulShift, Quantize
from quantwire.core.utils import non_finite_kind
from quantwire.errors import ExportError, QuantInputError
from quantwire.files import temporary_sibling

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "ExportError", "export_integer"]

FORMAT = "quantwire-integer-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OPERATOR_TYPES = (Quantize, IntMatMul, MulShift, MulQuant)


# -- what each operator type records ----------------------------------------------------------------


@dataclass(frozen=True)
class _OperatorKind:
    """How calls of one operator type are recorded: its forward's tensor arguments, which of
    them (and whether its output) hold integers, the output's role, its parameters (array
    parameters, and attributes) and which array parameters are real numbers (the others are
    integers, stored as int64)."""

    inputs: tuple[str, ...]
    integer_inputs: bool
    output: str
    integer_output: bool
    parameters: Callable[[nn.Module, dict[str, Tensor]], tuple[dict[str, Tensor], dict[str, Any]]]
    real_parameters: tuple[str, ...] = ()


def _grid_attributes(qmin: int, qmax: int) -> dict[str, Any]:
    """The code range of a quantizer and the bits it takes."""
    span = qmax - qmin + 1
    return {
        "qmin": qmin,
        "qmax": qmax,
        "bit_width": max(1, math.ceil(math.log2(span))) if span > 0 else 0,
        "signed": qmin < 0,
        "rounding": ROUNDING,
    }


def _quantize_parameters(module: Quantize, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``scale`` and ``zero_point`` (float64, as the formula uses them) and the code range."""
    attributes = _grid_attributes(module.qmin, module.qmax)
    attributes["compute_dtype"] = _dtype_name(inputs["x"])
    return {"scale": module.scale, "zero_point": module.zero_point}, attributes


def _matmul_parameters(module: IntMatMul, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The product's kind and options, its accumulator, and its weight when it is the buffer."""
    attributes = {
        "op": module.op,
        "op_kwargs": _jsonable(module.op_kwargs),
        "accumulator_bits": module.accumulator_bits,
        "overflow": module.overflow,
        "weight_from_buffer": "w" not in inputs,
    }
    arrays = {"weight": module.weight} if "w" not in inputs else {}
    return arrays, attributes


def _rescale_parameters(module: MulShift | MulQuant, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Fixed-point multiplier and bias (int64), their format and the channel they vary along."""
    arrays = {"multiplier": module.multiplier}
    if module.bias is not None:
        arrays["bias"] = module.bias
    attributes: dict[str, Any] = {
        "swl": module.swl,
        "sfl": module.sfl,
        "channel_dim": module.channel_dim,
        "has_bias": module.bias is not None,
    }
    if isinstance(module, MulQuant):
        arrays["zero_point"] = module.zero_point
        attributes.update(_grid_attributes(module.qmin, module.qmax))
    return arrays, attributes


_KINDS: dict[type, _OperatorKind] = {
    Quantize: _OperatorKind(("x",), False, "codes", True, _quantize_parameters, ("scale", "zero_point")),
    IntMatMul: _OperatorKind(("x", "w"), True, "acc", True, _matmul_parameters),
    MulShift: _OperatorKind(("accumulator",), True, "y", False, _rescale_parameters),
    MulQuant: _OperatorKind(("accumulator",), True, "codes", True, _rescale_parameters),
}


def _kind(module: nn.Module) -> _OperatorKind:
    return next(kind for cls, kind in _KINDS.items() if isinstance(module, cls))


def _jsonable(value: Any) -> Any:
    """Tuples as lists, recursively (convolution options)."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# -- recording ------------------------------------------------------------------------------------


@dataclass
class _Recorded:
    """One tensor of one call: its role, its value (an int64 or floating-point copy) and, for
    an input, the earlier output it equals."""

    role: str
    value: Tensor
    source: dict[str, Any] | None = None


@dataclass
class _Call:
    """One call of one operator."""

    index: int
    name: str
    module: nn.Module
    call: int
    inputs: list[_Recorded]
    output: _Recorded
    arrays: dict[str, Tensor]
    attributes: dict[str, Any]


def _integers(tensor: Tensor, where: str) -> Tensor:
    """``tensor`` as int64, checking that it holds integers that fit (float64 carries them in
    the model): a value that does not survive the round trip through int64 (a fraction, NaN,
    an infinity, beyond 2**63) is refused."""
    tensor = tensor.detach()
    integers = tensor.to(torch.int64)
    if tensor.dtype.is_floating_point:
        wrong = integers.to(tensor.dtype) != tensor
        if wrong.any():
            raise ExportError(f"{where}: expected integers that fit int64, found {float(tensor[wrong][0])!r}")
    return integers.clone() if integers is tensor else integers


@dataclass
class _Recorder:
    """Forward hooks recording every call of the backend operators of a model, in order."""

    operators: list[tuple[str, nn.Module]]
    calls: list[_Call] = field(default_factory=list)
    _counts: dict[int, int] = field(default_factory=dict)
    # each module's array parameters, converted once (a module may be called several times)
    _arrays: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    # the output objects themselves, kept alive so that identity (``is``) means something
    _live: list[Tensor] = field(default_factory=list)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Hooks on every operator while inside; always removed on leaving."""
        handles = []
        try:
            for name, module in self.operators:
                hook = self._hook_for(name)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook_for(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            self.record(name, module, args, kwargs, output)

        return hook

    def record(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        """Record one call: its tensor arguments (bound to the forward's names), its output and
        the operator's parameters; find the earlier outputs its inputs equal."""
        kind = _kind(module)
        label = f"{type(module).__name__} {name or '<model>'}"
        if not isinstance(output, Tensor):
            raise ExportError(f"{label}: returned {type(output).__name__}, not a tensor")
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        live = {role: bound[role] for role in kind.inputs if isinstance(bound.get(role), Tensor)}
        inputs = [
            _Recorded(role, self._value(tensor, kind.integer_inputs, f"{label} input {role}"))
            for role, tensor in live.items()
        ]
        for recorded in inputs:
            recorded.source = self._source(live[recorded.role], recorded.value)
        arrays, attributes = kind.parameters(module, live)
        call = self._counts.get(id(module), 0)
        self._counts[id(module)] = call + 1
        value = self._value(output, kind.integer_output, f"{label} output")
        self.calls.append(
            _Call(
                len(self.calls),
                name,
                module,
                call,
                inputs,
                _Recorded(kind.output, value),
                {key: self._parameter(module, key, array, kind, label) for key, array in arrays.items()},
                attributes,
            )
        )
        self._live.append(output)

    def _parameter(self, module: nn.Module, key: str, array: Tensor, kind: _OperatorKind, label: str) -> Tensor:
        """An array parameter as recorded (int64 unless a real number), converted on first use."""
        if (id(module), key) not in self._arrays:
            integer = key not in kind.real_parameters
            self._arrays[id(module), key] = self._value(array, integer, f"{label} {key}")
        return self._arrays[id(module), key]

    @staticmethod
    def _value(tensor: Tensor, integer: bool, where: str) -> Tensor:
        return _integers(tensor, where) if integer else tensor.detach().clone()

    def _source(self, tensor: Tensor, value: Tensor) -> dict[str, Any] | None:
        """The latest earlier output ``value`` equals (the tensor object itself first), or equals
        minus the producer's scalar zero point; None when there is none."""
        earlier = list(reversed(range(len(self.calls))))
        identical = [i for i in earlier if self._live[i] is tensor]
        for i in identical + earlier:
            if _same(self.calls[i].output.value, value):
                return self._edge(i, False, "identity" if i in identical else "equal")
        for i in earlier:
            output, zero_point = self.calls[i].output.value, _scalar_zero_point(self.calls[i])
            if zero_point is not None and output.shape == value.shape and _same(output - zero_point, value):
                return self._edge(i, True, "equal")
        return None

    def _edge(self, index: int, subtract_zero_point: bool, match: str) -> dict[str, Any]:
        return {
            "operator": index,
            "output": self.calls[index].output.role,
            "subtract_zero_point": subtract_zero_point,
            "match": match,
        }


def _same(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def _scalar_zero_point(call: _Call) -> int | None:
    """The integer zero point of an operator whose output is codes, when it is one number."""
    zero_point = call.arrays.get("zero_point")
    if zero_point is None or zero_point.numel() != 1 or call.output.value.dtype != torch.int64:
        return None
    value = float(zero_point.reshape(()))
    return int(value) if value == round(value) else None


# -- leaving the model as it was ------------------------------------------------------------------


@contextlib.contextmanager
def _model_preserved(model: nn.Module) -> Iterator[None]:
    """Put back every plain (number, string) attribute of every module on leaving: running
    the model must not change it (e.g. an IntMatMul's ``max_abs_accumulator``)."""
    plain = (bool, int, float, str, type(None))
    saved = [
        (module, {key: value for key, value in vars(module).items() if isinstance(value, plain)})
        for module in model.modules()
    ]
    try:
        yield
    finally:
        for module, attributes in saved:
            for key, value in attributes.items():
                setattr(module, key, value)


def _run(model: nn.Module, example_input: Any) -> None:
    """``model(example_input)``: a tensor, a tuple / list of positional arguments, or a dict of
    keyword arguments."""
    with torch.no_grad():
        if isinstance(example_input, Mapping):
            model(**example_input)
        elif isinstance(example_input, tuple | list):
            model(*example_input)
        else:
            model(example_input)


def _describe_inputs(example_input: Any) -> list[dict[str, Any]]:
    """Names, dtypes and shapes of the example input's tensors."""
    if isinstance(example_input, Mapping):
        items = list(example_input.items())
    elif isinstance(example_input, tuple | list):
        items = [(str(i), value) for i, value in enumerate(example_input)]
    else:
        items = [("0", example_input)]
    return [
        {"name": name, "dtype": _dtype_name(value), "shape": list(value.shape)}
        for name, value in items
        if isinstance(value, Tensor)
    ]


# -- writing --------------------------------------------------------------------------------------


def _narrowest(low: int, high: int) -> Any:
    """The smallest signed NumPy integer dtype holding ``[low, high]``."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return np.int64


class _Writer:
    """Writes the recorded calls' tensors and parameters below ``folder`` and describes them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._parameters: dict[tuple[int, str], dict[str, Any]] = {}
        self._parameter_files: set[str] = set()
        (folder / "tensors").mkdir()
        (folder / "params").mkdir()

    def save(self, relative: str, value: Tensor, narrow: bool = False) -> dict[str, Any]:
        """Write ``value`` as ``.npy`` and return its manifest record. ``narrow``: integers are
        stored in the smallest signed dtype that holds them (int8 weights stay 1 byte each; the
        manifest gives the dtype, readers widen to int64)."""
        array = value.cpu().numpy()
        if narrow and array.dtype == np.int64 and array.size:
            array = array.astype(_narrowest(int(array.min()), int(array.max())))
        np.save(self.folder / relative, array, allow_pickle=False)
        record: dict[str, Any] = {"file": relative, "dtype": str(array.dtype), "shape": list(array.shape)}
        if np.issubdtype(array.dtype, np.integer) and array.size:
            record["range"] = [int(array.min()), int(array.max())]
        return record

    def parameter(self, call: _Call, key: str) -> dict[str, Any]:
        """A parameter's record, its file written on the module's first call only."""
        cache_key = (id(call.module), key)
        if cache_key not in self._parameters:
            relative = f"params/{_file_stem(call.name)}.{key}.npy"
            if relative in self._parameter_files:  # two names alike once made file names
                relative = f"params/{_file_stem(call.name)}.{call.index}.{key}.npy"
            self._parameter_files.add(relative)
            self._parameters[cache_key] = self.save(relative, call.arrays[key], narrow=True)
        return self._parameters[cache_key]

    def operator(self, call: _Call, width: int) -> dict[str, Any]:
        """Write one call's files; its manifest entry."""
        stem = f"tensors/{call.index:0{width}d}.{_file_stem(call.name)}"
        inputs = []
        for recorded in call.inputs:
            record = {"role": recorded.role, **self.save(f"{stem}.{recorded.role}.npy", recorded.value)}
            record["source"] = recorded.source
            inputs.append(record)
        output = {"role": call.output.role, **self.save(f"{stem}.{call.output.role}.npy", call.output.value)}
        return {
            "index": call.index,
            "name": call.name,
            "type": type(call.module).__name__,
            "call": call.call,
            "inputs": inputs,
            "outputs": [output],
            "params": {key: self.parameter(call, key) for key in call.arrays},
            "attributes": call.attributes,
        }


def _file_stem(name: str) -> str:
    """A module name usable in a file name."""
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return stem or "model"


def _edges(operators: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every input's source as one list of edges."""
    return [
        {
            "from": [item["source"]["operator"], item["source"]["output"]],
            "to": [entry["index"], item["role"]],
            "subtract_zero_point": item["source"]["subtract_zero_point"],
            "match": item["source"]["match"],
        }
        for entry in operators
        for item in entry["inputs"]
        if item["source"] is not None
    ]


def _manifest(model: nn.Module, example_input: Any, operators: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest: format, provenance, the model's inputs, the operator calls and their edges."""
    model_class = type(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": f"{model_class.__module__}.{model_class.__qualname__}",
        "torch_version": torch.__version__,
        "quantwire_version": quantwire.__version__,
        "rounding": ROUNDING,
        "model_inputs": _describe_inputs(example_input),
        "operators": operators,
        "edges": _edges(operators),
    }


def _write(folder: Path, model: nn.Module, example_input: Any, calls: list[_Call], progress: bool) -> None:
    """Every call's files, then the manifest, into ``folder`` (which must not exist yet)."""
    folder.mkdir()
    writer = _Writer(folder)
    width = max(4, len(str(len(calls) - 1)))
    with tqdm(calls, desc="export_integer", unit="op", disable=not (progress and config.PROGRESS), leave=False) as bar:
        operators = [writer.operator(call, width) for call in bar]
    manifest = _manifest(model, example_input, operators)
    with open(folder / MANIFEST, "w", encoding="utf-8") as stream:
        json.dump(manifest, stream, indent=1)
        stream.write("\n")


def _publish(temporary: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the complete ``temporary`` folder to ``out_dir``; an existing ``out_dir`` is
    replaced (``overwrite``) only now, and put back if the rename fails."""
    if not out_dir.exists():
        os.replace(temporary, out_dir)
        return
    if not overwrite:
        raise ExportError(f"{out_dir} appeared while exporting; pass overwrite=True to replace it")
    previous = temporary_sibling(out_dir, ".old")
    os.replace(out_dir, previous)
    try:
        os.replace(temporary, out_dir)
    except BaseException:
        os.replace(previous, out_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    """Before running anything: refuse an existing ``out_dir`` unless ``overwrite`` (and then
    only a real folder, not a file or a link), and a parent that is not an existing folder."""
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ExportError(f"{out_dir} already exists; pass overwrite=True to replace it")
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise ExportError(f"{out_dir} exists and is not a folder; refusing to replace it")
    if not out_dir.parent.is_dir():
        raise ExportError(f"can not export to {out_dir}: its parent {out_dir.parent} is not an existing folder")


def _check_finite_example(example_input: Any) -> None:
    """Refuse NaN or Inf in ``example_input`` (:class:`QuantInputError`): an integer grid
    clamps Inf silently and turns NaN into an error far from its cause."""
    for index, tensor in enumerate(torch.utils._pytree.tree_leaves(example_input)):
        if isinstance(tensor, Tensor) and (bad := non_finite_kind(tensor)) is not None:
            raise QuantInputError(f"export_integer: example_input tensor {index} holds {bad} values")


def export_integer(
    imodel: nn.Module, example_input: Any, out_dir: str | os.PathLike, overwrite: bool = False, progress: bool = True
) -> Path:
    """Run the integer model ``imodel`` on ``example_input`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments) and export every backend operator call it makes
    into the folder ``out_dir`` (see the module docstring for its layout); returns its path.

    Raises :class:`ExportError` when ``out_dir`` exists (unless ``overwrite=True``: the old
    folder is replaced once the new one is complete), can not be written, when ``imodel`` has
    no backend operator or runs none, or when an operator handles non-integers where integers
    belong. Whatever happens, no partial folder is left and ``imodel`` is unchanged (hooks
    removed, attributes such as accumulator statistics restored). ``progress``: a tqdm bar
    while writing (also off when ``quantwire.config.PROGRESS`` is)."""
    out_dir = Path(out_dir).absolute()
    _check_destination(out_dir, overwrite)
    _check_finite_example(example_input)
    operators = [(name, module) for name, module in imodel.named_modules() if isinstance(module, OPERATOR_TYPES)]
    if not operators:
        raise ExportError(
            f"{type(imodel).__name__} has no integer backend operator (Quantize, IntMatMul, MulShift, MulQuant); "
            "convert it with quantwire.backend.integer.to_integer first"
        )
    recorder = _Recorder(operators)
    with _model_preserved(imodel), recorder.attached():
        _run(imodel, example_input)
    if not recorder.calls:
        raise ExportError(f"none of the {len(operators)} backend operators of {type(imodel).__name__} ran")
    temporary = temporary_sibling(out_dir)
    try:
        _write(temporary, imodel, example_input, recorder.calls, progress)
        _publish(temporary, out_dir, overwrite)
    except OSError as error:
        raise ExportError(f"can not write the export to {out_dir}: {error}") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return out_dir
