"""Binary quantization: ``±scale``."""

import torch
from torch import Tensor, nn

from quantwire.core.bit_width import BitWidthConst
from quantwire.core.function_wrapper.ops import TensorClamp
from quantwire.core.quant.delay import DelayWrapper
from quantwire.core.utils import StatelessBuffer
from quantwire.errors import QuantConfigError
from quantwire.function.ste import binary_sign_ste
from quantwire.jit import ScriptModule, script_method


def _check_signed(signed: bool, owner: str) -> None:
    if not signed:
        raise QuantConfigError(f"{owner} quantizes to signed values only; got signed={signed!r}")


class BinaryQuant(ScriptModule):
    """``binary_sign(x) * scale`` with ``scale = scaling_impl(x)``; gradient passes straight
    through. Returns ``(value, scale, zero_point=0, bit_width=1)``."""

    def __init__(self, scaling_impl: nn.Module, signed: bool = True, quant_delay_steps: int = 0) -> None:
        super().__init__()
        _check_signed(signed, "BinaryQuant")
        self.signed = True
        self.scaling_impl = scaling_impl
        self.bit_width = BitWidthConst(1)
        self.zero_point = StatelessBuffer(torch.tensor(0.0))
        self.delay_wrapper = DelayWrapper(quant_delay_steps)

    @script_method
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        scale = self.scaling_impl(x)
        y = self.delay_wrapper(x, binary_sign_ste(x) * scale)
        return y, scale, self.zero_point(), self.bit_width()


class ClampedBinaryQuant(ScriptModule):
    """:class:`BinaryQuant` after clamping ``x`` to ``[-scale, scale]`` with
    ``tensor_clamp_impl``: the gradient is 0 outside that range (by default), as in BinaryNet."""

    def __init__(
        self,
        scaling_impl: nn.Module,
        signed: bool = True,
        tensor_clamp_impl: nn.Module | None = None,
        quant_delay_steps: int = 0,
    ) -> None:
        super().__init__()
        _check_signed(signed, "ClampedBinaryQuant")
        self.scaling_impl = scaling_impl
        self.tensor_clamp_impl = TensorClamp() if tensor_clamp_impl is None else tensor_clamp_impl
        self.bit_width = BitWidthConst(1)
        self.zero_point = StatelessBuffer(torch.tensor(0.0))
        self.delay_wrapper = DelayWrapper(quant_delay_steps)

    @script_method
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        scale = self.scaling_impl(x)
        clamped = self.tensor_clamp_impl(x, -scale, scale)
        y = self.delay_wrapper(x, binary_sign_ste(clamped) * scale)
        return y, scale, self.zero_point(), self.bit_width()
