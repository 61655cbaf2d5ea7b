"""Bit widths as tensors: constant, or learned within a range."""

import torch
from torch import Tensor, nn

from quantwire.core.utils import StatelessBuffer, check_bit_width
from quantwire.errors import QuantConfigError
from quantwire.function.ste import abs_binary_sign_grad, round_ste, scalar_clamp_ste
from quantwire.jit import ScriptModule, script_method


class BitWidthConst(ScriptModule):
    """A fixed bit width (``bit_width`` an integer in ``[1, 32]``).

    ``signed`` (wired from the quantizer when it declares it): a signed integer grid needs at
    least 2 bits; at 1 bit its largest code is 0 and every scale ``threshold / 0`` is infinite.
    """

    def __init__(self, bit_width: int, signed: bool | None = None) -> None:
        super().__init__()
        bit_width = check_bit_width(bit_width)
        if signed is True and bit_width == 1:
            raise QuantConfigError(
                "bit_width=1 with signed=True leaves no positive integer level; use bit_width >= 2, "
                "signed=False, or a binary quantizer (SignedBinaryWeightPerTensorConst)"
            )
        self.bit_width = StatelessBuffer(torch.tensor(float(bit_width)))

    @script_method
    def forward(self) -> Tensor:
        return self.bit_width()


class BitWidthParameter(ScriptModule):
    """A learned bit width starting at ``bit_width``, rounded to an integer and kept within
    ``[min_bit_width, max_bit_width]`` (straight-through gradients)."""

    def __init__(self, bit_width: int, min_bit_width: int = 2, max_bit_width: int = 16) -> None:
        super().__init__()
        bit_width = check_bit_width(bit_width)
        self.min_bit_width = float(check_bit_width(min_bit_width, "min_bit_width"))
        self.max_bit_width = float(check_bit_width(max_bit_width, "max_bit_width"))
        if not self.min_bit_width <= bit_width <= self.max_bit_width:
            raise QuantConfigError(
                f"bit_width {bit_width} must lie in [min_bit_width, max_bit_width] = "
                f"[{int(self.min_bit_width)}, {int(self.max_bit_width)}]"
            )
        self.offset = nn.Parameter(torch.tensor(float(bit_width) - self.min_bit_width))

    @script_method
    def forward(self) -> Tensor:
        bit_width = round_ste(abs_binary_sign_grad(self.offset) + self.min_bit_width)
        return scalar_clamp_ste(bit_width, self.min_bit_width, self.max_bit_width)
