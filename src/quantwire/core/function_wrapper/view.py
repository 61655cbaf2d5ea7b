"""Views that decide which elements a statistic (and so a scale) is shared over.

Every view turns a tensor into a 2-D ``(groups, elements)`` matrix (``forward``); statistics
reduce its last dimension to ``(groups, 1)``; ``restore`` turns that column back into a tensor
that broadcasts against the original input. Per-tensor, per-channel, per-token and per-group
quantization are then the same code with a different view.
"""

import torch
from torch import Tensor

from quantwire.errors import QuantConfigError
from quantwire.jit import ScriptModule, script_method


class OverTensorView(ScriptModule):
    """One statistic for the whole tensor; restores to a 0-d tensor."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(1, -1)

    @script_method
    def restore(self, stats: Tensor, x: Tensor) -> Tensor:
        return stats.reshape(())


class OverChannelView(ScriptModule):
    """One statistic per index of ``channel_dim`` (0: a weight's output channels; 1: the channels
    of an NCHW activation; -1: the features of a Linear activation)."""

    def __init__(self, channel_dim: int = 0) -> None:
        super().__init__()
        self.channel_dim = int(channel_dim)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return torch.movedim(x, self.channel_dim, 0).reshape(x.shape[self.channel_dim], -1)

    @script_method
    def restore(self, stats: Tensor, x: Tensor) -> Tensor:
        shape: list[int] = [1] * x.dim()
        dim = self.channel_dim if self.channel_dim >= 0 else self.channel_dim + x.dim()
        shape[dim] = x.shape[dim]
        return stats.reshape(shape)


class OverOutputChannelView(OverChannelView):
    """Per output channel of a weight (``channel_dim=0``; ``1`` for transposed convolutions)."""


class OverTokenView(ScriptModule):
    """One statistic per token: per row of the last dimension (per-token activation scaling)."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    @script_method
    def restore(self, stats: Tensor, x: Tensor) -> Tensor:
        shape: list[int] = list(x.shape)
        shape[-1] = 1
        return stats.reshape(shape)


class OverBatchOverTensorView(ScriptModule):
    """One statistic per sample of the batch (dimension 0)."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    @script_method
    def restore(self, stats: Tensor, x: Tensor) -> Tensor:
        shape: list[int] = [1] * x.dim()
        shape[0] = x.shape[0]
        return stats.reshape(shape)


class OverGroupView(ScriptModule):
    """One statistic per block of ``group_size`` consecutive elements along ``group_dim``
    (per-group weight quantization, e.g. groups of 128 input features).

    ``restore`` expands each group's statistic over the group, giving a tensor of the input's
    shape, so that the scale broadcasts as every other scale does.
    """

    def __init__(self, group_size: int, group_dim: int = -1) -> None:
        super().__init__()
        if int(group_size) < 1:
            raise QuantConfigError(f"group_size must be a positive number of elements, got {group_size!r}")
        self.group_size = int(group_size)
        self.group_dim = int(group_dim)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[self.group_dim]
        if length % self.group_size != 0:
            raise RuntimeError(
                "OverGroupView: dimension "
                + str(self.group_dim)
                + " has "
                + str(length)
                + " elements, not a multiple of group_size="
                + str(self.group_size)
            )
        return torch.movedim(x, self.group_dim, -1).reshape(-1, self.group_size)

    @script_method
    def restore(self, stats: Tensor, x: Tensor) -> Tensor:
        moved = torch.movedim(x, self.group_dim, -1)
        expanded = stats.expand(stats.shape[0], self.group_size).reshape(moved.shape)
        return torch.movedim(expanded, -1, self.group_dim)
