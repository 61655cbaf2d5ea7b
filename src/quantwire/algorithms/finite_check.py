"""Opt-in NaN/Inf detection on every quantizer of a model while it runs.

Checking each activation for NaN/Inf costs a device synchronisation per quantizer, so quant
layers never do it on their own (the training and inference hot paths stay sync-free);
quantwire checks where data enters its own loops (calibration, PTQ algorithms, ``to_integer``,
export, learned-scale initialisation, ``quantize_model``, ``load_state_dict``). To find where a
NaN first appears while training or evaluating, run the model inside
:func:`checking_finite`::

    with quantwire.algorithms.checking_finite(model):
        loss = criterion(model(x), y)

The first quantizer that receives or produces NaN/Inf raises
:class:`~quantwire.errors.QuantInputError` naming it (``features.0.input_quant
(QuantConv2d.input_quant=Int8ActPerTensorFloat)``), whether the value it received or the
quantized value, scale or zero point it computed is not finite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from quantwire.core.utils import non_finite_kind
from quantwire.errors import QuantInputError
from quantwire.proxy import QuantProxyFromInjector

__all__ = ["checking_finite"]

# The core modules' output tuples, in order (integer and minifloat quantizers start alike).
_OUTPUT_NAMES = ("value", "scale", "zero point", "bit width")


def _raise_if_non_finite(tensors: Any, where: str, what: Callable[[int], str]) -> None:
    for index, tensor in enumerate(tensors if isinstance(tensors, tuple | list) else (tensors,)):
        if isinstance(tensor, Tensor) and (bad := non_finite_kind(tensor)) is not None:
            raise QuantInputError(f"{where}: {what(index)} holds {bad} values (shape {tuple(tensor.shape)})")


def _output_name(index: int) -> str:
    return f"its quantized {_OUTPUT_NAMES[index]}" if index < len(_OUTPUT_NAMES) else f"its output {index}"


def _install(proxy: QuantProxyFromInjector, name: str) -> list[Callable[[], None]]:
    """Hooks on ``proxy``'s core module checking what it receives and returns; their removers."""
    where = f"{name} ({proxy.describe()})"

    def check_input(_module: nn.Module, args: tuple) -> None:
        _raise_if_non_finite(args, where, lambda index: "the tensor it received" if index == 0 else f"input {index}")

    def check_output(_module: nn.Module, _args: tuple, output: Any) -> None:
        _raise_if_non_finite(output, where, _output_name)

    tensor_quant = proxy.tensor_quant
    return [
        tensor_quant.register_forward_pre_hook(check_input).remove,
        tensor_quant.register_forward_hook(check_output).remove,
    ]


@contextlib.contextmanager
def checking_finite(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context, every quantizer of ``model`` raises
    :class:`~quantwire.errors.QuantInputError` naming itself (its qualified name in ``model``
    and its declaration) when it receives or computes NaN or Inf. Yields ``model``; on exit the
    checks are removed (a quantizer rebuilt inside the context, by ``load_state_dict`` or
    ``init_tensor_quant``, is not checked). The model's tensors and modes are not touched."""
    removers: list[Callable[[], None]] = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, QuantProxyFromInjector) and module.tensor_quant is not None:
                removers.extend(_install(module, name or type(model).__name__))
        yield model
    finally:
        for remove in removers:
            remove()
