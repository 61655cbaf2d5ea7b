"""Integer-only softmax, GELU and LayerNorm (I-BERT): exact integer square root, integer outputs
on the stated grids, and the accuracy cost against float64 on inputs typical of BERT.

``pytest tests/backend/test_nonlinear.py -s -k error_table`` prints the mean/max error table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from quantwire.backend.fixed_point import BackendError, rounding_right_shift
from quantwire.backend.nonlinear import (
    EXP_ZERO_BELOW_HALVINGS,
    LAYER_NORM_DEFAULT_OUTPUT_SCALE,
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    _round_shift,
    int_exp,
    int_gelu,
    int_layer_norm,
    int_softmax,
    int_sqrt,
)

# measured on a 10**6-point grid of (-ln2, 0] / [-8, 8] (see test_polynomial_errors_match_the_stated_constants)
EXP_RELATIVE_RANGE = (-0.0031, 0.0025)  # relative error of 0.3585 (p + 1.353)**2 + 0.344
EXP_SPREAD = EXP_RELATIVE_RANGE[1] - EXP_RELATIVE_RANGE[0]
GELU_POLYNOMIAL_ERROR = 0.0183  # max |GELU with the i-erf polynomial - GELU|
GELU_WORKING_GRID_ERROR = 5e-4  # the erf constants and input on a grid of 2**12..2**13 steps per 1.769

seeds = st.integers(0, 2**32 - 1)
code_bits = st.integers(8, 16)


def symmetric_scale(bits: int, max_abs: float) -> float:
    """The scale of a signed ``bits``-bit grid (narrow range) reaching ``max_abs``."""
    return max_abs / (2 ** (bits - 1) - 1)


def on_grid(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """Integer codes of ``x`` on a signed ``bits``-bit grid, float64 (the backend's carrier)."""
    limit = 2 ** (bits - 1) - 1
    return torch.round(x / scale).clamp(-limit, limit)


def real(result: tuple[torch.Tensor, float]) -> torch.Tensor:
    codes, scale = result
    assert codes.dtype == torch.int64
    return codes.double() * scale


# --------------------------------------------------------------------------------------------
# integer square root and rounding


SQRT_EDGES = [0, 1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 2**31, 2**32 - 1, 2**62, 2**63 - 1]
SQRT_EDGES += [r * r + d for r in (3037000499, 2**31 - 1, 2**31, 46341, 65535) for d in (-1, 0, 1)]


@given(values=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50))
@example(values=SQRT_EDGES)
def test_int_sqrt_is_the_exact_floor_square_root(values):
    result = int_sqrt(torch.tensor(values, dtype=torch.int64))
    assert result.dtype == torch.int64
    assert result.tolist() == [math.isqrt(v) for v in values]


@given(roots=st.lists(st.integers(1, 3037000499), min_size=1, max_size=50), offset=st.integers(-1, 1))
def test_int_sqrt_around_perfect_squares(roots, offset):
    values = [min(r * r + offset, 2**63 - 1) for r in roots]
    assert int_sqrt(torch.tensor(values)).tolist() == [math.isqrt(v) for v in values]


def test_int_sqrt_exhaustive_below_2_to_the_20():
    values = torch.arange(0, 2**20)
    expected = torch.tensor([math.isqrt(v) for v in range(2**20)])
    assert torch.equal(int_sqrt(values), expected)


def test_int_sqrt_accepts_float64_codes_and_rejects_negative_or_fractional_ones():
    assert int_sqrt(torch.tensor([16.0, 17.0, 2.0**52])).tolist() == [4, 4, 2**26]
    with pytest.raises(BackendError, match="-3"):
        int_sqrt(torch.tensor([4, -3]))
    with pytest.raises(BackendError, match="2.5"):
        int_sqrt(torch.tensor([2.5]))


@given(values=st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=40), shift=st.integers(0, 62))
def test_round_shift_rounds_half_to_even_like_the_backend(values, shift):
    x = torch.tensor(values, dtype=torch.int64)
    expected = rounding_right_shift(x, shift)
    assert torch.equal(_round_shift(x, shift), expected)
    assert torch.equal(_round_shift(x, torch.full_like(x, shift)), expected)


# --------------------------------------------------------------------------------------------
# exp and softmax


def test_polynomial_errors_match_the_stated_constants():
    p = np.linspace(-math.log(2), 0, 10**6 + 1)
    relative = (0.3585 * (p + 1.353) ** 2 + 0.344) / np.exp(p) - 1
    assert EXP_RELATIVE_RANGE[0] <= relative.min() and relative.max() <= EXP_RELATIVE_RANGE[1]
    x = np.linspace(-8, 8, 10**6 + 1)
    u = np.abs(x) / math.sqrt(2)
    erf = np.sign(x) * (-0.2888 * (np.minimum(u, 1.769) - 1.769) ** 2 + 1)
    gelu = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(x * (1 + erf) / 2 - gelu).max() <= GELU_POLYNOMIAL_ERROR


@given(seed=seeds, bits=code_bits, max_abs=st.floats(1.0, 40.0))
def test_int_exp_is_within_the_polynomial_relative_error(seed, bits, max_abs):
    scale = symmetric_scale(bits, max_abs)
    generator = torch.Generator().manual_seed(seed)
    q = -torch.randint(0, 2 ** (bits - 1), (500,), generator=generator)
    q[:2] = torch.tensor([0, -(2 ** (bits - 1) - 1)])
    codes, exp_scale = int_exp(q, scale)
    x = q.double() * scale
    expected = torch.exp(x)
    # polynomial + 2**-16 relative per ln2 from the rounded ln2 constant + one output step
    bound = expected * (-EXP_RELATIVE_RANGE[0] + 2e-5 * (1 - x / math.log(2))) + exp_scale
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0
    assert bool(((codes.double() * exp_scale - expected).abs() <= bound).all())


def test_int_exp_is_exactly_zero_at_and_below_its_cutoff_and_rejects_positive_inputs():
    scale = 1e-3
    cutoff = -math.ceil(EXP_ZERO_BELOW_HALVINGS * math.log(2) / scale)
    codes, _ = int_exp(torch.tensor([cutoff, cutoff - 1, -(2**62)]), scale)
    assert codes.tolist() == [0, 0, 0]
    with pytest.raises(BackendError, match="got code 3"):
        int_exp(torch.tensor([0, 3]), scale)


def softmax_bound(reference: torch.Tensor, codes: torch.Tensor, output_bits: int) -> torch.Tensor:
    """Rounding (one step at the clamped top code) + the exp polynomial's spread, p (1 - p) weighted."""
    rounding = 2.0 ** -(output_bits + 1) * (1 + (codes == 2**output_bits - 1).double())
    return rounding + EXP_SPREAD * 1.01 * reference * (1 - reference) + 2e-5


@given(
    seed=seeds,
    bits=code_bits,
    output_bits=st.sampled_from([8, 16]),
    length=st.integers(1, 128),
    spread=st.floats(0.1, 20.0),
    max_abs=st.floats(5.0, 20.0),
)
def test_int_softmax_is_close_to_float_softmax_on_bert_like_scores(seed, bits, output_bits, length, spread, max_abs):
    scale = symmetric_scale(bits, max_abs)
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.randn(4, length, generator=generator, dtype=torch.float64) * spread).clamp(-max_abs, max_abs)
    q = on_grid(scores, scale, bits)
    codes, out_scale = int_softmax(q, scale, output_bits=output_bits)
    assert out_scale == 2.0**-output_bits and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**output_bits - 1
    reference = torch.softmax(q * scale, dim=-1)
    error = (codes.double() * out_scale - reference).abs()
    assert bool((error <= softmax_bound(reference, codes, output_bits)).all()), float(error.max())
    if output_bits == 8:
        assert float(error.max()) <= 1e-2


@given(seed=seeds, bits=code_bits, masked=st.integers(1, 14))
def test_int_softmax_gives_masked_positions_exactly_zero(seed, bits, masked):
    scale = symmetric_scale(bits, 20.0)
    generator = torch.Generator().manual_seed(seed)
    q = on_grid(torch.randn(3, 16, generator=generator, dtype=torch.float64) * 3, scale, bits)
    q[:, 16 - masked :] = -(2**62)  # an additive finfo.min mask, saturated
    q[0, 0] = on_grid(torch.tensor(-10000.0, dtype=torch.float64), scale, 64)  # a -10000 mask
    codes, _ = int_softmax(q, scale, dim=1, output_bits=16)
    assert bool((codes[:, 16 - masked :] == 0).all()) and int(codes[0, 0]) == 0
    reference = torch.softmax(torch.where(q > -(2**61), q * scale, -math.inf), dim=1)
    assert float((codes.double() * 2.0**-16 - reference).abs().max()) <= 2e-5 + EXP_SPREAD / 4


def test_int_softmax_along_another_dim_and_rejects_bad_settings():
    q = torch.tensor([[0.0, -5.0], [-3.0, 2.0]])
    along_rows, _ = int_softmax(q, 0.5, dim=0, output_bits=8)
    assert torch.equal(along_rows, int_softmax(q.T.contiguous(), 0.5, dim=1, output_bits=8)[0].T)
    with pytest.raises(BackendError, match="output_bits"):
        int_softmax(q, 0.5, output_bits=0)
    with pytest.raises(BackendError, match="nan"):
        int_softmax(q, float("nan"))
    with pytest.raises(BackendError, match="0.5"):
        int_softmax(torch.tensor([0.5]), 1.0)


# --------------------------------------------------------------------------------------------
# GELU


@given(seed=seeds, bits=code_bits, max_abs=st.floats(2.0, 8.0))
def test_int_gelu_is_within_the_i_erf_polynomial_error(seed, bits, max_abs):
    scale = symmetric_scale(bits, max_abs)
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(600, generator=generator, dtype=torch.float64) * 2 - 1) * max_abs
    q = on_grid(x, scale, bits)
    codes, out_scale = int_gelu(q, scale)
    assert codes.dtype == torch.int64
    on_grid_error = (codes.double() * out_scale - F.gelu(q * scale)).abs()
    assert float(on_grid_error.max()) <= GELU_POLYNOMIAL_ERROR + GELU_WORKING_GRID_ERROR
    # against the unquantized input the grid adds at most |GELU'| <= 1.13 times half a step
    full_error = (codes.double() * out_scale - F.gelu(x)).abs()
    assert float(full_error.max()) <= GELU_POLYNOMIAL_ERROR + GELU_WORKING_GRID_ERROR + 1.13 * scale / 2


@given(scale=st.floats(2.0**-30, 2.0**10))
def test_int_gelu_is_exact_at_zero_and_saturates_to_identity_and_zero(scale):
    big = math.ceil(8.0 / scale) + 3
    codes, out_scale = int_gelu(torch.tensor([0, big, -big]), scale)
    values = codes.double() * out_scale
    assert values[0] == 0.0 and values[2] == 0.0
    assert math.isclose(float(values[1]), big * scale, rel_tol=1e-6)


def test_int_gelu_rejects_codes_that_would_overflow():
    with pytest.raises(BackendError, match=str(2**35)):
        int_gelu(torch.tensor([2**35]), 1e-9)


# --------------------------------------------------------------------------------------------
# LayerNorm


def layer_norm_bound(weight: torch.Tensor, features: int, output_scale: float) -> float:
    """Half an output step, the normalised value's 2**-21 and the 24-bit multiplier's 2**-23."""
    largest = float(weight.abs().max())
    return output_scale / 2 + largest * (2.0**-21 + 2.0**-22 * math.sqrt(features)) + 1e-12


def bert_like_rows(generator: torch.Generator, rows: int, features: int, outliers: int, outlier_size: float):
    """Residual-stream-like rows: unit noise plus a few large outlier features (as in BERT)."""
    x = torch.randn(rows, features, generator=generator, dtype=torch.float64)
    columns = torch.randperm(features, generator=generator)[:outliers]
    x[:, columns] *= outlier_size
    return x + 0.3 * torch.randn(rows, 1, generator=generator, dtype=torch.float64)


@given(
    seed=seeds,
    bits=code_bits,
    features=st.integers(64, 384),
    outliers=st.integers(0, 6),
    outlier_size=st.floats(1.0, 60.0),
    eps=st.sampled_from([1e-12, 1e-5]),
    output_scale=st.sampled_from([None, 2.0**-8, 0.05]),
)
def test_int_layer_norm_is_float_layer_norm_up_to_half_an_output_step(
    seed, bits, features, outliers, outlier_size, eps, output_scale
):
    generator = torch.Generator().manual_seed(seed)
    x = bert_like_rows(generator, 3, features, outliers, outlier_size)
    scale = symmetric_scale(bits, float(x.abs().max()))
    q = on_grid(x, scale, bits)
    weight = 1 + 0.5 * torch.randn(features, generator=generator, dtype=torch.float64)
    bias = 0.2 * torch.randn(features, generator=generator, dtype=torch.float64)
    codes, out_scale = int_layer_norm(q, scale, features, weight, bias, eps, output_scale)
    assert codes.dtype == torch.int64
    assert out_scale == (LAYER_NORM_DEFAULT_OUTPUT_SCALE if output_scale is None else output_scale)
    reference = F.layer_norm(q * scale, (features,), weight, bias, eps)
    error = (codes.double() * out_scale - reference).abs()
    assert float(error.max()) <= layer_norm_bound(weight, features, out_scale)


@given(seed=seeds, features=st.integers(64, 384))
def test_int_layer_norm_reduces_wide_codes_before_the_sums(seed, features):
    # 32-bit codes (an I-BERT residual accumulator): n max|q| > 2**30, so the rows are first
    # shifted right by the excess bits; that rounding moves each input by at most half a new step
    generator = torch.Generator().manual_seed(seed)
    x = bert_like_rows(generator, 2, features, 2, 30.0)
    scale = symmetric_scale(32, float(x.abs().max()))
    q = on_grid(x, scale, 32)
    excess = (int(q.abs().max()) * features).bit_length() - 30
    assert excess > 0
    codes, out_scale = int_layer_norm(q, scale, features)
    reference = F.layer_norm(q * scale, (features,), eps=1e-5)
    std = (q * scale).std(dim=-1, unbiased=False, keepdim=True)
    input_rounding = 2.0 ** (excess - 1) * scale / std  # in units of the normalised output
    bound = out_scale / 2 + (2 + reference.abs()) * input_rounding + 2.0**-19
    assert bool(((codes.double() * out_scale - reference).abs() <= bound).all())


def test_int_layer_norm_of_a_constant_row_is_the_bias_and_clamps_to_output_bits():
    bias = torch.tensor([0.25, -0.5, 1.0, 3.0], dtype=torch.float64)
    codes, out_scale = int_layer_norm(torch.full((2, 4), 7), 0.1, 4, bias=bias, output_scale=0.25, output_bits=4)
    assert codes.tolist() == [[1, -2, 4, 7]] * 2 and out_scale == 0.25
    codes, _ = int_layer_norm(torch.full((1, 4), 7), 0.1, 4, bias=bias * 100, output_scale=0.25, output_bits=4)
    assert codes.tolist() == [[7, -8, 7, 7]]


def test_int_layer_norm_over_two_dims_and_bad_arguments():
    q = torch.randint(-100, 100, (2, 3, 4, 5))
    codes, out_scale = int_layer_norm(q, 0.1, (4, 5))
    reference = F.layer_norm(q.double() * 0.1, (4, 5))
    assert float((codes.double() * out_scale - reference).abs().max()) <= out_scale / 2 + 1e-5
    with pytest.raises(BackendError, match=r"does not end with normalized_shape \(6,\)"):
        int_layer_norm(q, 0.1, 6)
    with pytest.raises(BackendError, match=r"weight has shape \(3,\)"):
        int_layer_norm(q, 0.1, 5, weight=torch.ones(3))
    with pytest.raises(BackendError, match="inf"):
        int_layer_norm(q, math.inf, 5)
    with pytest.raises(BackendError, match="eps"):
        int_layer_norm(q, 0.1, 5, eps=-1.0)


# --------------------------------------------------------------------------------------------
# modules


def test_modules_on_real_inputs_match_their_integer_kernels():
    scale = symmetric_scale(8, 8.0)
    q = torch.arange(-127, 128, dtype=torch.float64).reshape(3, 85)
    x = q * scale
    softmax = IntSoftmax(scale, output_bits=8)
    codes, out_scale = softmax.forward_codes(q)
    assert torch.equal(softmax(x), codes.double() * out_scale)
    assert torch.equal(softmax(x) * 2**8, torch.round(softmax(x) * 2**8))  # exactly on the output grid
    gelu = IntGELU(torch.tensor(scale, dtype=torch.float64))
    assert torch.equal(gelu(x.float()), real(int_gelu(q, scale)))  # float32 inputs on the grid pass
    weight, bias = torch.rand(85, dtype=torch.float64), torch.rand(85, dtype=torch.float64)
    norm = IntLayerNorm(85, weight, bias, 1e-5, input_scale=scale, output_scale=2.0**-10)
    assert torch.equal(norm(x), real(int_layer_norm(q, scale, 85, weight, bias, 1e-5, 2.0**-10)))
    assert norm(x).dtype == torch.float64


def test_modules_name_the_off_grid_input_or_round_it_when_asked():
    gelu = IntGELU(0.25)
    with pytest.raises(BackendError, match=r"input 0\.3 is not on the grid of scale 0\.25"):
        gelu(torch.tensor([0.5, 0.3], dtype=torch.float64))
    rounding = IntGELU(0.25, check_grid=False)
    assert torch.equal(rounding(torch.tensor([0.3])), rounding(torch.tensor([0.25])))
    with pytest.raises(BackendError, match="nan"):
        gelu(torch.tensor([math.nan]))
    for bad in (0.0, -1.0, math.nan, math.inf, torch.tensor([0.1, 0.2])):
        with pytest.raises(BackendError, match="scale"):
            IntSoftmax(bad)


def test_int_softmax_module_takes_additive_masks():
    scale = symmetric_scale(8, 10.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.float64).round() * scale
    x = torch.cat([x, x]).clone()
    x[0, 3] = torch.finfo(torch.float32).min
    x[1, 3] = -math.inf
    probabilities = IntSoftmax(scale, output_bits=8)(x)
    assert probabilities[:, 3].tolist() == [0.0, 0.0]
    assert torch.equal(probabilities[0], probabilities[1])
    with pytest.raises(BackendError, match="inf"):
        IntSoftmax(scale)(torch.tensor([math.inf, 0.0]))


# --------------------------------------------------------------------------------------------
# a real attention-score tensor and the error table


def bert_attention_scores(initializer_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention scores (Q Kᵀ / sqrt(d) + additive mask) of a tiny random BertModel's first layer,
    captured with forward hooks, and the model's own attention probabilities."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=1000,
        initializer_range=initializer_range,
        attn_implementation="eager",
    )
    model = transformers.BertModel(config).eval()
    attention = model.encoder.layer[0].attention.self
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        attention.query.register_forward_hook(lambda m, i, o: captured.__setitem__("query", o)),
        attention.key.register_forward_hook(lambda m, i, o: captured.__setitem__("key", o)),
        attention.register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__("mask", kw["attention_mask"]), with_kwargs=True
        ),
    ]
    input_ids = torch.randint(0, 1000, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0  # padding
    with torch.no_grad():
        probabilities = model(input_ids=input_ids, attention_mask=mask, output_attentions=True).attentions[0]
    for hook in hooks:
        hook.remove()
    heads, size = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    query = captured["query"].double().view(2, 24, heads, size).transpose(1, 2)
    key = captured["key"].double().view(2, 24, heads, size).transpose(1, 2)
    scores = query @ key.transpose(-1, -2) / math.sqrt(size) + captured["mask"].double()
    return scores, probabilities.double()


@pytest.mark.parametrize("initializer_range", [0.02, 0.3])
@pytest.mark.parametrize("bits, output_bits", [(8, 8), (16, 8), (16, 16)])
def test_int_softmax_on_bert_attention_scores(initializer_range, bits, output_bits):
    scores, probabilities = bert_attention_scores(initializer_range)
    assert torch.allclose(torch.softmax(scores, dim=-1), probabilities, atol=1e-6)  # the capture is right
    visible = scores > -1e30
    scale = symmetric_scale(bits, float(scores[visible].abs().max()))
    softmax = IntSoftmax(scale, output_bits=output_bits)
    q = torch.where(visible, on_grid(scores, scale, bits), scores / scale)
    result = softmax(q * scale)
    reference = torch.softmax(q * scale, dim=-1)
    codes = (result * 2**output_bits).round()
    assert bool((result[~visible] == 0).all())
    assert bool(((result - reference).abs() <= softmax_bound(reference, codes, output_bits)).all())
    # against the model's float32 probabilities (unquantized scores): the input grid adds its part
    assert float((result - probabilities).abs().max()) <= 1e-2 + scale


class ErrorTable:
    """Rows of (function, setting, mean error, max error, bound); :meth:`add` checks the bound."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, float, float]] = []

    def add(self, function: str, setting: str, error: torch.Tensor, bound: float) -> None:
        largest = float(error.max())
        self.rows.append((function, setting, float(error.mean()), largest, bound))
        assert largest <= bound, (function, setting, largest, bound)

    def markdown(self) -> str:
        lines = ["| function | setting | mean abs error | max abs error | bound |", "|---|---|---|---|---|"]
        lines += [
            f"| {f} | {s} | {mean:.2e} | {largest:.2e} | {bound:.2e} |" for f, s, mean, largest, bound in self.rows
        ]
        return "\n".join(lines)


def softmax_rows(table: ErrorTable, generator: torch.Generator) -> None:
    scores = (torch.randn(256, 128, generator=generator, dtype=torch.float64) * 4).clamp(-20, 20)
    for bits in (8, 12, 16):
        scale = symmetric_scale(bits, 20.0)
        q = on_grid(scores, scale, bits)
        for output_bits in (8, 16):
            error = (real(int_softmax(q, scale, output_bits=output_bits)) - torch.softmax(q * scale, -1)).abs()
            setting = f"scores N(0, 4^2) clipped to [-20, 20], {bits}-bit codes, {output_bits}-bit out"
            table.add("int_softmax", setting, error, 2.0**-output_bits + EXP_SPREAD / 4 + 2e-5)
    for initializer_range in (0.02, 0.3):
        bert_scores, _ = bert_attention_scores(initializer_range)
        visible = bert_scores > -1e30
        scale = symmetric_scale(8, float(bert_scores[visible].abs().max()))
        q = torch.where(visible, on_grid(bert_scores, scale, 8), torch.full_like(bert_scores, -(2.0**62)))
        error = (real(int_softmax(q, scale)) - torch.softmax(q * scale, -1)).abs()
        setting = f"tiny BERT scores with padding mask (init {initializer_range}), 8-bit codes, 8-bit out"
        table.add("int_softmax", setting, error, 2.0**-8 + EXP_SPREAD / 4 + 2e-5)


def exp_rows(table: ErrorTable) -> None:
    for bits in (8, 16):
        scale = symmetric_scale(bits, 30.0)
        q = -torch.arange(0, 2 ** (bits - 1), dtype=torch.float64)
        codes, exp_scale = int_exp(q, scale)
        reference = torch.exp(q * scale)
        error = (codes.double() * exp_scale - reference).abs()
        table.add("int_exp", f"x in [-30, 0], {bits}-bit codes (absolute)", error, 0.0032 + exp_scale)
        relative = (error / reference)[reference >= 1e-4]
        table.add("int_exp", f"x in [-9.2, 0], {bits}-bit codes (relative)", relative, 0.0031 + 3e-4 + 1e4 * exp_scale)


def gelu_rows(table: ErrorTable) -> None:
    x = torch.linspace(-8, 8, 100001, dtype=torch.float64)
    for bits in (8, 16):
        scale = symmetric_scale(bits, 8.0)
        q = on_grid(x, scale, bits)
        gelu = real(int_gelu(q, scale))
        bound = GELU_POLYNOMIAL_ERROR + GELU_WORKING_GRID_ERROR
        table.add(
            "int_gelu", f"x in [-8, 8], {bits}-bit codes, vs GELU(grid x)", (gelu - F.gelu(q * scale)).abs(), bound
        )
        table.add(
            "int_gelu",
            f"x in [-8, 8], {bits}-bit codes, vs GELU(x)",
            (gelu - F.gelu(x)).abs(),
            bound + 1.13 * scale / 2,
        )


def layer_norm_rows(table: ErrorTable, generator: torch.Generator) -> None:
    for features in (64, 384):
        x = bert_like_rows(generator, 64, features, 4, 40.0)
        weight = 1 + 0.5 * torch.randn(features, generator=generator, dtype=torch.float64)
        bias = 0.2 * torch.randn(features, generator=generator, dtype=torch.float64)
        for bits in (8, 16):
            scale = symmetric_scale(bits, float(x.abs().max()))
            q = on_grid(x, scale, bits)
            reference = F.layer_norm(q * scale, (features,), weight, bias, 1e-12)
            eight_bit = symmetric_scale(8, float(reference.abs().max()))
            for output_scale, label in ((None, "2^-16 grid out"), (eight_bit, f"8-bit out (step {eight_bit:.3f})")):
                result = int_layer_norm(q, scale, features, weight, bias, 1e-12, output_scale)
                setting = f"n={features}, 4 outlier features x40, {bits}-bit codes, {label}"
                table.add(
                    "int_layer_norm",
                    setting,
                    (real(result) - reference).abs(),
                    layer_norm_bound(weight, features, result[1]),
                )


def test_error_table():
    """Mean/max absolute error of each integer kernel against float64 on the same grid inputs,
    each max checked against its bound; ``-s`` prints the table."""
    generator = torch.Generator().manual_seed(1234)
    table = ErrorTable()
    softmax_rows(table, generator)
    exp_rows(table)
    gelu_rows(table)
    layer_norm_rows(table, generator)
    print("\n" + table.markdown())
