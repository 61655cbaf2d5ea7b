"""Straight-through estimators (STE).

Each ``*_ste`` function computes a non-differentiable operation in the forward pass and lets
the gradient through in the backward pass as the estimator defines it. They are written as
``forward.detach() - (x.detach() - x)``, with that difference taken as 0 where ``x`` is
infinite: the forward value is exactly the operation's result, bit for bit (``x.detach() - x``
is an exact ``+0.0`` for finite ``x``, and subtracting it keeps the sign of a ``-0.0`` result,
which adding it would not; the ``inf - inf`` of an infinite ``x`` would be NaN), a NaN ``x``
stays NaN, the gradient with respect to ``x`` is exactly the identity (0 at infinities), and
the code stays scriptable by TorchScript and traceable by ``torch.compile`` without custom
autograd functions.
"""

import torch
from torch import Tensor


def _zero_with_identity_gradient(x: Tensor) -> Tensor:
    """``+0.0`` (NaN where ``x`` is NaN) whose gradient with respect to ``x`` is -1 (0 at ±inf)."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x.detach() - x)


def _pass_through(forward: Tensor, x: Tensor) -> Tensor:
    """``forward`` in the forward pass, the identity gradient with respect to ``x``."""
    return forward.detach() - _zero_with_identity_gradient(x)


def round_ste(x: Tensor) -> Tensor:
    """Round half to even; gradient 1."""
    return _pass_through(torch.round(x), x)


def floor_ste(x: Tensor) -> Tensor:
    """Floor; gradient 1."""
    return _pass_through(torch.floor(x), x)


def ceil_ste(x: Tensor) -> Tensor:
    """Ceil; gradient 1."""
    return _pass_through(torch.ceil(x), x)


def round_to_zero_ste(x: Tensor) -> Tensor:
    """Truncate towards zero; gradient 1."""
    return _pass_through(torch.trunc(x), x)


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
    return _pass_through(torch.sign(x), x)


def tensor_clamp(x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
    """Clamp to broadcastable tensor bounds; gradient 1 inside the bounds, 0 outside."""
    return torch.where(x > max_val, max_val, torch.where(x < min_val, min_val, x))


def tensor_clamp_ste(x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
    """Clamp to broadcastable tensor bounds; gradient 1 everywhere."""
    return _pass_through(tensor_clamp(x, min_val, max_val), x)


def scalar_clamp_ste(x: Tensor, min_val: float, max_val: float) -> Tensor:
    """Clamp to scalar bounds; gradient 1 everywhere."""
    return _pass_through(torch.clamp(x, min_val, max_val), x)


def scalar_clamp_min_ste(x: Tensor, min_val: float) -> Tensor:
    """Clamp from below to a scalar; gradient 1 everywhere (a scale stuck at its floor still learns)."""
    return _pass_through(torch.clamp_min(x, min_val), x)


def abs_binary_sign_grad(x: Tensor) -> Tensor:
    """``|x|`` whose gradient is :func:`binary_sign` of ``x``: like ``abs`` but with gradient
    ``+1`` instead of ``0`` at ``x == 0``, so a scale that reaches zero can still move."""
    return torch.abs(x).detach() - binary_sign(x).detach() * _zero_with_identity_gradient(x)
