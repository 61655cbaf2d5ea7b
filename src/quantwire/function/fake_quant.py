"""Uniform integer fake quantization as one autograd node.

``(clamp(round(x / scale + zero_point), lower, upper) - zero_point) * scale`` composed from
straight-through pieces costs one autograd node, one temporary and one memory pass per
operation, forward and backward. :func:`int_fake_quant` computes the same forward value bit for
bit (the same float operations in the same order, in place on one buffer) and the gradients the
composition defines, in closed form:

- input: the incoming gradient inside the clamping range, 0 outside (``clamp_ste=True``: the
  incoming gradient everywhere, handed back without a copy);
- scale: ``(q - zero_point) - m * x / scale`` per element, with ``q`` the clamped code and ``m``
  1 inside the range (everywhere with ``clamp_ste``), 0 outside; summed to the scale's shape
  (LSQ's scale gradient, before any gradient scaling);
- zero point: ``-scale`` per clamped element, 0 elsewhere (0 everywhere with ``clamp_ste``).

Gradients equal the composition's up to float rounding (``(g * s) / s`` is not always ``g``).
Bounds are constants to autograd: quantizers whose bit width is learned use the composed path.
TorchScript can not compile autograd functions and ``torch.compile`` fuses the composed
operations itself, so both keep the composition (see :class:`quantwire.core.quant.IntQuant`).
"""

from typing import Any

import torch
from torch import Tensor


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` summed over the dimensions ``like`` was broadcast along."""
    if grad.shape == like.shape:
        return grad
    return grad.sum_to_size(like.shape) if like.dim() else grad.sum()


def _sum_of_products(a: Tensor, b: Tensor, like: Tensor) -> Tensor:
    """``a * b`` (same shape) summed to ``like``'s shape, without materialising the product
    when ``like`` is one value or one value per index of the first dimension."""
    if like.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(like.shape)
    rows = a.shape[0] if a.dim() else 1
    if like.dim() == a.dim() and like.shape[0] == rows and like.numel() == rows:
        products = torch.bmm(a.reshape(rows, 1, -1), b.reshape(rows, -1, 1))
        return products.reshape(like.shape)
    return _sum_to(a * b, like)


def _fits_in_place(buffer: Tensor, *others: Tensor) -> bool:
    """Whether ``buffer op= other`` gives what ``buffer op other`` gives: ``other`` broadcasts to
    ``buffer``'s shape and does not promote its dtype (a 0-d float tensor never does)."""
    for other in others:
        if other.dtype != buffer.dtype and not (other.dim() == 0 and other.is_floating_point()):
            return False
        if other.dim() > buffer.dim():
            return False
        for size, target in zip(reversed(other.shape), reversed(buffer.shape), strict=False):
            if size != 1 and size != target:
                return False
    return True


def _forward_value(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, lower: Tensor, upper: Tensor
) -> tuple[Tensor, Tensor]:
    """``(x / scale + zero_point, fake-quantized value)``; the second is computed in place on one
    buffer when broadcasting and type promotion allow (then the first is overwritten)."""
    codes = x / scale
    offsets = () if zero_point is None else (zero_point,)
    if not _fits_in_place(codes, *offsets, lower, upper):
        if zero_point is not None:
            codes = codes + zero_point
            return codes, (torch.round(torch.clamp(codes, lower, upper)) - zero_point) * scale
        return codes, torch.round(torch.clamp(codes, lower, upper)) * scale
    if zero_point is not None:
        codes.add_(zero_point)
    return codes, codes


class _IntFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor | None, lower: Tensor, upper: Tensor, clamp_ste: bool
    ) -> Tensor:
        codes, y = _forward_value(x, scale, zero_point, lower, upper)
        needs_grad = any(ctx.needs_input_grad[:3])
        inside = None
        if needs_grad and not clamp_ste:
            inside = torch.logical_and(codes >= lower, codes <= upper)
        if y is codes:
            y = codes.clamp_(lower, upper).round_()
            if zero_point is not None:
                y.sub_(zero_point)
            y.mul_(scale)
        if needs_grad:
            ctx.save_for_backward(x, scale, zero_point, y, inside)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, scale, zero_point, y, inside = ctx.saved_tensors
        needs_x, needs_scale, needs_zero_point = ctx.needs_input_grad[:3]
        grad_x = grad_scale = grad_zero_point = None
        if needs_x:
            grad_x = _sum_to(grad if inside is None else torch.where(inside, grad, 0.0), x)
        if needs_scale:
            # (q - z) - m x / s = (y - m x) / s: the division is by a value constant along the sum.
            error = y - x
            if inside is not None:
                error = torch.where(inside, error, y, out=error)
            grad_scale = _sum_of_products(error, grad, scale) / scale
        if needs_zero_point:
            if inside is None:
                grad_zero_point = torch.zeros_like(zero_point)
            else:
                grad_zero_point = -_sum_of_products(torch.where(inside, 0.0, grad), scale.expand_as(grad), zero_point)
        return grad_x, grad_scale, grad_zero_point, None, None, None


@torch.jit.unused
def int_fake_quant(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, lower: Tensor, upper: Tensor, clamp_ste: bool
) -> Tensor:
    """``(round_half_even(clamp(x / scale + zero_point, lower, upper)) - zero_point) * scale`` as
    one autograd node (see the module docstring for its gradients); ``zero_point=None`` for a
    symmetric quantizer (nothing added or subtracted). ``lower``/``upper`` must not require
    gradients."""
    return _IntFakeQuant.apply(x, scale, zero_point, lower, upper, clamp_ste)


class _AbsMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        largest, index = torch.abs(x).max(dim=-1, keepdim=True)
        ctx.save_for_backward(index, torch.sign(x.gather(-1, index)))
        ctx.input_shape = x.shape
        return largest

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        index, sign = ctx.saved_tensors
        return torch.zeros(ctx.input_shape, dtype=grad.dtype, device=grad.device).scatter_(-1, index, grad * sign)


@torch.jit.unused
def abs_max_last_dim(x: Tensor) -> Tensor:
    """``max(|x|)`` over the last dimension, kept as size 1, whose gradient goes to one element
    reaching the maximum (as ``torch.max(dim)``'s does; ``amax`` splits it among ties): the
    backward is one scatter instead of comparisons over the whole input."""
    return _AbsMax.apply(x)
