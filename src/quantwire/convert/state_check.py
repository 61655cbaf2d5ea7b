"""Checking a ``state_dict`` against a converted model before any of it is loaded.

``torch.nn.Module.load_state_dict`` copies every tensor that fits and only then reports the
ones that did not: a checkpoint with mis-shaped tensors leaves the model half overwritten (and
its quantizers rebuilt from the half-loaded weights). :func:`quantize_model` registers
:func:`check_state_dict_fits` as a load pre-hook on the model it returns, so that a state dict
with mis-shaped keys or NaN/Inf tensors raises before the first tensor is copied and the model
keeps what it had.

Missing and unexpected keys are not checked here: they are errors only for a strict load, and
PyTorch hands every pre-hook ``strict=True`` whatever the caller asked, so a hook can not tell a
strict load from a non-strict one (loading a float checkpoint with ``strict=False`` is normal).
:func:`quantwire.load_quantized` checks them before loading; a raw strict ``load_state_dict``
with missing or unexpected keys raises PyTorch's error after loading the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from quantwire import config
from quantwire.core.utils import non_finite_kind
from quantwire.errors import CheckpointError, QuantInputError
from quantwire.proxy import base as proxy_base
from quantwire.proxy.base import QuantProxyFromInjector

__all__ = ["check_keys_fit", "check_state_dict_fits"]

# Keys below these parts of a proxy belong to its quantizer: a float checkpoint may lack them
# (``config.IGNORE_MISSING_KEYS``) and :func:`adapting_quantizer_shapes` lets their shapes differ.
_QUANTIZER_PARTS = ("tensor_quant.", "pruning.")


def _quantizer_prefixes(model: nn.Module, prefix: str) -> tuple[str, ...]:
    """The state-dict prefixes of every proxy's quantizer tensors (``fc.weight_quant.tensor_quant.``)."""
    return tuple(
        f"{prefix}{name}.{part}" if name else f"{prefix}{part}"
        for name, module in model.named_modules()
        if isinstance(module, QuantProxyFromInjector)
        for part in _QUANTIZER_PARTS
    )


def _adapting_shapes() -> bool:
    """Whether :func:`~quantwire.proxy.base.adapting_quantizer_shapes` is active (quantizer
    tensors then take the saved shapes)."""
    return bool(proxy_base._ADAPT_SHAPES[0])


def _describe(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def check_state_dict_fits(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: raise :class:`CheckpointError` naming the keys whose shapes do not fit
    (quantizer tensors may differ under :func:`adapting_quantizer_shapes`), and
    :class:`QuantInputError` naming the key when a floating-point tensor holds NaN or Inf.
    ``strict`` is ignored: PyTorch always passes True (see the module docstring)."""
    name = type(module).__name__
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, Tensor) and (bad := non_finite_kind(value)) is not None:
            raise QuantInputError(f"load_state_dict into {name}: {key} holds {bad} values; nothing was loaded")
    expected = module.state_dict(prefix=prefix, keep_vars=True)
    quantizer = _quantizer_prefixes(module, prefix)
    adapting = _adapting_shapes()
    mis_shaped = [
        f"{key} (checkpoint {tuple(state_dict[key].shape)}, model {tuple(tensor.shape)})"
        for key, tensor in expected.items()
        if key in state_dict
        and isinstance(tensor, Tensor)
        and isinstance(state_dict[key], Tensor)
        and state_dict[key].shape != tensor.shape
        and not (adapting and key.startswith(quantizer) and not key.endswith("_extra_state"))
    ]
    if mis_shaped:
        raise CheckpointError(
            f"the state dict does not fit {name}; nothing was loaded: mis-shaped keys: {_describe(mis_shaped)}"
        )


def check_keys_fit(model: nn.Module, state_dict: Mapping[str, Any], where: str) -> None:
    """Raise :class:`CheckpointError` (prefixed with ``where``) naming the keys a strict load of
    ``state_dict`` into ``model`` would find missing or unexpected (quantizer keys a float
    checkpoint lacks are forgiven under ``config.IGNORE_MISSING_KEYS``); for callers that know
    the load is strict (:func:`quantwire.load_quantized`)."""
    expected = model.state_dict(keep_vars=True)
    missing = [key for key in expected if key not in state_dict]
    if config.IGNORE_MISSING_KEYS:
        quantizer = _quantizer_prefixes(model, "")
        missing = [key for key in missing if not key.startswith(quantizer)]
    unexpected = [key for key in state_dict if key not in expected]
    problems = [
        f"{what}: {_describe(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{where}; nothing was loaded: {'; '.join(problems)}")
