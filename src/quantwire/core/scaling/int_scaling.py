"""The divisor from a threshold to a scale, for a given integer range."""

from torch import Tensor

from quantwire.function.int_range import int_scaling_divisor, max_int
from quantwire.jit import ScriptModule, script_method


class IntScaling(ScriptModule):
    """``2^(b-1)`` for signed (``2^(b-1) - 1`` narrow), ``max_int`` for unsigned: the threshold
    then is exactly the magnitude of the range's far end."""

    def __init__(self, signed: bool, narrow_range: bool) -> None:
        super().__init__()
        self.signed = bool(signed)
        self.narrow_range = bool(narrow_range)

    @script_method
    def forward(self, bit_width: Tensor) -> Tensor:
        return int_scaling_divisor(self.signed, self.narrow_range, bit_width)


class PowerOfTwoIntScaling(ScriptModule):
    """``max_int + 1`` (``2^(b-1)`` signed, ``2^b`` unsigned): a power of two, so that a
    power-of-two threshold gives a power-of-two scale (fixed-point quantizers)."""

    def __init__(self, signed: bool) -> None:
        super().__init__()
        self.signed = bool(signed)

    @script_method
    def forward(self, bit_width: Tensor) -> Tensor:
        return max_int(self.signed, False, bit_width) + 1
