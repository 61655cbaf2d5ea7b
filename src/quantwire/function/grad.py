"""Functions that act on gradients only: scaling them (LSQ) and quantizing them."""

from collections.abc import Callable

import torch
from torch import Tensor


def scale_gradient(x: Tensor, factor: Tensor) -> Tensor:
    """``x`` in the forward pass (bit for bit); its gradient multiplied by ``factor``.

    Written as ``x.detach() + (x * factor - (x * factor).detach())``: the added term is exactly
    zero, so the value is ``x`` itself, not the ``x - x*g + x*g`` that a rounding could move.
    """
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())


class _QuantizeGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, quantize: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.quantize = quantize
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        with torch.no_grad():
            return ctx.quantize(grad), None


def quantize_gradient(x: Tensor, quantize: Callable[[Tensor], Tensor]) -> Tensor:
    """``x`` unchanged in the forward pass; in the backward pass the gradient arriving at it is
    replaced by ``quantize(gradient)`` (e.g. an FP8 E5M2 fake-quantizer) before flowing on."""
    return _QuantizeGradient.apply(x, quantize)
