"""Reductions over the last dimension of a ``(groups, elements)`` matrix, keeping it as size 1.

Views (:mod:`quantwire.core.function_wrapper.view`) produce the matrix; these modules only
reduce it, so each one works per tensor, per channel, per token and per group alike.
"""

import torch
from torch import Tensor

from quantwire.errors import QuantConfigError
from quantwire.function.fake_quant import abs_max_last_dim
from quantwire.function.int_range import int_scaling_divisor, max_int, min_int
from quantwire.jit import ScriptModule, script_method


def _check_percentile(q: float, name: str) -> float:
    if not 0.0 <= float(q) <= 100.0:
        raise QuantConfigError(f"{name} must be a percentile in [0, 100], got {q!r}")
    return float(q)


def _kth_smallest(x: Tensor, q: float) -> Tensor:
    """The ``q``-th percentile of each row (nearest rank), as ``(rows, 1)``.

    Extreme percentiles (the usual 99.999th) select from the short tail with ``topk``, several
    times faster on CPU than ``kthvalue`` over a whole activation, and exactly the same value.
    """
    n = x.shape[-1]
    k = int(q * 0.01 * n + 0.5)
    k = min(max(k, 1), n)
    if k > n // 2:
        if not torch.jit.is_scripting():
            # Eager only: the selection depends on the data, which torch.compile can not trace.
            short = x.shape[0] == 1 and n - k + 1 <= _SHORT_TAIL and n >= _SHORT_TAIL * _SHORT_TAIL
            if short and not torch.compiler.is_compiling():
                return _largest_of_one_row(x, n - k + 1)
        tail = torch.topk(x, n - k + 1, dim=-1, largest=True, sorted=False).values
        return torch.amin(tail, dim=-1, keepdim=True)
    head = torch.topk(x, k, dim=-1, largest=False, sorted=False).values
    return torch.amax(head, dim=-1, keepdim=True)


# Tails of at most this many elements, in rows of at least its square, are selected in two steps.
_SHORT_TAIL = 64


@torch.jit.unused
def _largest_of_one_row(x: Tensor, count: int) -> Tensor:
    """The ``count``-th largest element of a ``(1, n)`` row, as ``(1, 1)``: the value ``topk``
    gives, without selecting over the whole row. The row is cut into blocks; the ``count``-th
    largest block maximum is a bound that at least ``count`` elements reach, so the answer lies
    in the blocks whose maximum reaches it (and the few elements left after the last whole
    block). One pass over the row (the block maxima), then a selection over ``count`` or so
    blocks. A NaN among the top block maxima (``topk`` ranks NaN first) falls back to ``topk``
    over the row."""
    row = x.reshape(-1)
    blocks = max(count, int(row.numel() ** 0.5))
    width = row.numel() // blocks
    whole = row[: blocks * width].reshape(blocks, width)
    maxima = torch.amax(whole, dim=1)
    bound = torch.topk(maxima, count, largest=True, sorted=False).values.amin()
    if bool(torch.isnan(bound)):
        return torch.topk(row, count, largest=True, sorted=False).values.amin().reshape(1, 1)
    candidates = torch.cat((whole[maxima >= bound].reshape(-1), row[blocks * width :]))
    return torch.topk(candidates, count, largest=True, sorted=False).values.amin().reshape(1, 1)


class AbsMax(ScriptModule):
    """``max(|x|)``: the symmetric range that covers every value. With autograd in eager mode,
    its gradient goes to one element reaching the maximum (see
    :func:`~quantwire.function.fake_quant.abs_max_last_dim`); TorchScript and ``torch.compile``
    use ``amax``, whose gradient is shared among tied maxima (they differ only on ties)."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            # torch.compile fuses amax and its backward itself.
            if x.requires_grad and torch.is_grad_enabled() and x.shape[-1] > 0 and not torch.compiler.is_compiling():
                return abs_max_last_dim(x)
        return torch.amax(torch.abs(x), dim=-1, keepdim=True)


class AbsMinMax(ScriptModule):
    """``max(x, 0) - min(x, 0)``: the width of the smallest range that covers every value and
    zero (what an asymmetric quantizer spreads its codes over)."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        upper = torch.clamp_min(torch.amax(x, dim=-1, keepdim=True), 0.0)
        lower = torch.clamp_max(torch.amin(x, dim=-1, keepdim=True), 0.0)
        return upper - lower


class NegativeMinOrZero(ScriptModule):
    """``min(min(x), 0)``: the lower end of an asymmetric range (for zero points)."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp_max(torch.amin(x, dim=-1, keepdim=True), 0.0)


class AbsPercentile(ScriptModule):
    """The ``high_percentile_q``-th percentile of ``|x|``: abs-max that ignores rare outliers."""

    def __init__(self, high_percentile_q: float = 99.999) -> None:
        super().__init__()
        self.q = _check_percentile(high_percentile_q, "high_percentile_q")

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return _kth_smallest(torch.abs(x), self.q)


class NegativePercentileOrZero(ScriptModule):
    """``min(percentile(x, low_percentile_q), 0)``: a lower range end that ignores outliers."""

    def __init__(self, low_percentile_q: float = 0.001) -> None:
        super().__init__()
        self.q = _check_percentile(low_percentile_q, "low_percentile_q")

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp_max(_kth_smallest(x, self.q), 0.0)


class PercentileInterval(ScriptModule):
    """``percentile(x, high) - min(percentile(x, low), 0)``: an asymmetric range width that
    ignores outliers at both ends."""

    def __init__(self, low_percentile_q: float = 0.001, high_percentile_q: float = 99.999) -> None:
        super().__init__()
        self.low_q = _check_percentile(low_percentile_q, "low_percentile_q")
        self.high_q = _check_percentile(high_percentile_q, "high_percentile_q")
        if self.low_q >= self.high_q:
            raise QuantConfigError(
                f"low_percentile_q ({low_percentile_q}) must be below high_percentile_q ({high_percentile_q})"
            )

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        high = torch.clamp_min(_kth_smallest(x, self.high_q), 0.0)
        low = torch.clamp_max(_kth_smallest(x, self.low_q), 0.0)
        return high - low


class MSE(ScriptModule):
    """The clipping threshold that minimises the mean squared quantization error of each row.

    Searches ``num_candidates`` thresholds evenly spaced in ``[min_ratio, 1] * max(|x|)``,
    quantizing symmetrically to the integer range of ``bit_width``/``signed``/``narrow_range``
    with the same threshold-to-scale divisor as :class:`~quantwire.core.scaling.IntScaling`,
    and returns, per row, the threshold with the smallest error (ties: the largest threshold).
    """

    def __init__(
        self,
        bit_width: int,
        signed: bool = True,
        narrow_range: bool = False,
        num_candidates: int = 100,
        min_ratio: float = 0.2,
    ) -> None:
        super().__init__()
        if int(num_candidates) < 1:
            raise QuantConfigError(f"num_candidates must be at least 1, got {num_candidates!r}")
        if not 0.0 < float(min_ratio) <= 1.0:
            raise QuantConfigError(f"min_ratio must be in (0, 1], got {min_ratio!r}")
        bits = torch.tensor(float(bit_width))
        self.divisor = float(int_scaling_divisor(signed, narrow_range, bits))
        self.min_int = float(min_int(signed, narrow_range, bits))
        self.max_int = float(max_int(signed, narrow_range, bits))
        self.num_candidates = int(num_candidates)
        self.min_ratio = float(min_ratio)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        x = x.detach()
        abs_max = torch.amax(torch.abs(x), dim=-1, keepdim=True)
        best_threshold = abs_max
        best_error = torch.full_like(abs_max, float("inf"))
        for i in range(self.num_candidates):
            ratio = 1.0 - (1.0 - self.min_ratio) * i / max(self.num_candidates - 1, 1)
            threshold = abs_max * ratio
            scale = torch.clamp_min(threshold / self.divisor, 1e-30)
            # (clamp(round(x / s)) * s - x)^2, in place on one buffer (the same operations).
            residual = torch.round_(x / scale).clamp_(self.min_int, self.max_int).mul_(scale).sub_(x)
            error = torch.mean(residual.square_(), dim=-1, keepdim=True)
            better = error < best_error
            best_threshold = torch.where(better, threshold, best_threshold)
            best_error = torch.where(better, error, best_error)
        return best_threshold
