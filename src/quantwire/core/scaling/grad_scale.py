"""Gradient scaling of a learned scale (and zero point): LSQ's ``g = 1 / sqrt(N * Qp)``.

A :class:`~quantwire.core.quant.RescalingIntQuant` passes its scale and zero point through its
``grad_scale_impl`` as ``grad_scale_impl(value, x, bit_width)``; the value is returned
unchanged and only its gradient is scaled.
"""

import torch
from torch import Tensor

from quantwire.function.grad import scale_gradient
from quantwire.function.int_range import max_int
from quantwire.jit import ScriptModule, script_method


class NoGradScale(ScriptModule):
    """Leaves the gradient alone (every quantizer but LSQ's)."""

    @script_method
    def forward(self, value: Tensor, x: Tensor, bit_width: Tensor) -> Tensor:
        return value


class LsqGradScale(ScriptModule):
    """Multiplies the gradient by ``1 / sqrt(N * Qp)`` (Esser et al., 2020, "Learned Step Size
    Quantization"), where ``Qp = max_int`` of the quantizer's range and ``N`` is the number of
    elements of ``x`` that share each value of the scale: ``x.numel() / value.numel()`` for the
    value as it broadcasts against ``x`` (all elements for a per-tensor scale, including the
    batch; the elements of one channel for a per-channel weight scale).

    Without it the step size's gradient grows with ``N`` and its updates dwarf the weights'.
    """

    def __init__(self, signed: bool, narrow_range: bool = False) -> None:
        super().__init__()
        self.signed = bool(signed)
        self.narrow_range = bool(narrow_range)

    @script_method
    def forward(self, value: Tensor, x: Tensor, bit_width: Tensor) -> Tensor:
        elements = float(x.numel()) / float(max(value.numel(), 1))
        qp = max_int(self.signed, self.narrow_range, bit_width)
        factor = torch.rsqrt(qp * elements)
        return scale_gradient(value, factor)
