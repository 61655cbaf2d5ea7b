"""Observers: statistics of everything seen so far, not of one batch.

An observer is a stats impl (a ``(rows, elements)`` matrix in, a ``(rows, 1)`` column out) that
keeps state across calls. In training mode each call folds the batch into that state and
returns the statistic of all the batches seen since the last :meth:`reset_observer`; in eval
mode nothing is folded and the statistic of what was seen is returned (or, before any batch,
the statistic of the input itself). Used with ``scaling_stats_momentum = 1.0``, so that
:class:`~quantwire.core.stats.RuntimeStats` keeps the observer's latest answer.

The state is scratch for calibration: it lives in plain attributes and
:class:`~quantwire.core.utils.StatelessBuffer` modules, so it follows ``.to()`` but stays out of
the ``state_dict`` (what a calibrated quantizer keeps is the value its scale was initialised
with). :meth:`reset_observer` forgets it. The number of rows is fixed by the first batch; a
batch with another number of rows raises :class:`~quantwire.errors.QuantInputError` (under
TorchScript, a ``torch.jit.Error`` naming it).

Histogram observers (:class:`HistogramStats` and subclasses) accumulate a histogram of ``|x|``
per row, ``histogram_num_bins`` equal bins over ``[0, range]``. The range is the first nonzero
batch's abs-max; when a batch exceeds it, it doubles as many times as needed and each group of
``2^k`` adjacent bins merges into one. Merging is exact (the bin width scales by a power of two,
exactly): counts are kept, and each value sits in the bin it would sit in had the histogram been
built over the final range from the start, except a value that was at the top of the range when
it arrived (exactly, or within rounding when ``histogram_num_bins`` is not a power of two): it
stays in the merged top bin, one below the bin of the final range whose left edge it is.
Subclasses turn the histogram into a symmetric clipping threshold (a magnitude, as
:class:`~quantwire.core.stats.AbsMax` returns).
"""

import torch
from torch import Tensor

from quantwire.core.stats.stats import _check_percentile
from quantwire.core.utils import StatelessBuffer, check_bit_width
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.function.int_range import int_scaling_divisor, max_int
from quantwire.jit import ScriptModule, script_method

# Candidate-by-group work is done in chunks of at most this many elements per tensor.
CHUNK_ELEMENTS = 1 << 18


def _check_rows(observer: str, observed_rows: int, rows: int) -> None:
    if observed_rows >= 0 and rows != observed_rows:
        raise QuantInputError(
            observer
            + ": got a batch with "
            + str(rows)
            + " rows, but the statistics seen so far have "
            + str(observed_rows)
            + " rows (call reset_observer() to start over with another shape)"
        )


def _check_int(value: object, name: str, minimum: int) -> int:
    valid = isinstance(value, int) and not isinstance(value, bool)
    if not valid or value < minimum:
        raise QuantConfigError(f"{name} must be an int of at least {minimum}, got {value!r}")
    return int(value)


def _empty_like(value: Tensor, shape: list[int]) -> Tensor:
    return torch.zeros(shape, dtype=value.dtype, device=value.device)


# ---------------------------------------------------------------------------------------------
# Running extremes


class RunningAbsMax(ScriptModule):
    """Per row ``max |x|`` over every batch seen in training."""

    def __init__(self) -> None:
        super().__init__()
        self.observer_name = type(self).__name__
        self.observed_rows = -1
        self.running_max = StatelessBuffer(torch.zeros(0, 1))

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        _check_rows(self.observer_name, self.observed_rows, x.shape[0])
        batch = torch.amax(torch.abs(x), dim=-1, keepdim=True)
        seen = self.observed_rows >= 0
        if not self.training:
            return self.running_max().to(x.dtype) if seen else batch
        if seen:
            batch = torch.maximum(batch, self.running_max().to(batch.dtype))
        self.running_max.value = batch.detach()
        self.observed_rows = x.shape[0]
        return batch

    @torch.jit.export
    def reset_observer(self) -> None:
        """Forget every batch seen."""
        self.observed_rows = -1
        self.running_max.value = _empty_like(self.running_max.value, [0, 1])


class RunningAbsMinMax(ScriptModule):
    """Per row ``max(running_max(x), 0) - min(running_min(x), 0)`` over every batch seen in
    training: the width of the smallest range covering all of them and zero (see
    :class:`~quantwire.core.stats.AbsMinMax`)."""

    def __init__(self) -> None:
        super().__init__()
        self.observer_name = type(self).__name__
        self.observed_rows = -1
        self.running_max = StatelessBuffer(torch.zeros(0, 1))
        self.running_min = StatelessBuffer(torch.zeros(0, 1))

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        _check_rows(self.observer_name, self.observed_rows, x.shape[0])
        upper = torch.amax(x, dim=-1, keepdim=True)
        lower = torch.amin(x, dim=-1, keepdim=True)
        seen = self.observed_rows >= 0
        if seen:
            if not self.training:
                upper = self.running_max().to(x.dtype)
                lower = self.running_min().to(x.dtype)
            else:
                upper = torch.maximum(upper, self.running_max().to(upper.dtype))
                lower = torch.minimum(lower, self.running_min().to(lower.dtype))
        if self.training:
            self.running_max.value = upper.detach()
            self.running_min.value = lower.detach()
            self.observed_rows = x.shape[0]
        return torch.clamp_min(upper, 0.0) - torch.clamp_max(lower, 0.0)

    @torch.jit.export
    def reset_observer(self) -> None:
        """Forget every batch seen."""
        self.observed_rows = -1
        self.running_max.value = _empty_like(self.running_max.value, [0, 1])
        self.running_min.value = _empty_like(self.running_min.value, [0, 1])


class RunningNegativeMinOrZero(ScriptModule):
    """Per row ``min(running_min(x), 0)`` over every batch seen in training: the lower end of an
    asymmetric range (for zero points; see :class:`~quantwire.core.stats.NegativeMinOrZero`)."""

    def __init__(self) -> None:
        super().__init__()
        self.observer_name = type(self).__name__
        self.observed_rows = -1
        self.running_min = StatelessBuffer(torch.zeros(0, 1))

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        _check_rows(self.observer_name, self.observed_rows, x.shape[0])
        lower = torch.amin(x, dim=-1, keepdim=True)
        seen = self.observed_rows >= 0
        if not self.training:
            return torch.clamp_max(self.running_min().to(x.dtype) if seen else lower, 0.0)
        if seen:
            lower = torch.minimum(lower, self.running_min().to(lower.dtype))
        self.running_min.value = lower.detach()
        self.observed_rows = x.shape[0]
        return torch.clamp_max(lower, 0.0)

    @torch.jit.export
    def reset_observer(self) -> None:
        """Forget every batch seen."""
        self.observed_rows = -1
        self.running_min.value = _empty_like(self.running_min.value, [0, 1])


# ---------------------------------------------------------------------------------------------
# Histograms


def _batch_histogram(magnitudes: Tensor, upper: Tensor, num_bins: int) -> Tensor:
    """Counts (int64, ``(rows, num_bins)``) of ``magnitudes`` (float32, ``>= 0``) in
    ``num_bins`` bins of width ``upper / num_bins`` per row; values at the top go to the last
    bin. A row whose ``upper`` is 0 holds only zeros: they go to bin 0."""
    rows = magnitudes.shape[0]
    width = upper / num_bins
    width = torch.where(width > 0, width, torch.ones_like(width))
    index = torch.clamp(torch.floor(magnitudes / width), 0.0, float(num_bins - 1)).to(torch.int64)
    offsets = torch.arange(rows, device=index.device).unsqueeze(1) * num_bins
    counts = torch.bincount((index + offsets).reshape(-1), minlength=rows * num_bins)
    return counts.reshape(rows, num_bins)


def _grown_upper(upper: Tensor, batch_max: Tensor) -> tuple[Tensor, Tensor]:
    """The range that covers ``batch_max`` (``upper`` times the smallest power of two ``2^k``
    that does; ``batch_max`` itself where ``upper`` is still 0) and the shift ``k`` (int64)."""
    grow = (batch_max > upper) & (upper > 0)
    old = upper.to(torch.float64)
    new = batch_max.to(torch.float64)
    ratio = torch.where(grow, new / torch.where(grow, old, torch.ones_like(old)), torch.ones_like(old))
    shift = torch.clamp_min(torch.ceil(torch.log2(ratio)), 0.0)
    # log2 may be off by one in the last bit: the smallest k with old * 2^k >= new, exactly.
    shift = shift + (old * torch.pow(2.0, shift) < new).to(shift.dtype)
    lower = torch.clamp_min(shift - 1.0, 0.0)
    shift = torch.where((shift >= 1.0) & (old * torch.pow(2.0, lower) >= new), lower, shift)
    shift = torch.where(grow, shift, torch.zeros_like(shift))
    grown = (old * torch.pow(2.0, shift)).to(torch.float32)
    grown = torch.where(upper > 0, grown, batch_max)
    return grown, shift.to(torch.int64)


def _merge_bins(counts: Tensor, shift: Tensor) -> Tensor:
    """``counts`` over a range ``2^shift`` times wider: bin ``j`` moves into bin ``j >> shift``
    (per row). Exact: the totals are kept."""
    if not bool((shift > 0).any()):
        return counts
    num_bins = counts.shape[1]
    bins = torch.arange(num_bins, device=counts.device).unsqueeze(0)
    index = bins >> torch.clamp(shift, 0, 62)
    return torch.zeros_like(counts).scatter_add_(1, index, counts)


def _last_true(mask: Tensor) -> Tensor:
    """Per row, the index of the last true element of ``mask`` (``(rows, n)``), as ``(rows, 1)``;
    -1 where there is none."""
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0).expand_as(mask)
    return torch.amax(torch.where(mask, positions, torch.full_like(positions, -1)), dim=1, keepdim=True)


class HistogramStats(ScriptModule):
    """A histogram of ``|x|`` per row, accumulated over the batches seen in training (see the
    module docstring for how its range grows); returns the right edge of the last non-empty bin
    (an abs-max rounded up to a bin edge). Subclasses override :meth:`histogram_threshold`.

    State (not in the ``state_dict``): ``counts`` (int64, ``(rows, histogram_num_bins)``),
    ``upper`` (the range, float32 ``(rows, 1)``, 0 while only zeros were seen) and the last
    threshold. Bin ``j`` covers ``[j, j + 1) * upper / histogram_num_bins``.
    """

    def __init__(self, histogram_num_bins: int = 2048) -> None:
        super().__init__()
        self.observer_name = type(self).__name__
        self.num_bins = _check_int(histogram_num_bins, "histogram_num_bins", 2)
        self.chunk_elements = CHUNK_ELEMENTS
        self.observed_rows = -1
        self.counts = StatelessBuffer(torch.zeros(0, self.num_bins, dtype=torch.int64))
        self.upper = StatelessBuffer(torch.zeros(0, 1))
        self.threshold = StatelessBuffer(torch.zeros(0, 1))

    @script_method
    def histogram_threshold(self, counts: Tensor, upper: Tensor) -> Tensor:
        """The threshold (float32 ``(rows, 1)``) of histograms ``counts`` over ``[0, upper]``."""
        last = _last_true(counts > 0)
        return (last + 1).to(torch.float32) * (upper / self.num_bins)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        magnitudes = torch.abs(x.detach()).to(torch.float32)
        batch_max = torch.amax(magnitudes, dim=-1, keepdim=True)
        if not bool(torch.isfinite(batch_max).all()):
            raise QuantInputError(self.observer_name + ": the input holds NaN or infinite values")
        _check_rows(self.observer_name, self.observed_rows, x.shape[0])
        if not self.training:
            if self.observed_rows >= 0:
                return self.threshold().to(x.dtype)
            counts = _batch_histogram(magnitudes, batch_max, self.num_bins)
            return self.histogram_threshold(counts, batch_max).to(x.dtype)
        if self.observed_rows < 0:
            upper = batch_max
            counts = _batch_histogram(magnitudes, upper, self.num_bins)
        else:
            upper, shift = _grown_upper(self.upper().to(torch.float32), batch_max)
            counts = _merge_bins(self.counts(), shift) + _batch_histogram(magnitudes, upper, self.num_bins)
        threshold = self.histogram_threshold(counts, upper)
        self.counts.value = counts
        self.upper.value = upper
        self.threshold.value = threshold
        self.observed_rows = x.shape[0]
        return threshold.to(x.dtype)

    @torch.jit.export
    def reset_observer(self) -> None:
        """Forget every batch seen."""
        self.observed_rows = -1
        self.counts.value = _empty_like(self.counts.value, [0, self.num_bins])
        self.upper.value = _empty_like(self.upper.value, [0, 1])
        self.threshold.value = _empty_like(self.threshold.value, [0, 1])


def _levels(bit_width: int, signed: bool, narrow_range: bool) -> int:
    """The non-negative codes of the range: ``max_int + 1`` (128 for signed 8-bit)."""
    levels = int(max_int(bool(signed), bool(narrow_range), torch.tensor(float(bit_width)))) + 1
    if levels < 2:
        raise QuantConfigError(
            f"a {bit_width}-bit range with signed={signed}, narrow_range={narrow_range} has a single "
            "non-negative code: there is no threshold to choose"
        )
    return levels


def _check_levels(levels: int, num_bins: int, bit_width: int, signed: bool) -> None:
    if levels > num_bins:
        kind = "signed" if signed else "unsigned"
        raise QuantConfigError(
            f"histogram_num_bins ({num_bins}) must be at least the {levels} non-negative levels of "
            f"a {bit_width}-bit {kind} range; raise histogram_num_bins"
        )


class HistogramEntropy(HistogramStats):
    """TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", 2017): the
    threshold whose quantized histogram loses the least information (KL divergence).

    With ``levels`` the number of non-negative codes (``max_int + 1``: 128 for signed 8-bit, 256
    for unsigned 8-bit), for each candidate number of bins ``i`` (``levels``,
    ``levels + entropy_stride``, ..., and always ``histogram_num_bins``):

    - ``P``: the first ``i`` bins, with the mass of the bins beyond (the clipped outliers) added
      to bin ``i - 1``;
    - ``Q``: the first ``i`` bins (without the outliers) merged into ``levels`` levels (bin ``j``
      into level ``floor(j * levels / i)``), each level's mass then spread evenly over its
      non-empty bins;
    - ``KL(P || Q)`` of the normalised distributions (infinite where ``P > 0 = Q``: bin ``i - 1``
      empty but outliers clipped into it).

    The threshold is the right edge of bin ``i - 1`` (``i * upper / histogram_num_bins``) for the
    ``i`` of smallest divergence; divergences within 1e-9 nats of the smallest count as ties and
    the largest ``i`` among them wins.

    ``entropy_ignore_zero_bin`` (default, as NVIDIA's pytorch-quantization does) first replaces
    the count of bin 0 by that of bin 1. Without it the exact zeros of a ReLU, spread by ``Q``
    over its first level, dominate the divergence and pull the threshold far down (on ReLU'd
    Gaussian data, to about half the abs-max, with a hundred times the squared error); on data
    without a spike at zero it changes little.

    All candidates are evaluated at once from prefix sums: ``O(candidates * levels)`` per row.
    """

    def __init__(
        self,
        bit_width: int,
        signed: bool = True,
        narrow_range: bool = False,
        histogram_num_bins: int = 2048,
        entropy_stride: int = 1,
        entropy_ignore_zero_bin: bool = True,
    ) -> None:
        super().__init__(histogram_num_bins)
        bits = check_bit_width(bit_width)
        self.levels = _levels(bits, signed, narrow_range)
        _check_levels(self.levels, self.num_bins, bits, bool(signed))
        self.stride = _check_int(entropy_stride, "entropy_stride", 1)
        if not isinstance(entropy_ignore_zero_bin, bool):
            raise QuantConfigError(f"entropy_ignore_zero_bin must be a bool, got {entropy_ignore_zero_bin!r}")
        self.ignore_zero_bin = entropy_ignore_zero_bin

    @script_method
    def candidate_bins(self, device: torch.device) -> Tensor:
        """The candidate numbers of bins ``i`` (int64)."""
        candidates = torch.arange(self.levels, self.num_bins + 1, self.stride, device=device)
        if (self.num_bins - self.levels) % self.stride != 0:
            last = torch.full([1], self.num_bins, dtype=torch.int64, device=device)
            candidates = torch.cat([candidates, last])
        return candidates

    @script_method
    def divergences(self, counts: Tensor) -> Tensor:
        """``KL(P || Q)`` (float64, ``(rows, candidates)``) for each of :meth:`candidate_bins`."""
        c = counts.to(torch.float64)
        if self.ignore_zero_bin:
            c = torch.cat([c[:, 1:2], c[:, 1:]], dim=1)
        rows = c.shape[0]
        levels = self.levels
        zero = torch.zeros(rows, 1, dtype=torch.float64, device=c.device)
        # Prefix sums over bins 0 .. i-1 at column i: counts, non-empty bins, count * log(count).
        mass = torch.cat([zero, torch.cumsum(c, dim=1)], dim=1)
        nonzero = torch.cat([zero, torch.cumsum((c > 0).to(torch.float64), dim=1)], dim=1)
        prefix = torch.cat([mass, nonzero], dim=0)
        entropy_terms = torch.cat([zero, torch.cumsum(torch.xlogy(c, c), dim=1)], dim=1)
        total = mass[:, -1:]
        candidates = self.candidate_bins(c.device)
        level = torch.arange(levels + 1, dtype=torch.float64, device=c.device).unsqueeze(0)
        num_candidates = candidates.shape[0]
        chunk = max(1, self.chunk_elements // max(1, 2 * rows * (levels + 1)))
        divergences: list[Tensor] = []
        for start in range(0, num_candidates, chunk):
            stop = min(start + chunk, num_candidates)
            size = stop - start
            i = candidates[start:stop]
            # Level l of candidate i: bins ceil(l * i / levels) <= j < ceil((l + 1) * i / levels)
            # (exact in float64: a quotient that is not an integer is at least 1 / levels from one).
            edges = level * i.unsqueeze(1).to(torch.float64)
            edges = edges.div_(levels).ceil_().to(torch.int64).reshape(1, -1)
            gathered = prefix.gather(1, edges.expand(2 * rows, edges.shape[1]))
            per_level = torch.diff(gathered.reshape(2, rows, size, levels + 1), dim=-1)
            level_mass = per_level[0]
            level_bins = per_level[1].clamp_min_(1.0)
            # Q's count in the non-empty bins of the last level, and log of it in every level (an
            # empty level has mass 0: its log is finite and its term 0).
            last_q = level_mass[:, :, -1] / level_bins[:, :, -1]
            log_q = torch.div(level_mass, level_bins).clamp_min_(1e-300).log_()
            # sum_j p_j log q_j: every non-empty bin of a level has the level's q; bin i - 1 also
            # holds the outliers.
            cross = torch.linalg.vecdot(level_mass, log_q)
            kept = mass.index_select(1, i)
            outliers = total - kept
            last = c.index_select(1, i - 1)
            infinite = ((outliers > 0) & (last == 0)) | (kept == 0)
            cross = cross + torch.xlogy(outliers, torch.where(infinite, torch.ones_like(kept), last_q))
            p_log_p = entropy_terms.index_select(1, i - 1) + torch.xlogy(last + outliers, last + outliers)
            safe_kept = torch.where(infinite, torch.ones_like(kept), kept)
            kl = (p_log_p - cross) / total - torch.log(total) + torch.log(safe_kept)
            divergences.append(torch.where(infinite, torch.full_like(kl, float("inf")), kl))
        return torch.cat(divergences, dim=1)

    @script_method
    def histogram_threshold(self, counts: Tensor, upper: Tensor) -> Tensor:
        kl = self.divergences(counts)
        best = torch.amin(kl, dim=1, keepdim=True)
        choice = torch.clamp_min(_last_true(kl <= best + 1e-9), 0)
        bins = self.candidate_bins(counts.device).index_select(0, choice.reshape(-1)).reshape(-1, 1)
        threshold = bins.to(torch.float32) * (upper / self.num_bins)
        return torch.where(upper > 0, threshold, torch.zeros_like(threshold))


class HistogramMSE(HistogramStats):
    """The bin edge whose symmetric quantization of the histogram has the smallest expected
    squared error (PyTorch's ``HistogramObserver`` L2 search, symmetric and exhaustive).

    Every right bin edge ``t = m * upper / histogram_num_bins`` (``m = 1 .. histogram_num_bins``)
    is a candidate. Each bin's values are taken at its centre ``v`` and quantized as
    :class:`~quantwire.core.stats.MSE` does, with scale ``t / int_scaling_divisor(signed,
    narrow_range, bit_width)`` and codes clamped to ``[min_int, max_int]`` (the histogram is of
    ``|x|``, so only ``max_int`` clamps). The error ``sum(count * (q(v) - v)^2)`` is summed per
    code from prefix sums: ``O(candidates * levels)`` per row. Ties (within a relative 1e-9, or
    the rounding noise of the sums) go to the largest threshold.
    """

    def __init__(
        self,
        bit_width: int,
        signed: bool = True,
        narrow_range: bool = False,
        histogram_num_bins: int = 2048,
    ) -> None:
        super().__init__(histogram_num_bins)
        bits = check_bit_width(bit_width)
        self.levels = _levels(bits, signed, narrow_range)
        _check_levels(self.levels, self.num_bins, bits, bool(signed))
        self.divisor = int(int_scaling_divisor(bool(signed), bool(narrow_range), torch.tensor(float(bits))))

    @script_method
    def errors(self, counts: Tensor) -> Tensor:
        """The squared error (float64, ``(rows, histogram_num_bins)``, in units of bin width
        squared) of each candidate ``m = 1 .. histogram_num_bins``."""
        c = counts.to(torch.float64)
        rows = c.shape[0]
        levels = self.levels
        divisor = float(self.divisor)
        nb = float(self.num_bins)
        bins = torch.arange(self.num_bins, dtype=torch.float64, device=c.device).unsqueeze(0)
        zero = torch.zeros(rows, 1, dtype=torch.float64, device=c.device)
        # Prefix sums of count and count * j (integers below 2^53: exact).
        prefix = torch.cat(
            [torch.cat([zero, torch.cumsum(c, dim=1)], dim=1), torch.cat([zero, torch.cumsum(c * bins, dim=1)], dim=1)],
            dim=0,
        )
        # sum(count * j^2) is the same for every candidate: the codes partition the bins.
        second = torch.sum(c * bins * bins, dim=1, keepdim=True)
        code = torch.arange(levels + 1, dtype=torch.float64, device=c.device).unsqueeze(0)
        odd = 2.0 * code - 1.0
        value = code[:, :levels] / divisor  # a code's value in bins, per unit of m
        chunk = max(1, self.chunk_elements // max(1, 2 * rows * (levels + 1)))
        errors: list[Tensor] = []
        for start in range(0, self.num_bins, chunk):
            stop = min(start + chunk, self.num_bins)
            size = stop - start
            m = torch.arange(start + 1, stop + 1, dtype=torch.float64, device=c.device).unsqueeze(1)
            # Bin j (centre j + 0.5) rounds to code k >= 1 from j >= ((2k - 1) m - divisor) / (2 divisor)
            # on (exact in float64); code 0 starts at bin 0 and code max_int takes every bin above it.
            starts = odd * m
            starts = starts.sub_(divisor).div_(2.0 * divisor).ceil_().clamp_(0.0, nb)
            starts[:, 0] = 0.0
            starts[:, -1] = nb
            starts = starts.to(torch.int64).reshape(1, -1)
            gathered = prefix.gather(1, starts.expand(2 * rows, starts.shape[1]))
            per_code = torch.diff(gathered.reshape(2, rows, size, levels + 1), dim=-1)
            # sum(count * (j + 0.5 - a)^2) over a code's bins, a = k * m / divisor its value in bins,
            # is sum(count * j^2) + b * (b * count - 2 * sum(count * j)) with b = a - 0.5; the first
            # term is added once for all codes below.
            b = (value * m).sub_(0.5)
            error = torch.addcmul(per_code[1], b, per_code[0], value=-0.5)
            errors.append(torch.linalg.vecdot(b, error).mul_(-2.0))
        return second + torch.cat(errors, dim=1)

    @script_method
    def histogram_threshold(self, counts: Tensor, upper: Tensor) -> Tensor:
        error = self.errors(counts)
        best = torch.amin(error, dim=1, keepdim=True)
        c = counts.to(torch.float64)
        bins = torch.arange(self.num_bins, dtype=torch.float64, device=c.device) + 1.0
        # Rounding noise of the sums: a few ulps of sum(count * (j + 1)^2).
        noise = 1e-13 * torch.sum(c * bins * bins, dim=1, keepdim=True)
        choice = _last_true(error <= best * (1.0 + 1e-9) + noise)
        threshold = (choice + 1).to(torch.float32) * (upper / self.num_bins)
        return torch.where(upper > 0, threshold, torch.zeros_like(threshold))


class HistogramPercentile(HistogramStats):
    """The ``high_percentile_q``-th percentile of the accumulated histogram of ``|x|``.

    The cumulative distribution is known at the bin edges and taken as linear in between
    (values spread evenly within a bin): the result is the smallest ``t`` at which it reaches
    ``q%`` of the count. ``q = 100`` gives the right edge of the last non-empty bin, ``q = 0``
    the left edge of the first.
    """

    def __init__(self, high_percentile_q: float = 99.99, histogram_num_bins: int = 2048) -> None:
        super().__init__(histogram_num_bins)
        self.q = _check_percentile(high_percentile_q, "high_percentile_q")

    @script_method
    def histogram_threshold(self, counts: Tensor, upper: Tensor) -> Tensor:
        c = counts.to(torch.float64)
        cumulative = torch.cumsum(c, dim=1)
        target = cumulative[:, -1:] * (self.q / 100.0)
        # Counts are whole: searching for at least half a count finds the first non-empty bin
        # for a target of 0 too (whose percentile is that bin's left edge).
        index = torch.searchsorted(cumulative, torch.clamp_min(target, 0.5))
        index = torch.clamp(index, 0, self.num_bins - 1)
        in_bin = c.gather(1, index)
        before = cumulative.gather(1, index) - in_bin
        fraction = (target - before) / torch.clamp_min(in_bin, 1.0)
        position = index.to(torch.float64) + torch.clamp(fraction, 0.0, 1.0)
        return (position * (upper.to(torch.float64) / self.num_bins)).to(torch.float32)
