"""The registry of conversion handlers: one small function per module type.

A handler takes a float module and a :class:`Conversion` (the module's name and resolved
settings) and returns the module to put in its place, or None to leave it as it is. Handlers
are found along the module class's method resolution order, so a subclass of ``nn.Linear``
uses the ``nn.Linear`` handler unless it has its own. Types can be registered by class or by
dotted name (``"timm.layers.attention.Attention"``), so that a handler never imports a
library the model does not use; the handlers for torchvision, timm and transformers are
imported the first time a model holds a class from that library.

Register your own::

    @quantwire.convert.register_handler(MyBlock, recurse=True)
    def convert_my_block(block: MyBlock, conversion: Conversion) -> nn.Module | None:
        block.residual_add = conversion.residual_add()
        block.__class__ = QuantMyBlock
        return block
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from quantwire.convert.config import LayerSettings, QuantConfig
from quantwire.convert.quantizers import quantizer_for
from quantwire.errors import QuantConfigError
from quantwire.inject import ExtendedInjector

__all__ = ["Conversion", "Handler", "find_handler", "register_handler", "registered_types", "unhandled_base"]


@dataclass
class Conversion:
    """What a handler knows about the module it converts."""

    name: str
    """Qualified name of the module in the model (``"layer1.0.conv1"``)."""
    settings: LayerSettings
    """The config's settings for this module, overrides applied."""
    config: QuantConfig
    """The whole config (for handlers that build children themselves)."""
    root: nn.Module
    """The model being converted (the copy, not the user's float model)."""

    def quantizer(self, kind: str, tensor: str | None = None, **defaults: Any) -> type[ExtendedInjector] | None:
        """The quantizer for ``kind`` (``"weight"``, ``"input"``, ``"attention"``, ...) in this
        module, or None when the config does not quantize it. ``defaults`` fill fields the
        settings leave unset (``signed=False`` for the output of a ReLU)."""
        settings = getattr(self.settings, kind)
        if settings is None:
            return None
        unset = {key: value for key, value in defaults.items() if getattr(settings, key) is None}
        if unset:
            settings = settings.merged(unset)
        where = f"{self.name or type(self.root).__name__}" + (f".{tensor}" if tensor else "")
        return quantizer_for(kind, settings, where)

    def wbiol_quantizers(self, with_input: bool = True) -> dict[str, Any]:
        """``weight_quant``/``input_quant``/``output_quant``/``bias_quant`` keyword arguments
        for a layer with a weight (Linear, Conv), from the weight/input/output/bias kinds."""
        kwargs = {
            "weight_quant": self.quantizer("weight", "weight"),
            "input_quant": self.quantizer("input", "input") if with_input else None,
            "output_quant": self.quantizer("output", "output"),
            "bias_quant": self.quantizer("bias", "bias"),
        }
        if kwargs["bias_quant"] is not None and kwargs["input_quant"] is None:
            raise QuantConfigError(
                f"{self.name}: an integer bias (bias={self.settings.bias}) is quantized with input scale x weight "
                "scale, so the layer's input must be quantized too (set `input`, or bias: null)"
            )
        return kwargs

    def residual_add(self) -> nn.Module | None:
        """A :class:`~quantwire.nn.QuantEltwiseAdd` with the ``residual`` quantizer shared by
        both operands, or None when residual adds stay float."""
        from quantwire.nn import QuantEltwiseAdd

        quant = self.quantizer("residual", "residual")
        return None if quant is None else QuantEltwiseAdd(input_quant=quant)


Handler = Callable[[nn.Module, Conversion], "nn.Module | None"]


@dataclass(frozen=True)
class _Entry:
    handler: Handler
    recurse: bool


_HANDLERS: dict[Any, _Entry] = {}
_PLUGINS = {
    "torchvision": "quantwire.convert.handlers.torchvision",
    "timm": "quantwire.convert.handlers.timm",
    "transformers": "quantwire.convert.handlers.transformers",
}
_LOADED_PLUGINS: set[str] = set()


def register_handler(*types: type | str, recurse: bool = False) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``types`` (classes or dotted names).

    ``recurse=True``: after the handler ran, the children of what it returned are converted
    too (for blocks that keep their float submodules, e.g. a residual block whose convs the
    ``nn.Conv2d`` handler converts); False: what the handler returned is final.
    A later registration for the same type replaces the earlier one.
    """
    if not types:
        raise QuantConfigError("register_handler needs at least one module type")

    def decorator(handler: Handler) -> Handler:
        for module_type in types:
            if not isinstance(module_type, type | str):
                raise QuantConfigError(f"register_handler: {module_type!r} is neither a class nor a dotted class name")
            _HANDLERS[module_type] = _Entry(handler, recurse)
        return handler

    return decorator


def registered_types() -> list[str]:
    """The dotted names of the types with a handler (after loading every plugin that imports)."""
    for package in _PLUGINS:
        _load_plugin(package)
    return sorted(t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}" for t in _HANDLERS)


def _load_plugin(package: str) -> None:
    if package in _LOADED_PLUGINS or package not in _PLUGINS:
        return
    _LOADED_PLUGINS.add(package)
    if importlib.util.find_spec(package) is None or importlib.util.find_spec(_PLUGINS[package]) is None:
        return
    importlib.import_module(_PLUGINS[package])


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def find_handler(module: nn.Module) -> tuple[Handler, bool] | None:
    """The handler of ``module``'s class (or its nearest registered base) and whether to
    recurse into what it returns; None when no handler applies.

    A subclass that overrides ``forward`` computes something its base's handler does not know
    about (an OPT positional embedding is an ``nn.Embedding`` with its own forward): it gets
    no handler (its children are still converted; :func:`unhandled_base` names the base for
    the warning ``quantize_model`` gives) unless it is registered itself."""
    for cls in type(module).__mro__:
        _load_plugin(cls.__module__.partition(".")[0])
        entry = _HANDLERS.get(cls) or _HANDLERS.get(_dotted(cls))
        if entry is None:
            continue
        if cls is not type(module) and _overrides_forward(type(module), cls):
            return None
        return entry.handler, entry.recurse
    return None


def unhandled_base(module: nn.Module) -> type | None:
    """The registered base class ``module`` was refused a handler for (its class overrides
    ``forward``), or None."""
    for cls in type(module).__mro__[1:]:
        if cls in _HANDLERS or _dotted(cls) in _HANDLERS:
            return cls if _overrides_forward(type(module), cls) else None
    return None


def _overrides_forward(cls: type, base: type) -> bool:
    """Whether a class between ``cls`` and ``base`` (``base`` excluded) defines ``forward``."""
    for klass in cls.__mro__:
        if klass is base:
            return False
        if "forward" in klass.__dict__:
            return True
    return False
