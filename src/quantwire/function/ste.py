"""Straight-through estimators (STE).

Each ``*_ste`` function computes a non-differentiable operation in the forward pass and lets
the gradient through in the backward pass as the estimator defines it.

In eager mode and under ``torch.compile`` they are one small autograd function each: the
forward is exactly the operation (bit for bit, signed zeros and infinities included) and the
backward hands the incoming gradient through unchanged, at no extra cost per element.
TorchScript cannot compile autograd functions, so when scripted they are written as
``forward.detach() - (x.detach() - x)`` instead, with that difference taken as 0 where ``x`` is
infinite (``inf - inf`` would be NaN): the same forward value, the identity gradient for finite
``x`` (0 at infinities, where the eager gradient is 1).
"""

from typing import Any

import torch
from torch import Tensor


def _zero_with_identity_gradient(x: Tensor) -> Tensor:
    """``+0.0`` (NaN where ``x`` is NaN) whose gradient with respect to ``x`` is -1 (0 at ±inf)."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x.detach() - x)


def _pass_through(forward: Tensor, x: Tensor) -> Tensor:
    """``forward`` in the forward pass, the identity gradient with respect to ``x``."""
    return forward.detach() - _zero_with_identity_gradient(x)


class _StraightThrough(torch.autograd.Function):
    """``torch.<op>(x, *args)`` forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, op: str, *args: float) -> Tensor:
        ctx.num_args = len(args)
        return getattr(torch, op)(x, *args)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (grad, None, *([None] * ctx.num_args))


@torch.jit.unused
def _straight_through(x: Tensor, op: str) -> Tensor:
    return _StraightThrough.apply(x, op)


@torch.jit.unused
def _clamp_min_straight_through(x: Tensor, min_val: float) -> Tensor:
    return _StraightThrough.apply(x, "clamp_min", min_val)


@torch.jit.unused
def _clamp_scalars_straight_through(x: Tensor, min_val: float, max_val: float) -> Tensor:
    return _StraightThrough.apply(x, "clamp", min_val, max_val)


class _AbsBinarySignGrad(torch.autograd.Function):
    """``|x|`` forward, ``binary_sign(x)`` times the incoming gradient backward (0 at ±inf)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.abs(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # 0 at infinities, as the scripted composition gives.
        return torch.where(x >= 0, grad, -grad).masked_fill_(torch.isinf(x), 0.0)


@torch.jit.unused
def _abs_binary_sign_grad_eager(x: Tensor) -> Tensor:
    return _AbsBinarySignGrad.apply(x)


class _ClampStraightThrough(torch.autograd.Function):
    """``torch.clamp(x, min, max)`` forward, identity backward to ``x`` (none to the bounds)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
        return torch.clamp(x, min_val, max_val)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


@torch.jit.unused
def _clamp_straight_through(x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
    return _ClampStraightThrough.apply(x, min_val, max_val)


def round_ste(x: Tensor) -> Tensor:
    """Round half to even; gradient 1."""
    if torch.jit.is_scripting():
        return _pass_through(torch.round(x), x)
    return _straight_through(x, "round")


def floor_ste(x: Tensor) -> Tensor:
    """Floor; gradient 1."""
    if torch.jit.is_scripting():
        return _pass_through(torch.floor(x), x)
    return _straight_through(x, "floor")


def ceil_ste(x: Tensor) -> Tensor:
    """Ceil; gradient 1."""
    if torch.jit.is_scripting():
        return _pass_through(torch.ceil(x), x)
    return _straight_through(x, "ceil")


def round_to_zero_ste(x: Tensor) -> Tensor:
    """Truncate towards zero; gradient 1."""
    if torch.jit.is_scripting():
        return _pass_through(torch.trunc(x), x)
    return _straight_through(x, "trunc")


def stochastic_round_ste(x: Tensor) -> Tensor:
    """Round down or up at random, up with probability ``x - floor(x)`` (unbiased); gradient 1.

    The coin is drawn against the exact fraction ``x - floor(x)`` rather than taking
    ``floor(x + u)``: that sum rounds in float32, so it can round an integer up (about half the
    time from ``2^22`` on, where the float spacing is 0.5 or 1), biasing large inputs."""
    floor = torch.floor(x)
    up = torch.rand_like(x) < x - floor
    return _pass_through(floor + up.to(x.dtype), x)


def binary_sign(x: Tensor) -> Tensor:
    """``+1`` for ``x >= 0``, ``-1`` otherwise (zero maps to ``+1``, unlike ``torch.sign``)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def binary_sign_ste(x: Tensor) -> Tensor:
    """:func:`binary_sign`; gradient 1."""
    return _pass_through(binary_sign(x), x)


def ternary_sign_ste(x: Tensor) -> Tensor:
    """``torch.sign`` (values in ``{-1, 0, 1}``); gradient 1."""
    # torch.sign maps NaN to 0; the pass-through keeps a NaN input visible.
    return _pass_through(torch.sign(x), x)


class _TensorClamp(torch.autograd.Function):
    """``torch.clamp`` whose gradient is exactly 1 inside the closed range (``torch.clamp``
    splits it at a bound), 0 outside, and goes to a bound where that bound clamps."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
        ctx.save_for_backward(x, min_val, max_val)
        return torch.clamp(x, min_val, max_val)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, min_val, max_val = ctx.saved_tensors
        below, above = x < min_val, x > max_val
        grad_x = grad.masked_fill(below | above, 0.0) if ctx.needs_input_grad[0] else None
        grad_min = _sum_to(grad * below, min_val) if ctx.needs_input_grad[1] else None
        grad_max = _sum_to(grad * above, max_val) if ctx.needs_input_grad[2] else None
        return grad_x, grad_min, grad_max


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` summed over the dimensions ``like`` was broadcast along."""
    return grad.sum_to_size(like.shape) if like.dim() else grad.sum()


@torch.jit.unused
def _tensor_clamp_eager(x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
    return _TensorClamp.apply(x, min_val, max_val)


def tensor_clamp(x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
    """Clamp to broadcastable tensor bounds; gradient 1 inside the bounds, 0 outside (and to
    a bound where it clamps, so a learned clipping range gets its gradient)."""
    if torch.jit.is_scripting():
        return torch.where(x > max_val, max_val, torch.where(x < min_val, min_val, x))
    return _tensor_clamp_eager(x, min_val, max_val)


def tensor_clamp_ste(x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
    """Clamp to broadcastable tensor bounds; gradient 1 everywhere."""
    if torch.jit.is_scripting():
        return _pass_through(tensor_clamp(x, min_val, max_val), x)
    return _clamp_straight_through(x, min_val, max_val)


def scalar_clamp_ste(x: Tensor, min_val: float, max_val: float) -> Tensor:
    """Clamp to scalar bounds; gradient 1 everywhere."""
    if torch.jit.is_scripting():
        return _pass_through(torch.clamp(x, min_val, max_val), x)
    return _clamp_scalars_straight_through(x, min_val, max_val)


def scalar_clamp_min_ste(x: Tensor, min_val: float) -> Tensor:
    """Clamp from below to a scalar; gradient 1 everywhere (a scale stuck at its floor still learns)."""
    if torch.jit.is_scripting():
        return _pass_through(torch.clamp_min(x, min_val), x)
    return _clamp_min_straight_through(x, min_val)


def abs_binary_sign_grad(x: Tensor) -> Tensor:
    """``|x|`` whose gradient is :func:`binary_sign` of ``x``: like ``abs`` but with gradient
    ``+1`` instead of ``0`` at ``x == 0``, so a scale that reaches zero can still move."""
    if torch.jit.is_scripting():
        return torch.abs(x).detach() - binary_sign(x).detach() * _zero_with_identity_gradient(x)
    return _abs_binary_sign_grad_eager(x)
