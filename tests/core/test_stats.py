"""Statistics over the rows of a ``(groups, elements)`` matrix, against numpy references."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.core.stats import (
    MSE,
    AbsMax,
    AbsMinMax,
    AbsPercentile,
    NegativeMinOrZero,
    NegativePercentileOrZero,
    PercentileInterval,
)
from quantwire.errors import QuantConfigError

matrices = arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.integers(1, 40)),
    elements=st.floats(-1e4, 1e4, width=32),
)
percentiles = st.floats(0.0, 100.0)


def column(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, 1)


@given(x=matrices)
def test_abs_max(x):
    assert np.array_equal(AbsMax()(torch.from_numpy(x)).numpy(), column(np.abs(x).max(axis=1)))


@given(x=matrices)
def test_abs_min_max(x):
    expected = np.maximum(x.max(axis=1), 0) - np.minimum(x.min(axis=1), 0)
    assert np.array_equal(AbsMinMax()(torch.from_numpy(x)).numpy(), column(expected))


@given(x=matrices)
def test_negative_min_or_zero(x):
    assert np.array_equal(NegativeMinOrZero()(torch.from_numpy(x)).numpy(), column(np.minimum(x.min(axis=1), 0)))


def nearest_rank_values(row: np.ndarray, q: float) -> set[float]:
    """The values a nearest-rank percentile may take: the ``k``-th smallest element with ``k``
    within half a rank of ``q% * n`` (either neighbour on an exact half), ``1 <= k <= n``."""
    n = len(row)
    ordered = np.sort(row)
    position = q / 100 * n
    ranks = {min(max(math.floor(position + 0.5 + d), 1), n) for d in (-1e-9, 0.0, 1e-9)}
    return {float(ordered[k - 1]) for k in ranks}


@given(x=matrices, q=percentiles)
def test_abs_percentile_is_a_nearest_rank(x, q):
    result = AbsPercentile(q)(torch.from_numpy(x)).numpy()
    assert result.shape == (x.shape[0], 1)
    for row, value in zip(np.abs(x), result[:, 0], strict=True):
        assert float(value) in nearest_rank_values(row, q)
    if q == 100.0:
        assert np.array_equal(result, column(np.abs(x).max(axis=1)))


@given(x=matrices, q=percentiles)
def test_negative_percentile_or_zero(x, q):
    result = NegativePercentileOrZero(q)(torch.from_numpy(x)).numpy()
    for row, value in zip(x, result[:, 0], strict=True):
        assert float(value) in {min(v, 0.0) for v in nearest_rank_values(row, q)}
    assert bool((result <= 0).all())


@given(x=matrices, low=st.floats(0.0, 49.0), high=st.floats(51.0, 100.0))
def test_percentile_interval(x, low, high):
    result = PercentileInterval(low, high)(torch.from_numpy(x)).numpy()
    for row, value in zip(x, result[:, 0], strict=True):
        widths = {
            float(np.float32(max(h, 0.0) - min(lo, 0.0)))
            for h in nearest_rank_values(row, high)
            for lo in nearest_rank_values(row, low)
        }
        assert float(value) in widths
    # The interval never exceeds the full range and always covers zero.
    assert bool((result <= column(np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0))).all())
    assert bool((result >= 0).all())


@pytest.mark.parametrize(
    ("stat", "kwargs"),
    [
        (AbsPercentile, {"high_percentile_q": 101}),
        (NegativePercentileOrZero, {"low_percentile_q": -1}),
        (PercentileInterval, {"low_percentile_q": 60, "high_percentile_q": 40}),
    ],
)
def test_bad_percentiles_are_rejected(stat, kwargs):
    with pytest.raises(QuantConfigError, match="percentile"):
        stat(**kwargs)


def quantization_mse(row: np.ndarray, threshold: float, divisor: float, low: float, high: float) -> float:
    row = row.astype(np.float64)
    scale = max(threshold / divisor, 1e-30)
    quantized = np.clip(np.round(row / scale), low, high) * scale
    return float(np.mean((quantized - row) ** 2))


@given(
    x=matrices,
    bit_width=st.integers(2, 8),
    signed=st.booleans(),
    narrow_range=st.booleans(),
    num_candidates=st.integers(1, 40),
    min_ratio=st.floats(0.05, 1.0),
)
def test_mse_threshold_beats_abs_max(x, bit_width, signed, narrow_range, num_candidates, min_ratio):
    result = MSE(bit_width, signed, narrow_range, num_candidates, min_ratio)(torch.from_numpy(x)).numpy()
    assert result.shape == (x.shape[0], 1)
    if signed:
        low, high = -(2 ** (bit_width - 1)) + int(narrow_range), 2 ** (bit_width - 1) - 1
        divisor = -low
    else:
        low, high = 0, 2**bit_width - 1 - int(narrow_range)
        divisor = high
    ratios = [1.0 - (1.0 - min_ratio) * i / max(num_candidates - 1, 1) for i in range(num_candidates)]
    for row, threshold in zip(x, result[:, 0], strict=True):
        abs_max = float(np.abs(row).max())
        candidates = [abs_max * r for r in ratios]
        # The threshold is one of the candidates (up to float32 rounding of the product) ...
        assert min(abs(threshold - c) for c in candidates) <= 1e-6 * abs_max
        # ... and quantizes the row no worse than abs-max, in fact as well as the best candidate.
        errors = [quantization_mse(row, c, divisor, low, high) for c in candidates]
        error = quantization_mse(row, float(threshold), divisor, low, high)
        slack = 1e-4 * errors[0] + 1e-12
        assert error <= errors[0] + slack
        assert error <= min(errors) + slack


@given(
    size=st.integers(4096, 20000),
    percentile=st.sampled_from([99.999, 99.99, 99.9, 99.5]),
    kind=st.sampled_from(["normal", "relu", "ties", "constant", "nan", "inf"]),
    seed=st.integers(0, 2**16),
)
def test_high_percentile_of_a_long_row_is_topks_value(size, percentile, kind, seed):
    """Short upper tails of long rows are selected in two steps (block maxima, then the blocks
    that reach the bound): the value is exactly the one a full ``topk`` gives, NaN included."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, size, generator=generator)
    if kind == "relu":
        x = x.clamp_min(0.0)
    elif kind == "ties":
        x = torch.randint(0, 4, (1, size), generator=generator).float()
    elif kind == "constant":
        x = torch.full((1, size), 0.5)
    elif kind in ("nan", "inf"):
        x[0, int(torch.randint(0, size, (1,), generator=generator))] = float(kind)
    k = min(max(int(percentile * 0.01 * size + 0.5), 1), size)
    expected = torch.topk(x.abs(), size - k + 1, dim=-1).values.amin(dim=-1, keepdim=True)
    got = AbsPercentile(percentile)(x.abs())
    assert torch.equal(got, expected) or (bool(got.isnan()) and bool(expected.isnan()))
