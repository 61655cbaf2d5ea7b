"""Fake-quant checkpoints: save a quantized model, rebuild it from its float architecture.

A checkpoint holds the model's ``state_dict`` plus, as metadata, the :class:`QuantConfig` it was
converted with and the declaration of every quantizer that differs from what that config
builds (an algorithm re-declares quantizers: GPTQ freezes a scale, AdaRound adds learned
rounding, pruning adds a mask). :func:`load_quantized` converts the float architecture with the
saved config, re-declares those quantizers, adapts quantizer tensor shapes to the checkpoint
(a per-token scale calibrated for 197 tokens, Torch2Chip's ``reshape_quantizer``) and loads the
tensors strictly: the result computes exactly what the saved model computed.

Files are ``.safetensors`` (tensors + JSON metadata) or ``.pt`` (loaded with
``torch.load(weights_only=True)``: no code is ever unpickled), written atomically.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantwire.convert.config import QuantConfig
from quantwire.convert.quantize import CONFIG_ATTRIBUTE, as_config, quantize_model
from quantwire.convert.state_check import check_keys_fit
from quantwire.errors import CheckpointError, QuantwireError
from quantwire.files import atomic_write
from quantwire.inject import ExtendedInjector, compose
from quantwire.inject import value as injector_value
from quantwire.proxy import QuantProxyFromInjector, WeightQuantProxyFromInjector
from quantwire.proxy.base import adapting_quantizer_shapes

__all__ = ["CheckpointError", "load_quantized", "read_checkpoint", "save_quantized"]

FORMAT = "quantwire-fakequant/1"


# -- quantizer declarations as JSON ---------------------------------------------------------------


def _class_ref(cls: type) -> dict[str, str]:
    ref = f"{cls.__module__}:{cls.__qualname__}"
    if _import_ref(ref, "") is not cls:
        raise CheckpointError(
            f"{cls.__qualname__} can not be found again as {ref!r}: define quantizers and the classes they "
            "use at module level so that a checkpoint can name them"
        )
    return {"class": ref}


def _function_ref(function: Any) -> str:
    ref = f"{function.__module__}:{function.__qualname__}"
    if _import_ref(ref, "") is not function:
        raise CheckpointError(
            f"the @value function {function.__qualname__} can not be found again as {ref!r}: "
            "a quantizer attribute set with let(...) must be a module-level function to be saved"
        )
    return ref


def _import_ref(ref: str, where: str) -> Any:
    module_name, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part) if not isinstance(obj, type) else obj.__dict__[part]
    except (ImportError, AttributeError, KeyError) as error:
        if not where:
            return None
        raise CheckpointError(f"{where}: the checkpoint names {ref!r}, which can not be imported ({error})") from error
    return obj


def encode_quantizer(injector: type) -> dict[str, Any]:
    """A JSON-able description of a quantizer declaration: a class by reference, a ``let``
    as its base and overrides, a :func:`~quantwire.inject.compose` as its parts. Tensors among
    the overrides are recorded by shape and dtype (their values are in the ``state_dict``)."""
    if "__let_base__" in injector.__dict__:
        return {"let": encode_quantizer(injector.__let_base__), "with": _encode(injector.__let_overrides__)}
    if "__compose_parts__" in injector.__dict__:
        parts, name = injector.__compose_parts__
        return {"compose": [encode_quantizer(part) for part in parts], "name": name}
    return _class_ref(injector)


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, type) and issubclass(value, ExtendedInjector):
        return {"injector": encode_quantizer(value)}
    if isinstance(value, type):
        return _class_ref(value)
    if isinstance(value, Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple | list):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v) for v in value]}
    if isinstance(value, Mapping):
        return {"dict": {str(k): _encode(v) for k, v in value.items()}}
    function = getattr(value, "__function__", None)  # a @value declaration
    if callable(function):
        return {"value": _function_ref(function)}
    raise CheckpointError(f"a quantizer attribute of type {type(value).__name__} ({value!r}) can not be saved")


def decode_quantizer(data: Mapping[str, Any], where: str) -> type:
    """The quantizer declaration :func:`encode_quantizer` described."""
    if "let" in data:
        return decode_quantizer(data["let"], where).let(**_decode(data["with"], where))
    if "compose" in data:
        return compose(*(decode_quantizer(part, where) for part in data["compose"]), name=data["name"])
    return _import_ref(data["class"], where)


def _decode(value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        return value
    if "injector" in value:
        return decode_quantizer(value["injector"], where)
    if "class" in value:
        return _import_ref(value["class"], where)
    if "value" in value:
        return injector_value(_import_ref(value["value"], where))
    if "tensor" in value:
        # A placeholder of the saved shape (ones: a valid scale); the state dict holds the values.
        return torch.ones(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if "tuple" in value:
        return tuple(_decode(v, where) for v in value["tuple"])
    if "list" in value:
        return [_decode(v, where) for v in value["list"]]
    if "dict" in value:
        return {k: _decode(v, where) for k, v in value["dict"].items()}
    raise CheckpointError(f"{where}: unreadable quantizer attribute {value!r}")


def _proxies(model: nn.Module) -> dict[str, QuantProxyFromInjector]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantProxyFromInjector)}


def quantizer_declarations(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every proxy's quantizer declaration, by the proxy's qualified name."""
    return {name: encode_quantizer(proxy.quant_injector) for name, proxy in _proxies(model).items()}


# -- saving ---------------------------------------------------------------------------------------


def save_quantized(model: nn.Module, path: str | os.PathLike, config: QuantConfig | None = None) -> Path:
    """Write ``model`` (converted by :func:`~quantwire.quantize_model`, then calibrated,
    trained or optimised) to ``path`` (``.safetensors`` or ``.pt``), atomically: a crash
    leaves the previous file or the new one, never half of one. ``config`` defaults to the
    one the model was converted with. Returns the path written."""
    path = Path(path)
    config = config or getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise CheckpointError(
            f"{type(model).__name__} was not converted by quantize_model: pass the config it was built with"
        )
    metadata = {
        "format": FORMAT,
        "config": as_config(config).to_dict(),
        "quantizers": quantizer_declarations(model),
    }
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise CheckpointError(f"{path}: a quantwire checkpoint is a .safetensors or .pt file")
    _write_atomically(path, suffix, state, metadata)
    return path


def _write_atomically(path: Path, suffix: str, state: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Serialise to a temporary file next to ``path``, then rename it onto ``path``; any failure
    (a full disk, a serializer error) is a :class:`CheckpointError` and leaves ``path`` as it was."""
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: the folder {str(path.parent)!r} does not exist")
    try:
        atomic_write(path, lambda temporary: _write(temporary, suffix, state, metadata))
    except QuantwireError:
        raise
    except Exception as error:  # OSError, safetensors' and torch's own error types
        raise CheckpointError(f"{path}: can not write the checkpoint: {error}") from error


def _write(target: Path, suffix: str, state: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Write ``state`` and ``metadata`` to ``target`` in the format ``suffix`` names."""
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors sharing memory: give each key its own copy.
        save_file({k: v.clone() for k, v in state.items()}, str(target), metadata={"quantwire": json.dumps(metadata)})
    else:
        torch.save({"state_dict": state, "quantwire": json.dumps(metadata)}, target)


# -- loading --------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The ``state_dict`` and quantwire metadata of a checkpoint (no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("quantwire")
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or "state_dict" not in payload:
                raise CheckpointError(f"{path}: not a quantwire checkpoint (no state_dict)")
            state, raw = payload["state_dict"], payload.get("quantwire")
    except CheckpointError:
        raise
    except Exception as error:  # safetensors and torch.load raise many types on bad files
        raise CheckpointError(f"{path}: can not read the checkpoint: {error}") from error
    if raw is None:
        raise CheckpointError(f"{path}: no quantwire metadata (was it written by save_quantized?)")
    return state, _parse_metadata(path, raw)


def _parse_metadata(path: Path, raw: Any) -> dict[str, Any]:
    """The checkpoint's metadata from its JSON text, checked to be of this format."""
    try:
        metadata = json.loads(raw)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the quantwire metadata is not JSON ({error})") from error
    found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
    if found != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r} (expected {FORMAT!r})")
    return metadata


def load_quantized(
    float_model: nn.Module, path: str | os.PathLike, config: QuantConfig | Mapping[str, Any] | str | None = None
) -> nn.Module:
    """The quantized model saved at ``path``, rebuilt on ``float_model``'s architecture (its
    weights do not matter; the float model is not modified). ``config`` overrides the saved
    one. Raises :class:`CheckpointError` when the checkpoint does not fit the architecture
    (missing, unexpected or mis-shaped keys, named)."""
    state, metadata = read_checkpoint(path)
    config = as_config(config) if config is not None else QuantConfig.from_dict(metadata["config"])
    qmodel = quantize_model(float_model, config)
    _redeclare_quantizers(qmodel, metadata.get("quantizers", {}), f"{path} does not fit {type(float_model).__name__}")
    check_keys_fit(qmodel, state, f"{path} does not fit {type(float_model).__name__}")
    try:
        with adapting_quantizer_shapes():
            qmodel.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError, QuantwireError) as error:
        # ValueError/TypeError: a mis-shaped step counter (``_extra_state``) reaches ``int()``.
        raise CheckpointError(f"{path} does not fit {type(float_model).__name__}: {error}") from error
    _check_weight_quantizers(qmodel, f"{path} does not fit {type(float_model).__name__}")
    return qmodel


def _check_weight_quantizers(model: nn.Module, where: str) -> None:
    """Quantize every weight once, in eval mode (no step counter moves): a quantizer tensor
    whose saved shape does not fit its weight fails here, named, instead of at the first forward."""
    for name, proxy in _proxies(model).items():
        if not isinstance(proxy, WeightQuantProxyFromInjector) or proxy.disable_quant:
            continue
        training = proxy.training
        proxy.eval()
        try:
            with torch.no_grad():
                proxy.quant_output()
        except (RuntimeError, QuantwireError) as error:
            message = f"{where}: {name} ({proxy.describe()}) can not quantize its weight: {error}"
            raise CheckpointError(message) from error
        finally:
            proxy.train(training)


def _redeclare_quantizers(model: nn.Module, saved: Mapping[str, Any], where: str) -> None:
    proxies = _proxies(model)
    missing = sorted(set(saved) - set(proxies))
    if missing:
        raise CheckpointError(
            f"{where}: the checkpoint has quantizers the converted model lacks: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    for name, proxy in proxies.items():
        if name not in saved or saved[name] == encode_quantizer(proxy.quant_injector):
            continue
        proxy.quant_injector = decode_quantizer(saved[name], f"{where}: {name}")
        proxy.init_tensor_quant()
