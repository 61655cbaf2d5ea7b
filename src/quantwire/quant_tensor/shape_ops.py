"""Torch functions that keep any QuantTensor's metadata: they move, copy or select values
without computing new ones, so every output element is an input element on its own grid.

* shape and indexing ops (view, reshape, flatten, unflatten, transpose, permute, squeeze,
  unsqueeze, t, ``[]``, expand), which apply to the scale and zero point as well;
* same-shape copies (clone, contiguous) and ``relu``;
* max pooling and nearest-neighbour interpolation, when the scale and zero point are constant
  over the pooled or resized (trailing spatial) dimensions.

``METADATA_PRESERVING_OPS`` maps every spelling of these functions to its handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from quantwire.quant_tensor.base import QuantTensor, TorchFunctionTable, holds_quant_tensor

__all__ = ["METADATA_PRESERVING_OPS"]


def _single_element_like(t: Tensor, out: Tensor) -> Tensor:
    """A single-element tensor that still broadcasts against ``out`` (which may have lost dims)."""
    return t if t.dim() <= out.dim() else t.reshape((1,) * out.dim())


def _reshaping(func: Callable[..., Any], metadata_func: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """Handler for a shape or indexing op ``func``.

    Rule: the value goes through ``func``; a single-element scale or zero point is kept as is,
    any other one is broadcast to the value's shape and goes through the same op (or
    ``metadata_func``, e.g. ``reshape`` for ``view``, since a broadcast tensor cannot be viewed)
    so that it stays aligned element by element. A dtype argument (``view(torch.int32)``
    reinterprets bits) or a QuantTensor among the other arguments falls back.
    """
    metadata_func = func if metadata_func is None else metadata_func

    def handler(input: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(input, QuantTensor) or holds_quant_tensor((args, kwargs)):
            return NotImplemented
        if any(isinstance(arg, torch.dtype) for arg in (*args, *kwargs.values())):
            return NotImplemented
        value = func(input.value, *args, **kwargs)

        def follow(metadata: Tensor) -> Tensor:
            if metadata.numel() == 1:
                return _single_element_like(metadata, value)
            return metadata_func(torch.broadcast_to(metadata, input.value.shape), *args, **kwargs)

        return input._replace(value=value, scale=follow(input.scale), zero_point=follow(input.zero_point))

    handler.__doc__ = f"``{func.__name__}``: {_reshaping.__doc__}"
    return handler


def _same_shape(func: Callable[..., Any]) -> Callable[..., Any]:
    """Handler for an op that copies the value without changing its shape (clone, contiguous).

    Rule: the value goes through ``func``; scale, zero point and format are kept as they are.
    """

    def handler(input: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(input, QuantTensor) or holds_quant_tensor((args, kwargs)):
            return NotImplemented
        return input._replace(value=func(input.value, *args, **kwargs))

    handler.__doc__ = f"``{func.__name__}``: {_same_shape.__doc__}"
    return handler


def _relu(input: Any, inplace: bool = False) -> Any:
    """``relu`` keeps scale, zero point and format: ``max(value, 0)`` is either an input value
    or zero, and zero is on the grid (code ``zero_point``, which quantizers keep in range).
    ``inplace=True`` falls back (it would change the input's value behind its back)."""
    if not isinstance(input, QuantTensor) or inplace:
        return NotImplemented
    return input._replace(value=torch.relu(input.value))


def _constant_over_trailing_dims(metadata: Tensor, dims: int) -> Tensor | None:
    """``metadata`` reduced to size 1 over its last ``dims`` dimensions when it is constant
    over them (so it broadcasts against a pooled or resized output), else ``None``.

    Sizes of 1 there decide it without looking at the data (per-tensor and per-channel
    metadata); otherwise (metadata broadcast to the value's shape by a shape op) the values
    are compared."""
    trailing = tuple(range(-min(dims, metadata.dim()), 0))
    if all(metadata.shape[d] == 1 for d in trailing):
        return metadata
    low = metadata.amin(dim=trailing, keepdim=True)
    high = metadata.amax(dim=trailing, keepdim=True)
    return low if torch.equal(low, high) else None


def _keep_if_constant_over_spatial(input: QuantTensor, spatial_dims: int, result: Any) -> Any:
    scale = _constant_over_trailing_dims(input.scale, spatial_dims)
    zero_point = _constant_over_trailing_dims(input.zero_point, spatial_dims)
    if scale is None or zero_point is None:
        return NotImplemented
    if isinstance(result, tuple):  # (values, indices) of max pooling with return_indices=True
        return (input._replace(value=result[0], scale=scale, zero_point=zero_point), *result[1:])
    return input._replace(value=result, scale=scale, zero_point=zero_point)


def _max_pooling(func: Callable[..., Any], spatial_dims: int) -> Callable[..., Any]:
    """Handler for max pooling over the last ``spatial_dims`` dimensions.

    Rule: when scale and zero point are constant over the pooled dimensions, every window's
    maximum is one of its values on one grid, so the metadata is kept (reduced to size 1 over
    those dimensions); with ``return_indices=True`` the result is ``(QuantTensor, indices)``.
    Metadata that varies within a window falls back.
    """

    def handler(input: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(input, QuantTensor) or holds_quant_tensor((args, kwargs)):
            return NotImplemented
        return _keep_if_constant_over_spatial(input, spatial_dims, func(input.value, *args, **kwargs))

    handler.__doc__ = f"``{func.__name__}``: {_max_pooling.__doc__}"
    return handler


_NEAREST_MODES = ("nearest", "nearest-exact")


def _interpolate(
    input: Any, size: Any = None, scale_factor: Any = None, mode: str = "nearest", *args: Any, **kwargs: Any
) -> Any:
    """``F.interpolate`` (and ``F.upsample``/``F.upsample_nearest``, which call it) with mode
    ``'nearest'`` or ``'nearest-exact'`` copies input values, so the metadata is kept when scale
    and zero point are constant over the resized (trailing spatial) dimensions. Other modes
    compute new values and fall back."""
    if not isinstance(input, QuantTensor) or mode not in _NEAREST_MODES:
        return NotImplemented
    result = F.interpolate(input.value, size, scale_factor, mode, *args, **kwargs)
    return _keep_if_constant_over_spatial(input, input.value.dim() - 2, result)


METADATA_PRESERVING_OPS: TorchFunctionTable = {
    # shape and indexing
    Tensor.view: _reshaping(Tensor.view, metadata_func=Tensor.reshape),
    torch.reshape: _reshaping(torch.reshape),
    Tensor.reshape: _reshaping(Tensor.reshape),
    torch.flatten: _reshaping(torch.flatten),
    Tensor.flatten: _reshaping(Tensor.flatten),
    torch.unflatten: _reshaping(torch.unflatten),
    Tensor.unflatten: _reshaping(Tensor.unflatten),
    torch.transpose: _reshaping(torch.transpose),
    Tensor.transpose: _reshaping(Tensor.transpose),
    torch.permute: _reshaping(torch.permute),
    Tensor.permute: _reshaping(Tensor.permute),
    torch.squeeze: _reshaping(torch.squeeze),
    Tensor.squeeze: _reshaping(Tensor.squeeze),
    torch.unsqueeze: _reshaping(torch.unsqueeze),
    Tensor.unsqueeze: _reshaping(Tensor.unsqueeze),
    torch.t: _reshaping(torch.t),
    Tensor.t: _reshaping(Tensor.t),
    Tensor.__getitem__: _reshaping(Tensor.__getitem__),
    Tensor.expand: _reshaping(Tensor.expand),
    # same-shape copies
    torch.clone: _same_shape(torch.clone),
    Tensor.clone: _same_shape(Tensor.clone),
    Tensor.contiguous: _same_shape(Tensor.contiguous),
    # relu
    torch.relu: _relu,
    Tensor.relu: _relu,
    F.relu: _relu,
    # max pooling (F.max_pool*d dispatches as itself, F.max_pool*d_with_indices when
    # return_indices=True)
    F.max_pool1d: _max_pooling(F.max_pool1d, 1),
    F.max_pool2d: _max_pooling(F.max_pool2d, 2),
    F.max_pool3d: _max_pooling(F.max_pool3d, 3),
    F.max_pool1d_with_indices: _max_pooling(F.max_pool1d_with_indices, 1),
    F.max_pool2d_with_indices: _max_pooling(F.max_pool2d_with_indices, 2),
    F.max_pool3d_with_indices: _max_pooling(F.max_pool3d_with_indices, 3),
    torch.max_pool1d: _max_pooling(torch.max_pool1d, 1),
    torch.max_pool2d: _max_pooling(torch.max_pool2d, 2),
    torch.max_pool3d: _max_pooling(torch.max_pool3d, 3),
    # nearest-neighbour resizing
    F.interpolate: _interpolate,
}
