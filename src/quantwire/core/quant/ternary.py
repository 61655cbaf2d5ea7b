"""Ternary quantization: ``{-scale, 0, +scale}``."""

import torch
from torch import Tensor, nn

from quantwire.core.bit_width import BitWidthConst
from quantwire.core.quant.binary import _check_signed
from quantwire.core.quant.delay import DelayWrapper
from quantwire.core.utils import StatelessBuffer
from quantwire.errors import QuantConfigError
from quantwire.function.ste import ternary_sign_ste
from quantwire.jit import ScriptModule, script_method


class TernaryQuant(ScriptModule):
    """``sign(x) * scale`` where ``|x| > threshold * scale``, else 0; gradient passes straight
    through. Returns ``(value, scale, zero_point=0, bit_width=2)``."""

    def __init__(
        self, scaling_impl: nn.Module, threshold: float = 0.5, signed: bool = True, quant_delay_steps: int = 0
    ) -> None:
        super().__init__()
        _check_signed(signed, "TernaryQuant")
        if not 0.0 <= float(threshold) <= 1.0:
            raise QuantConfigError(f"TernaryQuant threshold must be in [0, 1], got {threshold!r}")
        self.signed = True
        self.scaling_impl = scaling_impl
        self.threshold = float(threshold)
        self.bit_width = BitWidthConst(2)
        self.zero_point = StatelessBuffer(torch.tensor(0.0))
        self.delay_wrapper = DelayWrapper(quant_delay_steps)

    @script_method
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        scale = self.scaling_impl(x)
        keep = (torch.abs(x) > self.threshold * scale).to(x.dtype)
        y = self.delay_wrapper(x, keep * ternary_sign_ste(x) * scale)
        return y, scale, self.zero_point(), self.bit_width()
