"""Delaying quantization for the first training steps."""

from typing import Any

import torch
from torch import Tensor

from quantwire.core.utils import StepCounterState
from quantwire.errors import QuantConfigError
from quantwire.jit import ScriptModule, script_method


class DelayWrapper(StepCounterState, ScriptModule):
    """Returns the float input instead of its quantized value for the first
    ``quant_delay_steps`` training calls, then the quantized value (always, in eval)."""

    set_counter = script_method(StepCounterState.set_counter)
    pull_counter = script_method(StepCounterState.pull_counter)

    def __init__(self, quant_delay_steps: int = 0) -> None:
        super().__init__()
        if int(quant_delay_steps) < 0:
            raise QuantConfigError(f"quant_delay_steps must be >= 0, got {quant_delay_steps!r}")
        self.quant_delay_steps = int(quant_delay_steps)
        self.set_counter_limit(self.quant_delay_steps)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        # Without a delay there is no state: a float checkpoint must load without this key.
        if self.quant_delay_steps:
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        if self.quant_delay_steps:
            super()._load_from_state_dict(state_dict, prefix, *args)

    @script_method
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.quant_delay_steps == 0:
            return y
        if not torch.jit.is_scripting():
            if torch.compiler.is_compiling():
                return self.compiled_forward(x, y)
        self.pull_counter()
        if self.training and self.counter < self.quant_delay_steps:
            self.set_counter(self.counter + 1)
            return x
        return y

    @torch.jit.unused
    def compiled_forward(self, x: Tensor, y: Tensor) -> Tensor:
        """:meth:`forward` under ``torch.compile``: counts in ``counter_mirror`` (see
        :class:`~quantwire.core.utils.StepCounterState`), so the graph does not change per step."""
        if not self.training or self.counter_limit_reached:
            return y
        delaying = self.counter_mirror() < self.quant_delay_steps
        self.counter_mirror.value.add_(delaying.to(torch.int64))
        self.counter_in_mirror = True
        return torch.where(delaying, x, y)
