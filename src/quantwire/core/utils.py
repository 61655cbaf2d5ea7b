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
    """Mixin of modules that count training steps in a Python-int ``counter``, persisted in
    their ``state_dict``.

    The counter is a plain ``int`` so that eager hot paths branch on it without a device sync;
    it is saved as the module's ``_extra_state`` tensor (safetensors- and ``weights_only``-friendly).

    ``torch.compile`` treats an int attribute as a constant and guards on it: a counter that
    changes on every call would recompile the graph on every training step (and, with
    ``fullgraph=True``, fail once ``torch._dynamo.config.recompile_limit`` is reached). So
    compiled code (the ``compiled_*`` methods) never reads ``counter``: it counts in
    ``counter_mirror``, a tensor that eager code keeps equal to ``counter``, and sets
    ``counter_in_mirror``; the next eager call, ``state_dict()``, ``train()``/``eval()`` and
    ``sync_counter()`` bring the int up to date. What compiled code branches on are two host
    flags that flip at most once, ``counter_started`` (``counter > 0``) and
    ``counter_limit_reached`` (``counter >= counter_limit``; ``counter_limit = -1``: no limit).
    The counter only grows (or is loaded), so a flag that says True is true even while the int
    lags behind the mirror.

    A module using it derives from ``(StepCounterState, ScriptModule)`` and re-exports the two
    scriptable methods, so that ``QUANTWIRE_JIT=1`` compiles them for it::

        set_counter = script_method(StepCounterState.set_counter)
        pull_counter = script_method(StepCounterState.pull_counter)
    """

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0
        self.counter_limit = -1
        self.counter_started = False
        self.counter_limit_reached = False
        self.counter_in_mirror = False
        self.counter_mirror = StatelessBuffer(torch.zeros((), dtype=torch.int64))

    def set_counter(self, value: int) -> None:
        """Set ``counter``, its mirror and its flags."""
        self.counter = value
        self.counter_mirror.value.fill_(value)
        self.counter_in_mirror = False
        self.counter_started = value > 0
        self.counter_limit_reached = self.counter_limit >= 0 and value >= self.counter_limit

    def pull_counter(self) -> None:
        """Take the count from the mirror after compiled calls advanced it."""
        if self.counter_in_mirror:
            self.set_counter(int(self.counter_mirror().item()))

    def set_counter_limit(self, limit: int) -> None:
        """The count at which ``counter_limit_reached`` becomes true (``-1``: never)."""
        self.counter_limit = int(limit)
        self.set_counter(self.counter)

    def sync_counter(self) -> None:
        """Bring the Python-int ``counter`` up to date (after compiled calls)."""
        self.pull_counter()

    def train(self, mode: bool = True) -> Any:
        if mode != self.training:
            self.sync_counter()  # a phase change: the next compiled graph sees current flags
        return super().train(mode)

    def get_extra_state(self) -> Tensor:
        self.sync_counter()
        return torch.tensor(self.counter, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        self.set_counter(int(state))


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


def non_finite_kind(tensor: Tensor) -> str | None:
    """``"NaN"`` or ``"Inf"`` when the floating-point ``tensor`` holds such a value (NaN named
    first), None when it is finite or not floating point: for error messages that name the value."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return None
    return "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
