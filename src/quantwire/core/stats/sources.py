"""Where a statistic comes from: computed on every call, tracked at run time, or collected and
then learned. Scaling and zero-point modules are thin compositions of these."""


from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from quantwire.core.utils import StepCounterState, check_shape
from quantwire.errors import QuantConfigError
from quantwire.jit import ScriptModule, script_method


class TensorStats(ScriptModule):
    """``stats_impl`` over ``stats_input_view_shape_impl`` of the input, restored to a tensor
    that broadcasts against the input. Computed on every call (weights, dynamic activations)."""

    def __init__(self, stats_impl: nn.Module, stats_input_view_shape_impl: nn.Module) -> None:
        super().__init__()
        self.stats_impl = stats_impl
        self.view = stats_input_view_shape_impl

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return self.view.restore(self.stats_impl(self.view(x)), x)


class RuntimeStats(StepCounterState, ScriptModule):
    momentum: Optional[float]

    """Statistics of activations tracked in training and frozen in eval.

    In training each call computes the statistic of the batch, folds it into a running buffer
    and returns the batch statistic. ``momentum=None`` keeps the exact average of all batches
    seen; a float gives an exponential moving average (the first batch initialises it). In eval
    the buffer is returned; before any batch was seen, the statistic of the input itself is.
    ``stats_shape`` is the shape of the buffer (``()`` per tensor, e.g. ``(1, C, 1, 1)`` per
    channel of an NCHW activation).
    """

    def __init__(
        self,
        stats_impl: nn.Module,
        stats_input_view_shape_impl: nn.Module,
        stats_shape: Tuple[int, ...] = (),
        momentum: Optional[float] = 0.1,
    ) -> None:
        super().__init__()
        if momentum is not None and not 0.0 < float(momentum) <= 1.0:
            raise QuantConfigError(f"momentum must be in (0, 1] or None, got {momentum!r}")
        self.stats = TensorStats(stats_impl, stats_input_view_shape_impl)
        self.momentum = None if momentum is None else float(momentum)
        self.counter = 0
        self.register_buffer("running", torch.zeros(check_shape(stats_shape, "stats_shape")))

    @script_method
    def update(self, x: Tensor) -> Tensor:
        """Fold the statistic of ``x`` into the running buffer and return it."""
        stats = self.stats(x)
        new = stats.detach().reshape(self.running.shape)
        momentum = self.momentum
        if self.counter == 0:
            self.running.copy_(new)
        elif momentum is None:
            self.running.add_((new - self.running) / (self.counter + 1))
        else:
            self.running.mul_(1.0 - momentum).add_(new * momentum)
        self.counter = self.counter + 1
        return stats

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.update(x)
        if self.counter == 0:
            return self.stats(x)
        return self.running


class ParameterFromRuntimeStats(ScriptModule):
    """A learned parameter initialised from activation statistics.

    For the first ``collect_stats_steps`` training steps it behaves as :class:`RuntimeStats`
    (``momentum=None``: the exact average); then the parameter takes the collected value,
    moved into the domain of ``restrict_value_impl`` (e.g. ``log2`` for a scale learned in the
    log domain), and is learned from then on. During collection the returned statistic is moved
    the same way, so callers always receive a value in the parameter's domain.
    """

    def __init__(
        self,
        collect_stats_steps: int,
        stats_impl: nn.Module,
        stats_input_view_shape_impl: nn.Module,
        restrict_value_impl: nn.Module,
        stats_shape: Tuple[int, ...] = (),
        momentum: Optional[float] = None,
    ) -> None:
        super().__init__()
        if int(collect_stats_steps) < 1:
            raise QuantConfigError(f"collect_stats_steps must be at least 1, got {collect_stats_steps!r}")
        self.collect_stats_steps = int(collect_stats_steps)
        self.runtime_stats = RuntimeStats(stats_impl, stats_input_view_shape_impl, stats_shape, momentum)
        self.restrict_value_impl = restrict_value_impl
        self.value = nn.Parameter(torch.zeros(check_shape(stats_shape, "stats_shape")))

    def is_collecting(self) -> bool:
        """Whether statistics are still being collected (the parameter is not yet in use)."""
        return self.runtime_stats.counter < self.collect_stats_steps

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        counter = self.runtime_stats.counter
        if counter < self.collect_stats_steps:
            if not self.training:
                return self.restrict_value_impl.restrict_init_tensor(self.runtime_stats(x))
            stats = self.runtime_stats.update(x)
            if counter + 1 == self.collect_stats_steps:
                self.value.detach().copy_(self.restrict_value_impl.restrict_init_tensor(self.runtime_stats.running))
            return self.restrict_value_impl.restrict_init_tensor(stats)
        return self.value
