"""Observers: statistics of every batch seen, against numpy references of the same algorithms."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.core.stats import (
    AbsMax,
    AbsMinMax,
    HistogramEntropy,
    HistogramMSE,
    HistogramPercentile,
    HistogramStats,
    NegativeMinOrZero,
    RunningAbsMax,
    RunningAbsMinMax,
    RunningNegativeMinOrZero,
)
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.jit import JIT_ENABLED

# What an observer's run-time error is: TorchScript (QUANTWIRE_JIT=1, torch.jit.script) raises it
# as a torch.jit.Error whose message names quantwire.errors.QuantInputError.
INPUT_ERROR = (QuantInputError, torch.jit.Error) if JIT_ENABLED else QuantInputError

# Magnitudes far from subnormals, so that scaling a bin width by a power of two is exact.
magnitudes = st.one_of(st.just(0.0), st.floats(2.0**-10, 2.0**13, width=32))
values = st.builds(lambda m, negative: -m if negative else m, magnitudes, st.booleans())


@st.composite
def batch_sequences(draw, max_batches: int = 5, max_rows: int = 3, max_elements: int = 30):
    """1 to ``max_batches`` float32 ``(rows, n)`` batches with the same number of rows, each
    scaled by its own power of two (so that histogram ranges grow, several times over)."""
    rows = draw(st.integers(1, max_rows))
    batches = []
    for _ in range(draw(st.integers(1, max_batches))):
        n = draw(st.integers(1, max_elements))
        x = draw(arrays(np.float32, (rows, n), elements=values))
        batches.append((x * np.float32(2.0 ** draw(st.integers(-4, 6)))).astype(np.float32))
    return batches


def train_on(observer, batches):
    observer.train()
    return [observer(torch.from_numpy(x)) for x in batches]


# ---------------------------------------------------------------------------------------------
# Running extremes

RUNNING = {
    RunningAbsMax: lambda xs: np.max([np.abs(x).max(axis=1) for x in xs], axis=0),
    RunningAbsMinMax: lambda xs: (
        np.maximum(np.max([x.max(axis=1) for x in xs], axis=0), 0)
        - np.minimum(np.min([x.min(axis=1) for x in xs], axis=0), 0)
    ),
    RunningNegativeMinOrZero: lambda xs: np.minimum(np.min([x.min(axis=1) for x in xs], axis=0), 0),
}
SINGLE_BATCH = {RunningAbsMax: AbsMax, RunningAbsMinMax: AbsMinMax, RunningNegativeMinOrZero: NegativeMinOrZero}


@pytest.mark.parametrize("cls", list(RUNNING), ids=lambda c: c.__name__)
@given(batches=batch_sequences())
def test_running_extremes_are_those_of_every_batch_seen(cls, batches):
    observer = cls()
    outputs = train_on(observer, batches)
    for k, output in enumerate(outputs, start=1):
        expected = RUNNING[cls](batches[:k]).astype(np.float32).reshape(-1, 1)
        assert np.array_equal(output.numpy(), expected)
    observer.eval()
    unseen = torch.from_numpy(batches[0]) * 1000.0
    assert torch.equal(observer(unseen), outputs[-1])
    assert observer.state_dict() == {}


@pytest.mark.parametrize("cls", list(RUNNING), ids=lambda c: c.__name__)
def test_running_extremes_eval_before_any_batch_and_reset(cls):
    x = torch.randn(3, 20)
    observer = cls().eval()
    assert torch.equal(observer(x), SINGLE_BATCH[cls]()(x))
    observer.train()
    observer(x * 10)
    observer.eval()
    observer(x * 100)  # eval does not fold
    observer.train()
    assert torch.equal(observer(x), SINGLE_BATCH[cls]()(x * 10))
    observer.reset_observer()
    assert torch.equal(observer(x), SINGLE_BATCH[cls]()(x))
    observer.reset_observer()
    assert torch.equal(observer.eval()(x * 3), SINGLE_BATCH[cls]()(x * 3))


# ---------------------------------------------------------------------------------------------
# Histograms: accumulation


def reference_histograms(batches, num_bins):
    """``(counts, upper)`` of the histogram observer, simulated value by value: each value is
    binned over the range in force when it arrived and then shifted right by the number of
    doublings since. Also returns, per row, the values that arrived exactly at the top of a range
    that later doubled (with the number of doublings), which a histogram built over the final
    range directly puts one bin higher."""
    rows = batches[0].shape[0]
    counts = np.zeros((rows, num_bins), dtype=np.int64)
    uppers = []
    tops = []
    for r in range(rows):
        upper = None
        arrivals = []  # (bin at arrival, range at arrival, is at the top of that range)
        for x in batches:
            a = np.abs(x[r]).astype(np.float32)
            m = np.float32(a.max())
            if upper is None or upper == 0:
                upper = m
            while upper < m:
                upper = np.float32(upper * np.float32(2.0))
            width = np.float32(upper / np.float32(num_bins))
            for value in a:
                j = 0 if upper == 0 else min(int(np.floor(np.float32(value / width))), num_bins - 1)
                arrivals.append((j, upper, value == upper))
        row_tops = []
        for j, at, top in arrivals:
            shift = 0 if at == 0 else round(math.log2(float(upper) / float(at)))
            counts[r, j >> shift] += 1
            if top and shift > 0:
                row_tops.append(shift)
        uppers.append(upper)
        tops.append(row_tops)
    return counts, np.array(uppers, dtype=np.float32).reshape(-1, 1), tops


@given(batches=batch_sequences(), num_bins=st.sampled_from([2, 3, 8, 10, 16, 64, 100]))
def test_histogram_merging_is_exact(batches, num_bins):
    observer = HistogramStats(num_bins)
    train_on(observer, batches)
    counts, upper, _ = reference_histograms(batches, num_bins)
    assert observer.counts().dtype == torch.int64
    assert np.array_equal(observer.counts().numpy(), counts)
    assert np.array_equal(observer.upper().numpy(), upper)
    assert int(observer.counts().sum()) == sum(x.size for x in batches)  # counts are conserved
    # The range: the first nonzero abs-max times the smallest power of two covering everything.
    abs_max = np.max([np.abs(x).max(axis=1) for x in batches], axis=0).reshape(-1, 1)
    assert bool((upper >= abs_max).all()) and bool((upper < 2 * abs_max + (abs_max == 0)).all())


@given(batches=batch_sequences(), num_bins=st.sampled_from([2, 4, 16, 64]))
def test_merged_histogram_equals_one_built_over_the_final_range(batches, num_bins):
    # With power-of-two bin counts the bin width is exact, so merging 2^k bins gives exactly the
    # histogram of the final range, except for values that were exactly at the top of the range
    # when they arrived: they stay in the merged top bin, one below the bin whose left edge they
    # are in the final range.
    observer = HistogramStats(num_bins)
    train_on(observer, batches)
    upper = observer.upper()
    direct = np.zeros((upper.shape[0], num_bins), dtype=np.int64)
    for r in range(upper.shape[0]):
        width = np.float32(upper[r, 0].item() / np.float32(num_bins))
        a = np.concatenate([np.abs(x[r]) for x in batches]).astype(np.float32)
        index = np.zeros(a.shape, dtype=np.int64) if width == 0 else np.floor(a / width).astype(np.int64)
        np.add.at(direct[r], np.minimum(index, num_bins - 1), 1)
    for r, shifts in enumerate(reference_histograms(batches, num_bins)[2]):
        for shift in shifts:
            if 2**shift <= num_bins:
                direct[r, num_bins >> shift] -= 1
                direct[r, (num_bins >> shift) - 1] += 1
    assert np.array_equal(observer.counts().numpy(), direct)


def test_histogram_range_starts_at_the_first_nonzero_batch():
    observer = HistogramStats(8).train()
    observer(torch.zeros(2, 5))
    assert torch.equal(observer.upper(), torch.zeros(2, 1))
    assert torch.equal(observer.counts()[:, 0], torch.tensor([5, 5]))
    out = observer(torch.tensor([[0.0, 3.0], [0.0, 0.0]]))
    assert torch.equal(observer.upper(), torch.tensor([[3.0], [0.0]]))
    assert torch.equal(observer.counts()[:, 0], torch.tensor([6, 7])) and int(observer.counts()[0, 7]) == 1
    assert torch.equal(out, torch.tensor([[3.0], [0.0]]))


def test_histogram_stats_returns_the_last_nonempty_bin_edge():
    torch.manual_seed(0)
    x = torch.randn(3, 500)
    observer = HistogramStats(64).train()
    for k in range(4):
        out = observer(x * (k + 1))
    abs_max = 4 * x.abs().amax(dim=1, keepdim=True)
    width = observer.upper() / 64
    assert bool((out >= abs_max).all()) and bool((out < abs_max + width + 1e-6).all())


# ---------------------------------------------------------------------------------------------
# Histograms: thresholds, against straightforward numpy references


def entropy_reference(counts: np.ndarray, levels: int, stride: int, ignore_zero_bin: bool) -> int:
    """TensorRT's entropy calibration on one histogram, written out per candidate: the chosen
    number of bins ``i`` (the threshold is its right edge). Bin ``j`` of ``i`` goes to level
    ``floor(j * levels / i)`` (what ``np.digitize(range(i), np.linspace(0, i, levels + 1)) - 1``
    computes when the linspace is exact)."""
    bins = counts.astype(np.float64)
    if ignore_zero_bin:
        bins[0] = bins[1]
    num_bins = len(bins)
    candidates = list(range(levels, num_bins + 1, stride))
    if candidates[-1] != num_bins:
        candidates.append(num_bins)
    divergences = []
    for i in candidates:
        p = bins[:i].copy()
        p[i - 1] += bins[i:].sum()  # the outliers are clipped into the last bin
        level = np.arange(i) * levels // i
        nonempty = bins[:i] != 0
        level_mass = np.bincount(level, weights=bins[:i], minlength=levels)
        level_bins = np.bincount(level, weights=nonempty, minlength=levels)
        q = np.where(nonempty, level_mass[level] / np.maximum(level_bins[level], 1), 0.0)
        p = p / p.sum()
        if q.sum() == 0 or np.any((p > 0) & (q == 0)):
            divergences.append(np.inf)
            continue
        q = q / q.sum()
        mask = p > 0
        divergences.append(float(np.sum(p[mask] * np.log(p[mask] / q[mask]))))
    divergences = np.array(divergences)
    ties = np.nonzero(divergences <= divergences.min() + 1e-9)[0]
    return candidates[ties[-1]]


def mse_errors_reference(counts: np.ndarray, divisor: float, max_int: float) -> np.ndarray:
    """Squared error (in bin widths squared) of every candidate edge ``m = 1 .. num_bins``: each
    bin's count at its centre, quantized with scale ``m / divisor`` and clamped as MSE does."""
    num_bins = len(counts)
    centres = np.arange(num_bins) + 0.5
    errors = []
    for m in range(1, num_bins + 1):
        scale = m / divisor
        quantized = np.clip(np.round(centres / scale), 0.0, max_int) * scale
        errors.append(np.sum(counts * (quantized - centres) ** 2))
    return np.array(errors)


@st.composite
def histograms(draw, min_bins: int = 2, max_bins: int = 160):
    """A histogram (int64 counts) shaped like a quantizer's: a decaying bulk with random noise,
    empty bins and a few outliers; sometimes just random counts."""
    num_bins = draw(st.integers(min_bins, max_bins))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        decay = draw(st.floats(0.02, 1.0)) * num_bins
        counts = rng.poisson(draw(st.floats(1.0, 1e4)) * np.exp(-np.arange(num_bins) / decay))
        outliers = rng.integers(0, num_bins, size=draw(st.integers(0, 3)))
        counts[outliers] += 1
    else:
        counts = rng.integers(0, draw(st.integers(1, 1000)), size=num_bins) * rng.integers(0, 2, size=num_bins)
    counts[draw(st.integers(num_bins // 2, num_bins - 1))] += 1  # as in an observer: the top half is not empty
    return counts.astype(np.int64)


quantizer_ranges = st.tuples(st.integers(1, 5), st.booleans(), st.booleans())  # bit width, signed, narrow


def levels_of(bit_width: int, signed: bool, narrow: bool) -> int:
    if signed:
        return 2 ** (bit_width - 1)
    return 2**bit_width - int(narrow)


def usable(levels: int, num_bins: int) -> bool:
    """Whether an observer can be built (else it is a config error, tested below)."""
    return 2 <= levels <= num_bins


@given(
    counts=histograms(), spec=quantizer_ranges, stride=st.integers(1, 7), ignore=st.booleans(), chunked=st.booleans()
)
def test_entropy_threshold_matches_tensorrt_reference(counts, spec, stride, ignore, chunked):
    bit_width, signed, narrow = spec
    levels = levels_of(bit_width, signed, narrow)
    if not usable(levels, len(counts)):
        return
    observer = HistogramEntropy(bit_width, signed, narrow, len(counts), stride, ignore)
    if chunked:
        observer.chunk_elements = 200  # a few candidates at a time
    upper = torch.tensor([[3.7]])
    threshold = observer.histogram_threshold(torch.from_numpy(counts).reshape(1, -1), upper)
    i = entropy_reference(counts, levels, stride, ignore)
    assert torch.equal(threshold, torch.tensor([[float(i)]]) * (upper / len(counts)))


def test_entropy_levels_follow_the_integer_range():
    assert HistogramEntropy(8).levels == 128
    assert HistogramEntropy(8, narrow_range=True).levels == 128
    assert HistogramEntropy(8, signed=False).levels == 256
    assert HistogramEntropy(8, signed=False, narrow_range=True).levels == 255


def test_entropy_rows_are_independent_and_match_the_reference():
    rng = np.random.default_rng(0)
    counts = np.stack([rng.poisson(500 * np.exp(-np.arange(300) / s)) for s in (20, 60, 150)]).astype(np.int64)
    observer = HistogramEntropy(5, histogram_num_bins=300)
    observer.chunk_elements = 500  # several chunks of candidates
    upper = torch.tensor([[1.0], [2.0], [0.5]])
    threshold = observer.histogram_threshold(torch.from_numpy(counts), upper)
    for r in range(3):
        i = entropy_reference(counts[r], 16, 1, True)
        assert threshold[r, 0] == torch.tensor(float(i)) * (upper[r, 0] / 300)


@given(counts=histograms(), spec=quantizer_ranges, chunked=st.booleans())
def test_histogram_mse_threshold_has_the_smallest_error(counts, spec, chunked):
    bit_width, signed, narrow = spec
    levels = levels_of(bit_width, signed, narrow)
    if not usable(levels, len(counts)):
        return
    observer = HistogramMSE(bit_width, signed, narrow, len(counts))
    if chunked:
        observer.chunk_elements = 200  # a few candidates at a time
    upper = torch.tensor([[5.0]])
    threshold = observer.histogram_threshold(torch.from_numpy(counts).reshape(1, -1), upper)
    width = upper / len(counts)
    m = round(float(threshold / width))
    assert torch.equal(threshold, torch.tensor([[float(m)]]) * width)
    errors = mse_errors_reference(counts, float(observer.divisor), float(levels - 1))
    best = errors.min()
    slack = 1e-9 * best + 1e-12 * float(np.sum(counts * np.arange(1, len(counts) + 1) ** 2))
    assert errors[m - 1] <= best + slack
    abs_max_edge = int(np.nonzero(counts)[0][-1]) + 1
    assert errors[m - 1] <= errors[abs_max_edge - 1] + slack  # no worse than abs-max
    assert bool((errors[m:] > best - slack).all())  # ties go to the largest threshold
    # The error the implementation minimises is this one.
    assert np.allclose(observer.errors(torch.from_numpy(counts).reshape(1, -1))[0].numpy(), errors, rtol=1e-9)


def test_histogram_mse_is_close_to_mse_on_the_data():
    torch.manual_seed(0)
    x = torch.randn(1, 100000)
    observer = HistogramMSE(4).train()
    threshold = observer(x)
    scale = threshold / 8
    error = ((torch.clamp(torch.round(x / scale), -8, 7) * scale - x) ** 2).mean()
    abs_max_scale = x.abs().max() / 8
    abs_max_error = ((torch.clamp(torch.round(x / abs_max_scale), -8, 7) * abs_max_scale - x) ** 2).mean()
    assert float(error) < 0.5 * float(abs_max_error)
    assert 2.0 < float(threshold) < 3.5  # ~2.5 sigma for 4 bits


def percentile_reference(counts: np.ndarray, q: float) -> float:
    """The percentile in bins: the smallest t where the piecewise-linear CDF reaches q%."""
    cumulative = np.cumsum(counts).astype(np.float64)
    target = cumulative[-1] * (q / 100.0)
    b = min(int(np.searchsorted(cumulative, max(target, 0.5), side="left")), len(counts) - 1)
    before = cumulative[b] - counts[b]
    fraction = (target - before) / counts[b] if counts[b] > 0 else 0.0
    return b + min(max(fraction, 0.0), 1.0)


@given(counts=histograms(), q=st.floats(0.0, 100.0))
def test_histogram_percentile_matches_the_reference(counts, q):
    observer = HistogramPercentile(q, len(counts))
    upper = torch.tensor([[2.5]])
    threshold = observer.histogram_threshold(torch.from_numpy(counts).reshape(1, -1), upper)
    expected = percentile_reference(counts, q) * 2.5 / len(counts)
    assert float(threshold) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    last_edge = (np.nonzero(counts)[0][-1] + 1) * 2.5 / len(counts)
    if q == 100.0:
        assert float(threshold) == pytest.approx(last_edge, rel=1e-6)
    if q == 0.0:
        first_edge = np.nonzero(counts)[0][0] * 2.5 / len(counts)
        assert float(threshold) == pytest.approx(first_edge, rel=1e-6, abs=1e-12)


@given(batches=batch_sequences(max_batches=3, max_elements=40), q=st.floats(0.0, 100.0))
def test_histogram_percentile_is_within_a_bin_of_the_data_percentile(batches, q):
    observer = HistogramPercentile(q, 64)
    threshold = train_on(observer, batches)[-1]
    width = observer.upper() / 64
    data = np.concatenate([np.abs(x) for x in batches], axis=1)
    exact = np.percentile(data, q, axis=1, method="inverted_cdf").reshape(-1, 1)
    assert bool((torch.abs(threshold - torch.from_numpy(exact).float()) <= width * 1.0001 + 1e-6).all())


# ---------------------------------------------------------------------------------------------
# Histograms: training, eval, reset, errors

HISTOGRAMS = [
    lambda: HistogramStats(128),
    lambda: HistogramEntropy(4, histogram_num_bins=128),
    lambda: HistogramEntropy(8, False, False, 512, 3, False),
    lambda: HistogramMSE(4, histogram_num_bins=128),
    lambda: HistogramMSE(8, signed=False, narrow_range=True, histogram_num_bins=256),
    lambda: HistogramPercentile(99.0, 128),
]
HISTOGRAM_IDS = ["stats", "entropy", "entropy_unsigned", "mse", "mse_unsigned", "percentile"]


def _batches(rows: int = 2, n: int = 400, count: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(rows, n, generator=g) * (1.0 + k) for k in range(count)]


@pytest.mark.parametrize("make", HISTOGRAMS, ids=HISTOGRAM_IDS)
def test_histogram_threshold_is_that_of_the_accumulated_counts(make):
    observer = make()
    outputs = train_on(observer, [x.numpy() for x in _batches()])
    assert torch.equal(outputs[-1], observer.histogram_threshold(observer.counts(), observer.upper()))
    assert outputs[-1].shape == (2, 1)
    assert observer.state_dict() == {}


@pytest.mark.parametrize("make", HISTOGRAMS, ids=HISTOGRAM_IDS)
def test_histogram_eval_does_not_update_and_reset_forgets(make):
    batches = _batches()
    observer, fresh = make(), make()
    assert torch.equal(observer.eval()(batches[1]), train_on(fresh, [batches[1].numpy()])[0])  # nothing seen yet
    observer.train()
    for x in batches[:2]:
        trained = observer(x)
    counts = observer.counts().clone()
    observer.eval()
    assert torch.equal(observer(batches[3] * 50), trained)
    assert torch.equal(observer.counts(), counts)
    observer.reset_observer()
    assert observer.counts().shape == (0, observer.num_bins)
    assert torch.equal(observer.eval()(batches[2]), make().eval()(batches[2]))
    assert torch.equal(observer.train()(batches[2]), make().train()(batches[2]))


@pytest.mark.parametrize(
    "make",
    [RunningAbsMax, RunningAbsMinMax, RunningNegativeMinOrZero, *HISTOGRAMS],
    ids=["running_abs_max", "running_abs_min_max", "running_negative_min", *HISTOGRAM_IDS],
)
def test_a_batch_with_another_number_of_rows_is_refused(make):
    observer = make().train()
    observer(torch.randn(3, 10))
    name = type(observer).__name__
    with pytest.raises(INPUT_ERROR, match=rf"{name}.* 2 rows.* 3 rows"):
        observer(torch.randn(2, 10))
    with pytest.raises(INPUT_ERROR, match=name):
        observer.eval()(torch.randn(4, 10))
    observer.reset_observer()
    assert observer.train()(torch.randn(2, 10)).shape == (2, 1)


@pytest.mark.parametrize("make", HISTOGRAMS, ids=HISTOGRAM_IDS)
def test_histograms_refuse_nan_and_inf(make):
    observer = make().train()
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 10)
        x[1, 3] = bad
        with pytest.raises(INPUT_ERROR, match="NaN or infinite"):
            observer(x)


@pytest.mark.parametrize("make", HISTOGRAMS, ids=HISTOGRAM_IDS)
def test_histograms_keep_the_input_dtype(make):
    observer = make().train()
    x = torch.randn(2, 50)
    assert observer(x.to(torch.float16)).dtype == torch.float16
    assert observer(x.to(torch.float64)).dtype == torch.float64
    assert observer.counts().dtype == torch.int64


def test_histogram_state_survives_a_module_dtype_change():
    observer = HistogramEntropy(4, histogram_num_bins=64).train()
    observer(torch.randn(1, 100))
    observer.to(torch.float64)  # what a proxy does to follow its layer
    assert observer.counts().dtype == torch.int64 and int(observer.counts().sum()) == 100
    observer(torch.randn(1, 100, dtype=torch.float64))
    assert int(observer.counts().sum()) == 200


# ---------------------------------------------------------------------------------------------
# TorchScript


SCRIPTABLE = [RunningAbsMax, RunningAbsMinMax, RunningNegativeMinOrZero, *HISTOGRAMS]


@pytest.mark.parametrize(
    "make", SCRIPTABLE, ids=["running_abs_max", "running_abs_min_max", "running_negative_min", *HISTOGRAM_IDS]
)
def test_scripted_observers_give_identical_outputs(make):
    eager, scripted = make(), torch.jit.script(make())
    batches = _batches()
    calls = [(False, batches[0]), (True, batches[1]), (True, batches[2] * 3), (False, batches[3]), (True, batches[0])]
    for training, x in calls:
        eager.train(training)
        scripted.train(training)
        assert torch.equal(eager(x), scripted(x))
    eager.reset_observer()
    scripted.reset_observer()
    assert torch.equal(eager.train()(batches[3]), scripted.train()(batches[3]))
    with pytest.raises(torch.jit.Error if not JIT_ENABLED else INPUT_ERROR, match="QuantInputError: .* 1 rows"):
        scripted(batches[0][:1])


# ---------------------------------------------------------------------------------------------
# Configuration errors


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: HistogramStats(1), "histogram_num_bins .* at least 2, got 1"),
        (lambda: HistogramStats(64.0), "histogram_num_bins .* got 64.0"),
        (lambda: HistogramStats(True), "histogram_num_bins .* got True"),
        (lambda: HistogramEntropy(8, histogram_num_bins=100), r"histogram_num_bins \(100\) .* 128 .* 8-bit signed"),
        (lambda: HistogramEntropy(8, False, histogram_num_bins=255), r"histogram_num_bins \(255\) .* 256 .* unsigned"),
        (lambda: HistogramMSE(16), r"histogram_num_bins \(2048\) .* 32768"),
        (lambda: HistogramEntropy(8, entropy_stride=0), "entropy_stride .* at least 1, got 0"),
        (lambda: HistogramEntropy(8, entropy_ignore_zero_bin="yes"), "entropy_ignore_zero_bin .* 'yes'"),
        (lambda: HistogramEntropy(0), "bit_width .* got 0"),
        (lambda: HistogramEntropy(1, signed=True), "single non-negative code"),
        (lambda: HistogramMSE(1, signed=False, narrow_range=True), "single non-negative code"),
        (lambda: HistogramMSE(2.5), "bit_width .* got 2.5"),
        (lambda: HistogramPercentile(100.5), r"high_percentile_q .* got 100.5"),
        (lambda: HistogramPercentile(histogram_num_bins=0), "histogram_num_bins .* got 0"),
    ],
)
def test_bad_arguments_are_config_errors(build, match):
    with pytest.raises(QuantConfigError, match=match):
        build()
