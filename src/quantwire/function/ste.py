"""Straight-through estimators (STE).

Each ``*_ste`` function computes a non-differentiable operation in the forward pass and lets
the gradient through in the backward pass as the estimator defines it. They are written as
``forward.detach() + (x - x.detach())``: the forward value is exactly the operation's result
(``x - x.detach()`` is an exact zero for finite ``x``), the gradient with respect to ``x`` is
exactly the identity, and the code stays scriptable by TorchScript and traceable by
``torch.compile`` without custom autograd functions.
"""


import torch
from torch import Tensor


def _pass_through(forward: Tensor, x: Tensor) -> Tensor:
    """``forward`` in the forward pass, the identity gradient with respect to ``x``."""
    return forward.detach() + (x - x.detach())


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
    """Round down or up at random, up with probability ``x - floor(x)`` (unbiased); gradient 1."""
    return _pass_through(torch.floor(x + torch.rand_like(x)), x)


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
    return torch.abs(x).detach() + binary_sign(x).detach() * (x - x.detach())
