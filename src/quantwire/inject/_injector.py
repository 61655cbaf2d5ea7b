"""``ExtendedInjector``: the ``dependencies`` library's ``Injector`` with the extensions quantizers need.

What it adds to ``dependencies.Injector`` (2.0.1):

* a ``@value`` function may return a class, which is then auto-wired, or ``this.<name>``, which
  is resolved lazily (only when the attribute is actually needed);
* resolution never writes to the injector class: every lookup keeps its state in a local
  :class:`_Resolution`, so several threads may resolve the same quantizer at once;
* attributes are inherited along the method resolution order, as Python attributes are;
* the class bookkeeping names that newer Pythons add to a class body (``__firstlineno__``,
  ``__static_attributes__``, ``__classdictcell__``, ...) are accepted;
* classes made by :meth:`ExtendedInjector.let` can be pickled;
* constructors with ``*args``/``**kwargs`` (``torch.nn.Identity``) are wired by their named
  parameters instead of being refused.
"""

from __future__ import annotations

import copyreg
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from _dependencies.checks.loops import _check_loops
from _dependencies.exceptions import DependencyError as _LibraryDependencyError
from _dependencies.injector import _InjectorType
from _dependencies.markers import injectable
from _dependencies.spec import _make_dependency_spec
from _dependencies.this import This
from _dependencies.this import _ThisSpec as _ThisSpecType
from dependencies import Injector, this, value

from quantwire.errors import QuantwireError

__all__ = ["DependencyError", "ExtendedInjector", "this", "value"]


class DependencyError(QuantwireError, _LibraryDependencyError, AttributeError):
    """An injector cannot resolve an attribute, or was declared in a way it cannot use.

    It is also a ``dependencies.DependencyError`` (code written for the library keeps working)
    and an ``AttributeError`` (so ``getattr(Q, name, default)`` behaves as for any class).
    """


# Names Python itself puts in a class body. They are class bookkeeping, not dependencies.
_CLASS_BOOKKEEPING = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__weakref__",
        "__dict__",
        "__annotations__",
        "__annotate__",
        "__annotate_func__",
        "__annotations_cache__",
        "__classcell__",
        "__classdictcell__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__type_params__",
    }
)
# Names the injector machinery reads as dependencies although they look like dunders.
_DEPENDENCY_DUNDERS = frozenset({"__parent__", "__self__"})

_MISSING = object()

Spec = tuple[Any, Callable[..., Any], list[str], int]


def _is_value_function(factory: Callable[..., Any]) -> bool:
    """Whether a spec's factory is a ``@value`` function (whose result may need wiring)."""
    return inspect.isfunction(factory)


@functools.lru_cache(maxsize=4096)
def _signature_arguments(factory: Callable[..., Any]) -> tuple[tuple[str, bool], ...]:
    """``(name, required)`` for each named parameter of a constructor or ``@value`` function."""
    arguments = []
    for name, parameter in inspect.signature(factory).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        arguments.append((name, parameter.default is parameter.empty))
    return tuple(arguments)


def _spec_arguments(spec: Spec) -> tuple[tuple[str, bool], ...]:
    """``(name, required)`` for each dependency a spec needs to be built."""
    _, factory, args, _ = spec
    if inspect.isclass(factory) or _is_value_function(factory):
        return _signature_arguments(factory)
    return tuple((arg, True) for arg in args)


def _make_spec(owner: str, name: str, dependency: Any) -> Spec:
    """The library's spec for one declared attribute, with clearer errors and varargs support."""
    try:
        return _make_dependency_spec(name, dependency)
    except _LibraryDependencyError as error:
        if inspect.isclass(dependency) and "arbitrary" in str(error):
            # e.g. torch.nn.Identity(*args, **kwargs): wire it by its named parameters.
            names = [arg for arg, _ in _signature_arguments(dependency)]
            return injectable, dependency, names, len(names)
        raise DependencyError(f"{owner!r} attribute {name!r}: {error}") from None


def _check_declared_name(owner: str, name: str) -> None:
    if name == "let":
        raise DependencyError(f"{owner!r} can not redefine 'let': it is the injector's override method")
    if name.startswith("__") and name.endswith("__") and name not in _DEPENDENCY_DUNDERS:
        raise DependencyError(
            f"{owner!r} declares {name!r}: names with leading and trailing double underscores "
            "are reserved and can not be injector attributes"
        )


def _check_circles(owner: str, dependencies: dict[str, Spec]) -> None:
    """Refuse constructor / ``@value`` argument cycles. (The library's own check recurses forever,
    i.e. raises ``RecursionError``, on a cycle that does not pass through the attribute it starts from.)"""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            chain = " -> ".join([*path[path.index(name) :], name])
            raise DependencyError(f"{owner!r} has a circular dependency: {chain}")
        spec = dependencies.get(name)
        if name in done or spec is None or spec[0] is not injectable:
            return
        path.append(name)
        for argument in spec[2]:
            visit(argument, path)
        path.pop()
        done.add(name)

    for name in dependencies:
        visit(name, [])


def _own_specs(klass: type) -> dict[str, Spec]:
    """The specs a class in an injector's MRO declares itself."""
    own = klass.__dict__.get("__own_dependencies__")
    if own is not None:
        return own
    # A plain dependencies.Injector: its flattened table is the best available.
    return klass.__dict__.get("__dependencies__", {})


class _ExtendedInjectorType(_InjectorType):
    """Metaclass of :class:`ExtendedInjector`: builds the dependency table of each class."""

    def __new__(mcs, class_name: str, bases: tuple[type, ...], namespace: dict[str, Any]):
        for base in bases:
            if not issubclass(base, Injector):
                raise DependencyError(
                    f"{class_name!r} inherits from {base.__name__!r}: an injector can only inherit from other injectors"
                )
        bookkeeping = {k: v for k, v in namespace.items() if k in _CLASS_BOOKKEEPING}
        declared = {k: v for k, v in namespace.items() if k not in _CLASS_BOOKKEEPING}
        own = {}
        for name, dependency in declared.items():
            _check_declared_name(class_name, name)
            own[name] = _make_spec(class_name, name, dependency)
        cls = type.__new__(mcs, class_name, bases, bookkeeping)
        dependencies: dict[str, Spec] = {}
        for klass in reversed(cls.__mro__[1:]):
            if isinstance(klass, _InjectorType):
                dependencies.update(_own_specs(klass))
        dependencies.update(own)
        try:
            _check_loops(class_name, dependencies)
        except _LibraryDependencyError as error:
            raise DependencyError(f"{class_name!r}: {error}") from None
        _check_circles(class_name, dependencies)
        type.__setattr__(cls, "__own_dependencies__", own)
        type.__setattr__(cls, "__dependencies__", dependencies)
        return cls

    def __getattr__(cls, attrname: str) -> Any:
        if attrname.startswith("__") and attrname.endswith("__") and attrname not in cls.__dependencies__:
            # Python protocols (copy, pickle, inspect, typing) probe dunders: keep them plain misses.
            raise AttributeError(attrname)
        return _Resolution(cls).resolve(attrname)

    def __setattr__(cls, attrname: str, value: Any) -> None:
        raise DependencyError(
            f"{cls.__name__!r} can not be modified in place (setting {attrname!r}); "
            f"use {cls.__name__}.let({attrname}=...) to derive a new quantizer"
        )

    def __delattr__(cls, attrname: str) -> None:
        raise DependencyError(
            f"{cls.__name__!r} can not be modified in place (deleting {attrname!r}); "
            f"use {cls.__name__}.let(...) to derive a new quantizer"
        )


class _Resolution:
    """One lookup of one attribute: a private cache of resolved values and of the specs that
    ``@value`` functions produced. Nothing here is shared between lookups or threads."""

    def __init__(self, injector: type) -> None:
        self.injector = injector
        self.declared: dict[str, Spec] = injector.__dependencies__
        self.produced: dict[str, Spec] = {}
        self.cache: dict[str, Any] = {"__self__": injector}
        self.building: list[str] = []

    def resolve(self, name: str, required: bool = True) -> Any:
        if name in self.cache:
            return self.cache[name]
        spec = self.produced.get(name) or self.declared.get(name)
        if spec is None:
            if not required:
                return _MISSING
            raise DependencyError(self._missing_message(name))
        if name in self.building:
            chain = " -> ".join([*self.building[self.building.index(name) :], name])
            raise DependencyError(f"{self.injector.__name__!r} has a circular dependency: {chain}")
        self.building.append(name)
        try:
            result = self._build(spec)
        finally:
            self.building.pop()
        if _is_value_function(spec[1]) and (inspect.isclass(result) or isinstance(result, This)):
            wired = _make_spec(self.injector.__name__, name, result)
            if not _is_raw(wired):
                # The @value function chose a class to auto-wire or an attribute to follow.
                self.produced[name] = wired
                return self.resolve(name, required)
        self.cache[name] = result
        return result

    def _build(self, spec: Spec) -> Any:
        marker, factory, _, _ = spec
        if isinstance(factory, _ThisSpecType):
            return self._follow(factory.__expression__)
        kwargs = {}
        for argument, required in _spec_arguments(spec):
            resolved = self.resolve(argument, required)
            if resolved is not _MISSING:
                kwargs[argument] = resolved
        return factory(**kwargs)

    def _follow(self, expression: tuple[tuple[str, Any], ...]) -> Any:
        """Evaluate ``this.a.b[c]`` within this resolution: ``a`` is an attribute of the injector."""
        steps: Iterator[tuple[str, Any]] = iter(expression)
        _, first = next(steps)  # the library guarantees ``this`` starts with an attribute
        result = self.resolve(first)
        for kind, symbol in steps:
            result = getattr(result, symbol) if kind == "." else result[symbol]
        return result

    def _missing_message(self, name: str) -> str:
        message = f"{self.injector.__name__!r} can not resolve attribute {name!r}"
        if self.building:
            message += f" while building {self.building[-1]!r}"
            if len(self.building) > 1:
                message += f" (via {' -> '.join(self.building)})"
        return message


def _is_raw(spec: Spec) -> bool:
    """Whether a spec just hands its value back (a plain attribute, or a ``*_class`` class)."""
    return not spec[2] and not inspect.isclass(spec[1]) and not isinstance(spec[1], _ThisSpecType)


def _let(cls: type, **overrides: Any) -> type:
    """A new injector equal to this one with the given attributes replaced or added."""
    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, **overrides}
    derived = type(cls)(cls.__name__, (cls,), namespace)
    type.__setattr__(derived, "__let_base__", cls)
    type.__setattr__(derived, "__let_overrides__", dict(overrides))
    return derived


def compose(*quantizers: type, name: str | None = None) -> type:
    """A quantizer inheriting from ``quantizers`` in order (mixins first, as in a class
    statement), picklable like one declared in a module: ``compose(MSEObserver, Int8ActPerTensorFloat)``.

    Programs that assemble quantizers from a configuration use it instead of ``type(...)``,
    whose classes can not be pickled (and so not deep-copied with a model or sent to worker
    processes).
    """
    if not quantizers:
        raise DependencyError("compose() needs at least one quantizer")
    for quantizer in quantizers:
        if not (isinstance(quantizer, type) and issubclass(quantizer, ExtendedInjector)):
            raise DependencyError(f"compose() takes quantizer classes (ExtendedInjector subclasses), got {quantizer!r}")
    if len(quantizers) == 1 and name is None:
        return quantizers[0]
    name = name or "".join(q.__name__ for q in quantizers)
    try:
        composed = type(quantizers[0])(name, tuple(quantizers), {"__module__": __name__, "__qualname__": name})
    except TypeError as error:  # the bases' orders conflict: no consistent method resolution order
        parts = ", ".join(q.__name__ for q in quantizers)
        raise DependencyError(f"compose({parts}) can not order these quantizers' bases: {error}") from error
    type.__setattr__(composed, "__compose_parts__", (tuple(quantizers), name))
    return composed


def _reduce_injector(cls: type) -> Any:
    """Pickle an injector by reference, a ``let``-derived one as its base plus overrides and a
    composed one as its parts."""
    if "__let_base__" in cls.__dict__:
        return _rebuild_let, (cls.__let_base__, cls.__let_overrides__)
    if "__compose_parts__" in cls.__dict__:
        parts, name = cls.__compose_parts__
        return _rebuild_composed, (parts, name)
    return cls.__qualname__


def _rebuild_composed(parts: tuple[type, ...], name: str) -> type:
    return compose(*parts, name=name)


def _rebuild_let(base: type, overrides: dict[str, Any]) -> type:
    return base.let(**overrides)


def _injector_doc() -> str:
    return (
        "Base class of quantizer declarations.\n\n"
        "Attributes declared on a subclass are wired into each other by name when read: a class\n"
        "attribute is instantiated with its constructor arguments taken from the injector, a\n"
        "``@value`` function is called with its arguments taken from the injector and may return\n"
        "a class to instantiate or ``this.<name>`` to follow, anything else is returned as is."
    )


ExtendedInjector = _ExtendedInjectorType(
    "ExtendedInjector",
    (Injector,),
    {"__module__": __name__, "__doc__": _injector_doc()},
)
type.__setattr__(ExtendedInjector, "let", classmethod(_let))
copyreg.pickle(_ExtendedInjectorType, _reduce_injector)
