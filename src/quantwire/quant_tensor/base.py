"""The :class:`QuantTensor` base: a quantized tensor's float value travelling with its metadata.

A QuantTensor is a plain Python object (not a ``torch.Tensor`` subclass) that takes part in
PyTorch's ``__torch_function__`` protocol, so ``torch.relu(qt)``, ``F.max_pool2d(qt, 2)`` or
``qt1 + qt2`` reach it. Each concrete class keeps an explicit table from torch callables to
handlers; a handler returns a QuantTensor when the quantization metadata provably still
describes the result, or ``NotImplemented``. Everything without a handler, and every handler
that declines, falls back: every QuantTensor in the arguments is replaced by its ``value`` and
the function returns plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.overrides import handle_torch_function

from quantwire.errors import QuantConfigError

__all__ = [
    "QuantTensor",
    "as_tensor_like",
    "cat_keeping_metadata",
    "equal_after_broadcast",
    "holds_quant_tensor",
    "unwrap",
]

TorchFunctionTable = dict[Callable[..., Any], Callable[..., Any]]


def unwrap(obj: Any) -> Any:
    """``obj`` with every QuantTensor, also inside lists, tuples and dicts, replaced by its value."""
    if isinstance(obj, QuantTensor):
        return obj.value
    if isinstance(obj, (list, tuple)):
        items = [unwrap(item) for item in obj]
        # Named tuples (torch.return_types, user records) rebuild from positional fields.
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return type(obj)((key, unwrap(item)) for key, item in obj.items())
    return obj


def holds_quant_tensor(obj: Any) -> bool:
    """Whether ``obj`` is, or contains in lists, tuples or dicts, a QuantTensor."""
    if isinstance(obj, QuantTensor):
        return True
    if isinstance(obj, (list, tuple)):
        return any(holds_quant_tensor(item) for item in obj)
    if isinstance(obj, dict):
        return any(holds_quant_tensor(item) for item in obj.values())
    return False


def equal_after_broadcast(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` broadcast together and are then equal element by element."""
    try:
        a, b = torch.broadcast_tensors(a, b)
    except RuntimeError:
        return False
    return torch.equal(a, b)


def is_per_tensor(t: Tensor) -> bool:
    """Whether ``t`` holds a single element (a per-tensor scale or zero point)."""
    return t.numel() == 1


def cat_keeping_metadata(tensors: Any, dim: int, cls: type[QuantTensor], compatible: Callable[[Any, Any], bool]) -> Any:
    """``torch.cat(tensors, dim)`` as a ``cls`` with the first tensor's metadata (``training``
    if any is training), when every tensor is a ``cls`` with single-element scale and zero
    point and ``compatible(tensor, first)`` holds for the others; else ``NotImplemented``."""
    if not tensors or not all(isinstance(t, cls) for t in tensors):
        return NotImplemented
    first = tensors[0]
    if not all(is_per_tensor(t.scale) and is_per_tensor(t.zero_point) for t in tensors):
        return NotImplemented
    if not all(compatible(t, first) for t in tensors[1:]):
        return NotImplemented
    value = torch.cat([t.value for t in tensors], dim=dim)
    return first._replace(value=value, training=any(t.training for t in tensors))


def as_tensor_like(x: Tensor | float | int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` itself if it is a tensor, else a tensor on ``like``'s device (of ``like``'s dtype
    unless ``dtype`` is given)."""
    if isinstance(x, Tensor):
        return x
    return torch.as_tensor(x, dtype=dtype or like.dtype, device=like.device)


def _tensor_method(func: Callable[..., Any]) -> Callable[..., Any]:
    """A QuantTensor method that calls ``func`` through the torch-function table."""

    def method(self: QuantTensor, *args: Any, **kwargs: Any) -> Any:
        return handle_torch_function(func, (self, *args), self, *args, **kwargs)

    name = func.__name__
    method.__name__ = name
    method.__doc__ = f"``Tensor.{name}`` through the torch-function table (metadata kept where it holds)."
    return method


class QuantTensor:
    """A float ``value`` with the ``scale`` and ``zero_point`` that put it on a quantization
    grid, plus ``signed`` and ``training`` flags; subclasses add the format (bit width, or
    exponent and mantissa widths).

    ``scale`` and ``zero_point`` broadcast against ``value``. The object behaves like a tensor
    for shape queries and device moves, and dispatches torch functions through ``_TORCH_FUNCTIONS``.
    """

    __slots__ = ("value", "scale", "zero_point", "signed", "training")

    # Constructor parameters in order (for repr and rebuilding) and which of them are tensors.
    _FIELDS: ClassVar[tuple[str, ...]] = ("value", "scale", "zero_point", "signed", "training")
    _TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("value", "scale", "zero_point")
    _TORCH_FUNCTIONS: ClassVar[TorchFunctionTable] = {}

    value: Tensor
    scale: Tensor
    zero_point: Tensor
    signed: bool
    training: bool

    def __init__(
        self,
        value: Tensor,
        scale: Tensor | float,
        zero_point: Tensor | float,
        signed: bool,
        training: bool,
    ) -> None:
        if not isinstance(value, Tensor):
            raise QuantConfigError(f"{type(self).__name__}: value must be a torch.Tensor, got {type(value).__name__}")
        self.value = value
        self.scale = as_tensor_like(scale, value)
        self.zero_point = as_tensor_like(zero_point, value)
        self.signed = bool(signed)
        self.training = bool(training)
        for name in ("scale", "zero_point"):
            self._check_broadcasts(name, getattr(self, name))

    def _check_broadcasts(self, name: str, t: Tensor) -> None:
        try:
            shape = torch.broadcast_shapes(self.value.shape, t.shape)
        except RuntimeError:
            shape = None
        if shape != self.value.shape:
            raise QuantConfigError(
                f"{type(self).__name__}: {name} of shape {tuple(t.shape)} does not broadcast "
                f"against value of shape {tuple(self.value.shape)}"
            )

    # -- rebuilding and printing ----------------------------------------------------------------

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._FIELDS}

    def _replace(self, **changes: Any) -> QuantTensor:
        """A QuantTensor of the same class with some fields replaced."""
        return type(self)(**{**self._fields(), **changes})

    def _map_tensors(self, fn: Callable[[Tensor], Tensor]) -> QuantTensor:
        return self._replace(**{name: fn(getattr(self, name)) for name in self._TENSOR_FIELDS})

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self._fields().items())
        return f"{type(self).__name__}({fields})"

    # -- validity -------------------------------------------------------------------------------

    @property
    def is_valid(self) -> bool:
        """Whether value, scale, zero point and format agree (defined by each subclass)."""
        raise NotImplementedError

    # -- tensor-like surface --------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """The value's shape."""
        return self.value.shape

    def size(self, dim: int | None = None) -> torch.Size | int:
        """The value's shape, or its size along ``dim``."""
        return self.value.size() if dim is None else self.value.size(dim)

    def dim(self) -> int:
        """The value's number of dimensions."""
        return self.value.dim()

    @property
    def ndim(self) -> int:
        """The value's number of dimensions."""
        return self.value.ndim

    @property
    def dtype(self) -> torch.dtype:
        """The value's dtype."""
        return self.value.dtype

    @property
    def device(self) -> torch.device:
        """The value's device."""
        return self.value.device

    @property
    def requires_grad(self) -> bool:
        """Whether the value requires a gradient."""
        return self.value.requires_grad

    def numel(self) -> int:
        """The value's number of elements."""
        return self.value.numel()

    def __len__(self) -> int:
        return len(self.value)

    def detach(self) -> QuantTensor:
        """The same QuantTensor with every tensor field detached from the graph."""
        return self._map_tensors(Tensor.detach)

    def to(self, *args: Any, **kwargs: Any) -> QuantTensor:
        """Every tensor field moved or cast with ``Tensor.to(*args, **kwargs)``."""
        return self._map_tensors(lambda t: t.to(*args, **kwargs))

    def cpu(self) -> QuantTensor:
        """Every tensor field on the CPU."""
        return self._map_tensors(Tensor.cpu)

    contiguous = _tensor_method(Tensor.contiguous)
    view = _tensor_method(Tensor.view)
    reshape = _tensor_method(Tensor.reshape)
    flatten = _tensor_method(Tensor.flatten)
    unflatten = _tensor_method(Tensor.unflatten)
    transpose = _tensor_method(Tensor.transpose)
    permute = _tensor_method(Tensor.permute)
    squeeze = _tensor_method(Tensor.squeeze)
    unsqueeze = _tensor_method(Tensor.unsqueeze)
    t = _tensor_method(Tensor.t)
    expand = _tensor_method(Tensor.expand)
    clone = _tensor_method(Tensor.clone)
    relu = _tensor_method(Tensor.relu)
    add = _tensor_method(Tensor.add)
    mul = _tensor_method(Tensor.mul)
    __getitem__ = _tensor_method(Tensor.__getitem__)

    # -- operators: through torch functions, so that the table applies ---------------------------

    def __add__(self, other: Any) -> Any:
        return torch.add(self, other)

    def __radd__(self, other: Any) -> Any:
        # Addition commutes exactly in floating point, and the add rule is symmetric.
        return torch.add(self, other)

    def __sub__(self, other: Any) -> Any:
        return torch.sub(self, other)

    def __rsub__(self, other: Any) -> Any:
        return torch.rsub(self, other)

    def __mul__(self, other: Any) -> Any:
        return torch.mul(self, other)

    def __rmul__(self, other: Any) -> Any:
        # Multiplication commutes exactly in floating point, and the mul rule is symmetric.
        return torch.mul(self, other)

    def __truediv__(self, other: Any) -> Any:
        return torch.div(self, other)

    def __rtruediv__(self, other: Any) -> Any:
        return torch.div(other, self)

    def __neg__(self) -> Any:
        return torch.neg(self)

    def __matmul__(self, other: Any) -> Any:
        return torch.matmul(self, other)

    def __rmatmul__(self, other: Any) -> Any:
        return torch.matmul(other, self)

    # -- the torch-function protocol ------------------------------------------------------------

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = {} if kwargs is None else kwargs
        handler = cls._TORCH_FUNCTIONS.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*unwrap(args), **unwrap(kwargs))
