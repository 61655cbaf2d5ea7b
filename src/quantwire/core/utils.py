"""Small pieces shared by core modules: constant buffers, step counters, argument checks."""


import math
from typing import Any

import torch
from torch import Tensor

from quantwire.errors import QuantConfigError
from quantwire.jit import ScriptModule, script_method

MAX_BIT_WIDTH = 32


class StatelessBuffer(ScriptModule):
    """A constant tensor that follows ``.to()`` and ``.cuda()`` but is not part of the state dict.

    (A buffer that skips itself when saving and loading: TorchScript modules do not support
    ``persistent=False`` buffers.)
    """

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    @script_method
    def forward(self) -> Tensor:
        return self.value

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        pass

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        pass


class StepCounterState:
    """Mixin persisting a module's Python-int ``counter`` in its ``state_dict``.

    The counter is a plain ``int`` so that hot paths branch on it without a device sync; it is
    saved as the module's ``_extra_state`` tensor (safetensors- and ``weights_only``-friendly).
    """

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.counter, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        self.counter = int(state)


def check_bit_width(bit_width: Any, name: str = "bit_width") -> int:
    """``bit_width`` as an ``int`` in ``[1, 32]``, or a :class:`QuantConfigError` naming it."""
    if isinstance(bit_width, Tensor) and bit_width.numel() == 1:
        bit_width = bit_width.item()
    valid = isinstance(bit_width, int | float) and not isinstance(bit_width, bool)
    if not valid or not math.isfinite(bit_width) or bit_width != int(bit_width):
        raise QuantConfigError(f"{name} must be a whole number of bits, got {bit_width!r}")
    if not 1 <= bit_width <= MAX_BIT_WIDTH:
        raise QuantConfigError(f"{name} must be between 1 and {MAX_BIT_WIDTH}, got {int(bit_width)}")
    return int(bit_width)


def positive_finite_tensor(value: Any, name: str) -> Tensor:
    """``value`` as a detached float tensor whose elements are all finite and positive."""
    tensor = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if tensor.numel() == 0:
        raise QuantConfigError(f"{name} is empty")
    if not bool(torch.isfinite(tensor).all()) or not bool((tensor > 0).all()):
        bad = tensor[~(torch.isfinite(tensor) & (tensor > 0))].flatten()[:4].tolist()
        raise QuantConfigError(f"{name} must be finite and positive, got {bad} among its values")
    return tensor


def check_shape(shape: Any, name: str) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints."""
    if isinstance(shape, torch.Size | tuple | list) and all(isinstance(d, int) and d >= 0 for d in shape):
        return tuple(shape)
    raise QuantConfigError(f"{name} must be a tuple of non-negative ints, got {shape!r}")
