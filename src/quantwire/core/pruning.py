"""Pruning masks: which weights a layer keeps, applied before the weight is quantized.

A mask module holds the mask as a persistent bool buffer ``mask`` (saved in the state dict, so
a pruned checkpoint reloads its exact sparsity pattern) and is called as ``pruning(w)``: ``w``
with the pruned entries set to zero, whose gradient there is zero. The mask is computed by
the plain-Python method ``init_mask(weight)`` (the weight proxy calls it when it builds the
quantizer; call it again to recompute the mask, e.g. after training). Until then the mask is
a single ``True``: nothing is pruned.

Ties between equal magnitudes are broken by position (flattened index): the earlier element
is kept, so the same weight always gives the same mask.
"""

import math
from typing import Any

import torch
from torch import Tensor

from quantwire.errors import QuantConfigError
from quantwire.jit import ScriptModule, script_method

__all__ = ["MagnitudeMask", "NMMask"]


def _check_sparsity(sparsity: Any) -> float:
    valid = isinstance(sparsity, int | float) and not isinstance(sparsity, bool)
    if not valid or not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0:
        raise QuantConfigError(f"pruning_sparsity must be a fraction in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuantConfigError(f"{name} must be an int, got {value!r}")
    return value


def _keep_largest(magnitudes: Tensor, keep: int) -> Tensor:
    """A bool tensor like ``magnitudes`` (compared along its last dim) that is True at the
    ``keep`` largest entries of each row; equal magnitudes: the earlier one is kept."""
    order = torch.argsort(magnitudes, dim=-1, descending=True, stable=True)
    kept = torch.zeros(magnitudes.shape, dtype=torch.bool, device=magnitudes.device)
    return kept.scatter_(-1, order[..., :keep], True)


class _MaskState:
    """What both masks share: computing, replacing and loading the ``mask`` buffer. (A plain
    mixin, as :class:`~quantwire.core.utils.StepCounterState`: each mask is ``(_MaskState,
    ScriptModule)`` and defines its own scripted ``forward``.)"""

    def _register_mask(self) -> None:
        self.register_buffer("mask", torch.ones((), dtype=torch.bool))

    def compute_mask(self, weight: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover - every mask defines it

    def init_mask(self, weight: Tensor) -> None:
        """Compute the mask from ``weight`` (on its device) and keep it in ``mask``."""
        with torch.no_grad():
            mask = self.compute_mask(weight.detach())
        if mask.shape == self.mask.shape and mask.device == self.mask.device:
            self.mask.copy_(mask)  # in place: anything keyed on the buffer's version sees the change
        else:
            self.mask = mask

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, *args: Any
    ) -> None:
        # A saved mask has the weight's shape; a mask that was never initialised is a scalar:
        # take the saved shape before loading (the values are copied by the default loader).
        saved = state_dict.get(prefix + "mask")
        if isinstance(saved, Tensor) and saved.shape != self.mask.shape:
            self.mask = torch.ones(saved.shape, dtype=torch.bool, device=self.mask.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)


class MagnitudeMask(_MaskState, ScriptModule):
    """Unstructured magnitude pruning: keeps the largest-``|w|`` entries of the whole weight and
    prunes exactly ``round(pruning_sparsity * w.numel())`` of them (``pruning_sparsity`` in
    ``[0, 1)``)."""

    def __init__(self, pruning_sparsity: float) -> None:
        super().__init__()
        self.pruning_sparsity = _check_sparsity(pruning_sparsity)
        self._register_mask()

    @script_method
    def forward(self, w: Tensor) -> Tensor:
        return w.masked_fill(self.mask.logical_not(), 0.0)

    def compute_mask(self, weight: Tensor) -> Tensor:
        numel = weight.numel()
        keep = numel - round(self.pruning_sparsity * numel)
        return _keep_largest(weight.abs().reshape(-1), keep).reshape(weight.shape)

    def extra_repr(self) -> str:
        return f"pruning_sparsity={self.pruning_sparsity}"


class NMMask(_MaskState, ScriptModule):
    """N:M structured pruning: in every block of ``pruning_m`` consecutive elements along
    ``pruning_dim`` (a weight's input channels: 1 for Linear and Conv, 0 for ConvTranspose;
    for a conv weight the blocks run along input channels at each kernel position) keeps the
    ``pruning_n`` largest ``|w|`` (2:4 is what sparse tensor cores accelerate)."""

    def __init__(self, pruning_n: int = 2, pruning_m: int = 4, pruning_dim: int = 1) -> None:
        super().__init__()
        self.pruning_n = _check_int(pruning_n, "pruning_n")
        self.pruning_m = _check_int(pruning_m, "pruning_m")
        self.pruning_dim = _check_int(pruning_dim, "pruning_dim")
        if self.pruning_m < 1:
            raise QuantConfigError(f"pruning_m must be at least 1, got {self.pruning_m}")
        if not 0 < self.pruning_n <= self.pruning_m:
            raise QuantConfigError(
                f"pruning_n must satisfy 0 < pruning_n <= pruning_m = {self.pruning_m}, got {self.pruning_n}"
            )
        self._register_mask()

    @script_method
    def forward(self, w: Tensor) -> Tensor:
        return w.masked_fill(self.mask.logical_not(), 0.0)

    def compute_mask(self, weight: Tensor) -> Tensor:
        shape = tuple(weight.shape)
        if not -weight.dim() <= self.pruning_dim < weight.dim():
            raise QuantConfigError(f"NMMask: pruning_dim={self.pruning_dim} is not a dim of a weight of shape {shape}")
        size = shape[self.pruning_dim]
        if size % self.pruning_m != 0:
            raise QuantConfigError(
                f"NMMask: dim {self.pruning_dim} of the weight (shape {shape}) has size {size}, "
                f"not a multiple of pruning_m={self.pruning_m}"
            )
        moved = weight.abs().movedim(self.pruning_dim, -1)
        blocks = moved.reshape(*moved.shape[:-1], size // self.pruning_m, self.pruning_m)
        kept = _keep_largest(blocks, self.pruning_n).reshape(moved.shape)
        return kept.movedim(-1, self.pruning_dim).contiguous()

    def extra_repr(self) -> str:
        return f"pruning_n={self.pruning_n}, pruning_m={self.pruning_m}, pruning_dim={self.pruning_dim}"
