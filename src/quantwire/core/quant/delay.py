"""Delaying quantization for the first training steps."""


from torch import Tensor

from quantwire.core.utils import StepCounterState
from quantwire.errors import QuantConfigError
from quantwire.jit import ScriptModule, script_method


class DelayWrapper(StepCounterState, ScriptModule):
    """Returns the float input instead of its quantized value for the first
    ``quant_delay_steps`` training calls, then the quantized value (always, in eval)."""

    def __init__(self, quant_delay_steps: int = 0) -> None:
        super().__init__()
        if int(quant_delay_steps) < 0:
            raise QuantConfigError(f"quant_delay_steps must be >= 0, got {quant_delay_steps!r}")
        self.quant_delay_steps = int(quant_delay_steps)
        self.counter = 0

    @script_method
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.training and self.counter < self.quant_delay_steps:
            self.counter = self.counter + 1
            return x
        return y
