"""``quantize_model``: a float model in, a new model of quantwire layers out."""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from quantwire.convert.config import QuantConfig, preset
from quantwire.convert.registry import Conversion, find_handler, unhandled_base
from quantwire.convert.state_check import check_state_dict_fits
from quantwire.core.utils import non_finite_kind
from quantwire.errors import QuantConfigError, QuantInputError, QuantwireError
from quantwire.nn.base import QuantLayer
from quantwire.proxy import QuantProxyFromInjector

__all__ = ["ConvertedModule", "as_config", "quantize_model"]

CONFIG_ATTRIBUTE = "quantwire_config"
"""The attribute of a converted model that holds the config it was converted with."""


class ConvertedModule:
    """Marker base of the quantized twins that handlers swap in for float blocks (a ResNet
    ``BasicBlock`` becomes a ``QuantBasicBlock``): conversion does not convert them again."""


def as_config(config: QuantConfig | Mapping[str, Any] | str | Path | None) -> QuantConfig:
    """A :class:`QuantConfig` from a config, a mapping, a preset name or a ``.yaml``/``.json``
    path (None: the default W8A8 config)."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return QuantConfig.from_dict(config)
    is_file_name = isinstance(config, str) and Path(config).suffix.lower() in (".yaml", ".yml", ".json")
    if isinstance(config, Path) or is_file_name:
        return QuantConfig.from_file(config)
    if isinstance(config, str):
        return preset(config)
    raise QuantConfigError(
        f"a quantization config is a QuantConfig, a mapping, a preset name or a file; got {config!r}"
    )


def quantize_model(
    model: nn.Module,
    config: QuantConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """A quantized copy of ``model``: every module a handler knows (``nn.Linear``, ``nn.Conv2d``,
    residual blocks, attention, ...) replaced by its quantwire twin with the float weights
    copied, quantized as ``config`` says (a :class:`QuantConfig`, a mapping, a preset name such
    as ``"w4a8"`` or a YAML/JSON file; default W8A8). The float model is left untouched unless
    ``inplace=True``. The returned model is in the training mode ``model`` was in; its
    activation quantizers still have to be calibrated (:func:`quantwire.calibrate`) or trained.

    Raises :class:`~quantwire.errors.QuantConfigError` for a config that does not fit the
    model (an override that matches no layer, a setting a layer can not take).
    """
    config = as_config(config)
    if not isinstance(model, nn.Module):
        raise QuantConfigError(f"quantize_model takes a torch.nn.Module, got {type(model).__name__}")
    _check_overrides_match(model, config)
    _check_finite_weights(model, config)
    training = model.training
    if not inplace:
        qmodel = _convert_model(copy.deepcopy(model), config)
    else:
        # A failure half-way must leave the caller's model as it was: put its children (and,
        # when BatchNorms were folded into its weights, its tensors) back.
        layout = _child_layout(model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.fold_bn else None
        try:
            qmodel = _convert_model(model, config)
        except BaseException:
            for parent, child_name, child in layout:
                setattr(parent, child_name, child)
            if state is not None:
                model.load_state_dict(state)
            raise
    qmodel.register_load_state_dict_pre_hook(check_state_dict_fits)
    qmodel.train(training)
    object.__setattr__(qmodel, CONFIG_ATTRIBUTE, config)
    return qmodel


def _convert_model(qmodel: nn.Module, config: QuantConfig) -> nn.Module:
    """Fold BatchNorms if asked, then convert ``qmodel`` itself: the converted model."""
    if config.fold_bn:
        from quantwire.convert.fold_bn import fold_batch_norms

        fold_batch_norms(qmodel, config)
    tied = _tied_parameters(qmodel)
    left_float: dict[str, list[str]] = {}
    qmodel = _convert(qmodel, "", qmodel, config, left_float) or qmodel
    _warn_left_float(left_float)
    _retie_parameters(qmodel, tied)
    return qmodel


def _child_layout(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, child)`` for every parent-child link in ``model``."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]


def _convert(
    module: nn.Module, name: str, root: nn.Module, config: QuantConfig, left_float: dict[str, list[str]]
) -> nn.Module | None:
    """Convert ``module`` (called ``name``) and what lies inside it; the replacement, or None
    when the module itself stays (its children may have changed)."""
    if isinstance(module, QuantLayer | QuantProxyFromInjector | ConvertedModule):
        return None
    settings = config.for_layer(name, module)
    if settings.skip:
        return None
    found = find_handler(module)
    if found is None and (base := unhandled_base(module)) is not None:
        described = f"{type(module).__module__}.{type(module).__qualname__} (subclasses {base.__qualname__})"
        left_float.setdefault(described, []).append(name)
    replacement = None
    recurse = True
    if found is not None:
        handler, recurse = found
        replacement = _run_handler(handler, module, Conversion(name, settings, config, root))
        if replacement is None:
            recurse = True
    if recurse:
        _convert_children(replacement if replacement is not None else module, name, root, config, left_float)
    return replacement


def _run_handler(handler: Any, module: nn.Module, conversion: Conversion) -> nn.Module | None:
    """``handler(module, conversion)``; a quantwire error it raises names the layer it was converting
    (``layer1.0.conv1: QuantConv2d.weight_quant=...: bit_width must be ...``), once."""
    try:
        return handler(module, conversion)
    except QuantwireError as error:
        if getattr(error, "quantwire_layer", None) is not None:
            raise
        named = type(error)(f"{conversion.name or type(module).__name__}: {error}")
        named.quantwire_layer = conversion.name
        raise named from error


def _convert_children(
    module: nn.Module, prefix: str, root: nn.Module, config: QuantConfig, left_float: dict[str, list[str]]
) -> None:
    for child_name, child in list(module.named_children()):
        qualified = f"{prefix}.{child_name}" if prefix else child_name
        replacement = _convert(child, qualified, root, config, left_float)
        if replacement is not None and replacement is not child:
            setattr(module, child_name, replacement)


def _warn_left_float(left_float: dict[str, list[str]]) -> None:
    """One warning for the layers left float because their class overrides ``forward``."""
    if not left_float:
        return
    lines = [
        f"{described}: {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
        for described, names in left_float.items()
    ]
    warnings.warn(
        "left float, their class overrides forward (register a handler for it to quantize it): " + "; ".join(lines),
        stacklevel=3,
    )


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of qualified names under which one parameter appears (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            names.setdefault(id(param), [])
            if full not in names[id(param)]:
                names[id(param)].append(full)
    return [group for group in names.values() if len(group) > 1]


def _retie_parameters(qmodel: nn.Module, tied: list[list[str]]) -> None:
    """Conversion copies weights into new layers; give the layers of a tied group the first
    one's parameter again (so that QAT keeps them tied) and rebuild their quantizers."""
    for group in tied:
        owners = []
        for full in group:
            module_name, _, param_name = full.rpartition(".")
            try:
                module = qmodel.get_submodule(module_name)
            except AttributeError:
                break
            if not isinstance(getattr(module, param_name, None), nn.Parameter):
                break
            owners.append((module, param_name))
        if len(owners) != len(group):
            continue
        shared = getattr(*owners[0])
        if any(getattr(m, p).shape != shared.shape for m, p in owners):
            continue
        for module, param_name in owners[1:]:
            setattr(module, param_name, shared)
            if isinstance(module, QuantLayer):
                module.init_quantizers()


def _check_finite_weights(model: nn.Module, config: QuantConfig) -> None:
    """Refuse NaN or Inf in the parameters of the layers conversion quantizes, naming the first
    such tensor: a quantizer built on them would give NaN scales silently."""
    for name, module in model.named_modules():
        if find_handler(module) is None or config.for_layer(name, module).skip:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            bad = non_finite_kind(param.detach())
            if bad is not None:
                qualified = f"{name}.{param_name}" if name else param_name
                raise QuantInputError(
                    f"quantize_model: {qualified} ({type(module).__name__}) holds {bad} values; "
                    "fix or re-initialise the float weights first"
                )


def _check_overrides_match(model: nn.Module, config: QuantConfig) -> None:
    """Every override must name at least one layer of the model: a typo in a pattern would
    otherwise quietly quantize the layer it meant to protect."""
    modules = [(name, module) for name, module in model.named_modules() if name]
    for override in config.overrides:
        if any(override.matches(name, module) for name, module in modules):
            continue
        what = []
        if override.name is not None:
            what.append(f"name={override.name!r}")
        if override.type is not None:
            what.append(f"type={override.layer_type().__qualname__}")
        names = [name for name, _ in modules]
        close = difflib.get_close_matches(override.name or "", names, n=3) if override.name else []
        hint = f"; close names: {', '.join(close)}" if close else f"; names look like: {', '.join(names[:5])}"
        raise QuantConfigError(f"override {' '.join(what)} matches no layer of {type(model).__name__}{hint}")
