"""What names an injector could ever use: for catching typos in keyword arguments."""

from __future__ import annotations

import inspect
import types
from typing import Any

from quantwire.inject._injector import _signature_arguments, _ThisSpecType


def wireable_names(injector: type) -> frozenset[str]:
    """Every name an attribute of ``injector`` could be wired from.

    That is: the injector's own attributes; the parameters of every constructor and ``@value``
    function it declares; the names those functions reference (``this.per_channel_shape``
    makes ``per_channel_shape`` usable); and, recursively, the constructor parameters of the
    classes those functions may return. Passing any other name to a quantizer cannot change
    anything, so a layer reports it as a mistake.
    """
    names: set[str] = set(injector.__dependencies__)
    visited: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in visited:
            return
        visited.add(id(obj))
        if inspect.isclass(obj):
            try:
                names.update(name for name, _ in _signature_arguments(obj))
            except (TypeError, ValueError):
                return
        elif inspect.isfunction(obj):
            names.update(name for name, _ in _signature_arguments(obj))
            visit_code(obj.__code__, obj.__globals__)

    def visit_code(code: types.CodeType, scope: dict[str, Any]) -> None:
        names.update(code.co_names)
        for name in code.co_names:
            target = scope.get(name)
            if inspect.isclass(target):
                visit(target)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                visit_code(const, scope)

    for name, (_, factory, _, _) in injector.__dependencies__.items():
        if isinstance(factory, _ThisSpecType):
            names.update(symbol for kind, symbol in factory.__expression__ if kind == ".")
        elif not name.endswith("_class"):
            visit(factory)
    return frozenset(names)
