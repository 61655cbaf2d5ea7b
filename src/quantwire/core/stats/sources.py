"""Where a statistic comes from: computed on every call, tracked at run time, or collected and
then learned. Scaling and zero-point modules are thin compositions of these."""

from typing import Any

import torch
import torch.distributed as dist
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
    """Statistics of activations tracked in training and frozen in eval.

    In training each call computes the statistic of the batch, folds it into a running buffer
    and returns the batch statistic. ``momentum=None`` keeps the exact average of all batches
    seen; a float gives an exponential moving average (the first batch initialises it). In eval
    the buffer is returned; before any batch was seen, the statistic of the input itself is.
    ``stats_shape`` is the shape of the buffer (``()`` per tensor, e.g. ``(1, C, 1, 1)`` per
    channel of an NCHW activation).
    """

    set_counter = script_method(StepCounterState.set_counter)
    pull_counter = script_method(StepCounterState.pull_counter)

    momentum: float | None

    def __init__(
        self,
        stats_impl: nn.Module,
        stats_input_view_shape_impl: nn.Module,
        stats_shape: tuple[int, ...] = (),
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        if momentum is not None and not 0.0 < float(momentum) <= 1.0:
            raise QuantConfigError(f"momentum must be in (0, 1] or None, got {momentum!r}")
        self.stats = TensorStats(stats_impl, stats_input_view_shape_impl)
        self.momentum = None if momentum is None else float(momentum)
        self.register_buffer("running", torch.zeros(check_shape(stats_shape, "stats_shape")))

    @script_method
    def update(self, x: Tensor) -> Tensor:
        """Fold the statistic of ``x`` into the running buffer and return it."""
        self.pull_counter()
        stats = self.stats(x)
        new = stats.detach().reshape(self.running.shape)
        momentum = self.momentum
        if self.counter == 0:
            self.running.copy_(new)
        elif momentum is None:
            self.running.add_((new - self.running) / (self.counter + 1))
        else:
            self.running.mul_(1.0 - momentum).add_(new * momentum)
        self.set_counter(self.counter + 1)
        return stats

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if torch.compiler.is_compiling():
                return self.compiled_forward(x)
        if self.training:
            return self.update(x)
        self.pull_counter()
        if self.counter == 0:
            return self.stats(x)
        return self.running

    # torch.compile: the same results, counted in ``counter_mirror`` (see StepCounterState), so
    # that the graph depends on no Python int that changes per step.

    @torch.jit.unused
    def compiled_forward(self, x: Tensor) -> Tensor:
        return self.compiled_update(x) if self.training else self.compiled_frozen(x)

    @torch.jit.unused
    def compiled_update(self, x: Tensor, active: Tensor | None = None) -> Tensor:
        """:meth:`update`, folding and counting only where ``active`` (a bool tensor) is true."""
        stats = self.stats(x)
        new = stats.detach().reshape(self.running.shape)
        count = self.counter_mirror()
        if self.momentum is None:
            folded = self.running + (new - self.running) / (count + 1).to(self.running.dtype)
        else:
            folded = self.running * (1.0 - self.momentum) + new * self.momentum
        if not self.counter_started:
            folded = torch.where(count == 0, new, folded)
        if active is not None:
            folded = torch.where(active, folded, self.running)
        increment = torch.ones_like(count) if active is None else active.to(count.dtype)
        self.running.copy_(folded)
        self.counter_mirror.value.add_(increment)
        self.counter_in_mirror = True
        return stats

    @torch.jit.unused
    def compiled_frozen(self, x: Tensor) -> Tensor:
        """The eval branch of :meth:`forward`."""
        if self.counter_started:
            return self.running
        stats = self.stats(x)
        return torch.where(self.counter_mirror() == 0, stats, self.running.reshape(stats.shape))


class ParameterFromRuntimeStats(ScriptModule):
    """A learned parameter initialised from activation statistics.

    For the first ``collect_stats_steps`` training steps it behaves as :class:`RuntimeStats`
    (``momentum=None``: the exact average); then the parameter takes the collected value,
    moved into the domain of ``restrict_value_impl`` (e.g. ``log2`` for a scale learned in the
    log domain), and is learned from then on. During collection the returned statistic is moved
    the same way, so callers always receive a value in the parameter's domain.

    ``init_min_val`` floors the collected statistic before it becomes the parameter (a scale's
    ``scaling_min_val``): a statistic of 0, from activations that were all zero while
    collecting, would otherwise start a log-domain parameter at ``-inf``, which no gradient can
    move and whose gradient is NaN.

    Under ``torch.distributed`` (initialised, more than one rank) the statistic is averaged over
    the ranks of the default process group when collection ends in an eager training forward,
    right before it becomes the parameter (:meth:`average_statistic_over_ranks`: one collective,
    once), so that every rank starts the parameter from the same value; DDP never re-broadcasts
    parameters, and a per-rank start would stay different on each rank for the whole run. Every
    rank must therefore run the same number of training forwards through this module while it
    collects, as DDP training does. Code compiled by TorchScript (``QUANTWIRE_JIT=1``) or
    ``torch.compile`` (:meth:`compiled_forward`) does not synchronise: calibrate first
    (:func:`quantwire.calibrate`, then :func:`quantwire.distributed.sync_quant_statistics`).
    """

    init_min_val: float | None

    def __init__(
        self,
        collect_stats_steps: int,
        stats_impl: nn.Module,
        stats_input_view_shape_impl: nn.Module,
        restrict_value_impl: nn.Module,
        stats_shape: tuple[int, ...] = (),
        momentum: float | None = None,
        init_min_val: float | None = None,
    ) -> None:
        super().__init__()
        if int(collect_stats_steps) < 1:
            raise QuantConfigError(f"collect_stats_steps must be at least 1, got {collect_stats_steps!r}")
        self.collect_stats_steps = int(collect_stats_steps)
        self.runtime_stats = RuntimeStats(stats_impl, stats_input_view_shape_impl, stats_shape, momentum)
        self.runtime_stats.set_counter_limit(self.collect_stats_steps)
        self.restrict_value_impl = restrict_value_impl
        self.init_min_val = None if init_min_val is None else float(init_min_val)
        self.value = nn.Parameter(torch.zeros(check_shape(stats_shape, "stats_shape")))

    def is_collecting(self) -> bool:
        """Whether statistics are still being collected (the parameter is not yet in use)."""
        self.runtime_stats.sync_counter()
        return self.runtime_stats.counter < self.collect_stats_steps

    @torch.jit.unused
    def average_statistic_over_ranks(self, group: Any = None) -> bool:
        """Replace the collected statistic (``runtime_stats.running``) by its average over the
        ranks of ``group`` (``None``: the default process group). A collective: every rank of
        ``group`` must call it. Returns whether it averaged (False without an initialised
        ``torch.distributed`` or with a single rank)."""
        if not (dist.is_available() and dist.is_initialized()):
            return False
        ranks = dist.get_world_size(group)
        if ranks < 2:
            return False
        running = self.runtime_stats.running
        with torch.no_grad():
            # gloo has no ReduceOp.AVG: sum, then divide (the same arithmetic on every rank).
            dist.all_reduce(running, op=dist.ReduceOp.SUM, group=group)
            running.div_(ranks)
        return True

    @script_method
    def collected_value(self) -> Tensor:
        """What the parameter starts at: the collected statistic (floored by ``init_min_val``)
        moved into the parameter's domain."""
        running = self.runtime_stats.running
        init_min_val = self.init_min_val
        if init_min_val is not None:
            running = torch.clamp_min(running, init_min_val)
        return self.restrict_value_impl.restrict_init_tensor(running)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if torch.compiler.is_compiling():
                return self.compiled_forward(x)
        self.runtime_stats.pull_counter()
        counter = self.runtime_stats.counter
        if counter < self.collect_stats_steps:
            if not self.training:
                return self.restrict_value_impl.restrict_init_tensor(self.runtime_stats(x))
            stats = self.runtime_stats.update(x)
            if counter + 1 == self.collect_stats_steps:
                if not torch.jit.is_scripting():
                    self.average_statistic_over_ranks()
                self.value.detach().copy_(self.collected_value())
            return self.restrict_value_impl.restrict_init_tensor(stats)
        return self.value

    @torch.jit.unused
    def compiled_forward(self, x: Tensor) -> Tensor:
        """:meth:`forward` under ``torch.compile``, without branching on the step count: while
        collecting, both phases are computed and ``torch.where`` picks one (so the parameter gets
        a zero gradient where eager code leaves it at ``None``). Once the host knows collection
        is over (``counter_limit_reached``, set on the next eager call, ``train()``/``eval()`` or
        ``state_dict()``), the graph is the parameter alone, as in eager mode. No collective runs
        here: under ``torch.distributed`` each rank starts the parameter from its own statistic
        (calibrate and synchronise before compiling; see the class docstring)."""
        source = self.runtime_stats
        if source.counter_limit_reached:
            return self.value
        count = source.counter_mirror()
        collecting = count < self.collect_stats_steps
        if self.training:
            finishing = count == self.collect_stats_steps - 1
            stats = source.compiled_update(x, collecting)
            self.value.detach().copy_(torch.where(finishing, self.collected_value(), self.value.detach()))
        else:
            stats = source.compiled_frozen(x)
        domain_stats = self.restrict_value_impl.restrict_init_tensor(stats)
        return torch.where(collecting, domain_stats, self.value.reshape(domain_stats.shape))
