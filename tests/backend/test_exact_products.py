"""The integer backend's fast exact arithmetic: float32 and split products equal the exact integer
product, the static accumulator bound holds, overflow handling is unchanged, and the float64
rescale equals the int64 one bit for bit."""

from __future__ import annotations

import struct
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from quantwire.backend.fixed_point import BackendError, fixed_point
from quantwire.backend.ops import (
    AccumulatorOverflowError,
    IntMatMul,
    MulQuant,
    MulShift,
    Quantize,
    output_l1_norms,
    plan_product,
)

FLOAT32_EXACT = 2**24


def random_codes(shape: tuple[int, ...], largest: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-largest, largest + 1, shape, generator=generator).double()


def worst_case_linear_input(weight: torch.Tensor, input_bound: int, rows: int) -> torch.Tensor:
    """Inputs at ``±input_bound`` matching the signs of the weight row with the largest L1 norm
    (the accumulator reaches the static bound), then its negation and the extremes."""
    row = weight[output_l1_norms("linear", weight).argmax()]
    worst = torch.where(row >= 0, float(input_bound), -float(input_bound))
    return torch.stack([worst, -worst, torch.full_like(worst, -input_bound), torch.full_like(worst, input_bound)])[
        :rows
    ]


def exact_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.long() @ weight.long().T


@given(
    out_features=st.integers(1, 12),
    in_features=st.integers(1, 300),
    largest_weight=st.integers(1, 127),
    margin=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    float32_codes=st.booleans(),
)
def test_float32_products_are_exact_up_to_the_bound(
    out_features, in_features, largest_weight, margin, seed, float32_codes
):
    weight = random_codes((out_features, in_features), largest_weight, seed)
    largest_l1 = int(output_l1_norms("linear", weight).max())
    if largest_l1 == 0:
        return
    input_bound = max((FLOAT32_EXACT - 1) // largest_l1 - margin, 0)
    matmul = IntMatMul("linear", weight, input_bound=input_bound)
    assert matmul.accumulator_bound == input_bound * largest_l1 < FLOAT32_EXACT
    x = torch.cat([worst_case_linear_input(weight, input_bound, 4), random_codes((5, in_features), input_bound, seed)])
    x = x.float() if float32_codes else x
    accumulator = matmul(x)
    assert accumulator.dtype == (torch.float32 if float32_codes else torch.float64)
    assert torch.equal(accumulator.long(), exact_linear(x, weight))
    # the static bound is reached by the worst case and never passed
    assert matmul.max_abs_accumulator == matmul.accumulator_bound


@given(
    in_features=st.integers(8, 200),
    input_bits=st.integers(14, 20),
    seed=st.integers(0, 2**16),
)
def test_split_products_are_exact_past_2_to_the_24(in_features, input_bits, seed):
    weight = random_codes((6, in_features), 15, seed)
    weight[0] = 15.0  # one row of the largest L1 norm: the worst case passes 2**24
    input_bound = 2 ** (input_bits - 1)
    plan = plan_product(input_bound, float(output_l1_norms("linear", weight).max()))
    matmul = IntMatMul("linear", weight, input_bound=input_bound)
    x = torch.cat([worst_case_linear_input(weight, input_bound, 4), random_codes((5, in_features), input_bound, seed)])
    accumulator = matmul(x)
    assert torch.equal(accumulator.long(), exact_linear(x, weight))
    assert matmul.max_abs_accumulator <= matmul.accumulator_bound
    if plan.bound >= FLOAT32_EXACT and plan.kind == "split":
        # each part's products fit float32: the low codes and the high codes
        largest_l1 = float(output_l1_norms("linear", weight).max())
        assert (2**plan.shift - 1) * largest_l1 < FLOAT32_EXACT
        assert -(-input_bound // 2**plan.shift) * largest_l1 < FLOAT32_EXACT
        assert float(accumulator.abs().max()) >= FLOAT32_EXACT or x.abs().max() < input_bound


def test_plans_pick_float32_then_split_then_float64():
    assert plan_product(127, 127 * 512).kind == "float32"
    split = plan_product(2**15, 15 * 200)
    assert split.kind == "split" and split.bound == 2**15 * 15 * 200
    assert plan_product(2**20, 127 * 4096).kind == "float64"  # no split fits either part


@pytest.mark.parametrize(
    ("op", "weight_shape", "kwargs", "input_shape"),
    [
        ("conv2d", (8, 3, 3, 3), {"padding": 1, "stride": 2}, (2, 3, 9, 9)),
        ("conv2d", (6, 2, 3, 3), {"padding": 1, "groups": 2}, (2, 4, 7, 7)),
        ("conv1d", (5, 3, 3), {"padding": "same", "dilation": 2}, (2, 3, 11)),
        ("conv3d", (4, 2, 2, 2, 3), {"padding": (0, 1, 1)}, (1, 2, 4, 5, 6)),
        ("conv_transpose2d", (4, 3, 3, 3), {"stride": 2, "groups": 2}, (2, 4, 5, 5)),
        ("conv_transpose1d", (3, 2, 4), {"stride": 3}, (2, 3, 7)),
    ],
)
@pytest.mark.parametrize("input_bits", [8, 16, 30])
def test_convolutions_are_exact_in_every_plan(op, weight_shape, kwargs, input_bits, input_shape):
    weight = random_codes(weight_shape, 127, 1)
    input_bound = 2 ** (input_bits - 1)
    matmul = IntMatMul(op, weight, input_bound=input_bound, accumulator_bits=64, **kwargs)
    x = random_codes(input_shape, input_bound, 2)
    x.view(-1)[:3] = torch.tensor([input_bound, -input_bound, -input_bound], dtype=torch.float64)
    exact = getattr(F, op)(x, weight, **kwargs)  # float64 holds these sums exactly (< 2**53)
    assert torch.equal(matmul(x), exact)
    assert matmul.max_abs_accumulator <= matmul.accumulator_bound


def test_the_static_bound_of_a_transposed_convolution_is_never_passed():
    weight = torch.full((4, 3, 3, 3), 127.0, dtype=torch.float64)
    matmul = IntMatMul("conv_transpose2d", weight, input_bound=128, stride=1, groups=2)
    accumulator = matmul(torch.full((1, 4, 6, 6), -128.0, dtype=torch.float64))
    assert float(accumulator.abs().max()) == matmul.accumulator_bound == 128 * 127 * 2 * 9


@pytest.mark.parametrize(
    "setting",
    ["mkldnn_conv_bf16", "mkldnn_matmul_bf16", "matmul_precision_medium", "nnpack_without_mkldnn"],
)
def test_reduced_precision_settings_do_not_break_exactness_and_are_restored(setting):
    """Codes of 12 bits are not exact in bfloat16, and NNPACK's Winograd convolution does not sum
    products exactly: IntMatMul pins full float32 precision inside, then restores the settings."""
    x = random_codes((16, 8, 10, 10), 2000, 3)
    weight = random_codes((16, 8, 3, 3), 3, 4)
    conv = IntMatMul("conv2d", weight, input_bound=2000, padding=1)
    linear_x, linear_w = random_codes((64, 96), 2000, 5), random_codes((32, 96), 3, 6)
    linear = IntMatMul("linear", linear_w, input_bound=2000)
    saved = (
        torch.backends.mkldnn.conv.fp32_precision,
        torch.backends.mkldnn.matmul.fp32_precision,
        torch.get_float32_matmul_precision(),
    )
    enter = {
        "mkldnn_conv_bf16": lambda: setattr(torch.backends.mkldnn.conv, "fp32_precision", "bf16"),
        "mkldnn_matmul_bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
        "matmul_precision_medium": lambda: torch.set_float32_matmul_precision("medium"),
        "nnpack_without_mkldnn": lambda: torch.backends.mkldnn.set_flags(False),
    }
    try:
        enter[setting]()
        before = (torch.backends.mkldnn.conv.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        nnpack_before = torch.backends.nnpack.set_flags(True)
        assert torch.equal(conv(x.float()).double(), F.conv2d(x, weight, padding=1))
        assert torch.equal(linear(linear_x.float()).long(), exact_linear(linear_x, linear_w))
        assert (torch.backends.mkldnn.conv.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == before
        assert torch.backends.nnpack.set_flags(nnpack_before[0]) == (True,)
    finally:
        torch.backends.mkldnn.set_flags(True)
        torch.backends.mkldnn.conv.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_overflow_raises_and_wraps_as_before_when_the_bound_does_not_rule_it_out():
    weight = torch.full((2, 64), 127.0)
    x = torch.full((1, 64), 127.0)
    matmul = IntMatMul("linear", weight, accumulator_bits=16, input_bound=127, name="fc.matmul")
    assert matmul.accumulator_bound == 127 * 127 * 64 >= 2**15
    with pytest.raises(AccumulatorOverflowError, match=r"fc.matmul \(linear\): a sum reached 1032256"):
        matmul(x)
    wrapping = IntMatMul("linear", weight, accumulator_bits=16, overflow="wrap", input_bound=127)
    expected = torch.tensor(127 * 127 * 64, dtype=torch.int64).to(torch.int16).item()
    assert wrapping(x.float()).flatten().tolist() == [expected, expected]
    # within the width nothing is refused, and the largest accumulator is still recorded
    small = IntMatMul("linear", weight, accumulator_bits=16, input_bound=127)
    assert small(torch.ones(1, 64)).flatten().tolist() == [127.0 * 64] * 2
    assert small.max_abs_accumulator == 127.0 * 64


@pytest.mark.parametrize(
    ("largest_q", "terms", "kind"), [(127, 64, "float32"), (2**12, 64, "split"), (2**15, 4096, "float64")]
)
def test_a_measured_product_of_two_activations_is_exact_in_every_plan(largest_q, terms, kind):
    q, k = random_codes((2, 3, 5, terms), largest_q, 7), random_codes((2, 3, terms, 4), 127, 8)
    q[0, 0, 0] = float(largest_q)
    k[0, 0, :, 0] = 127.0  # one output reaches the largest magnitude
    assert plan_product(largest_q, float(output_l1_norms("matmul", k).max())).kind == kind
    scores = IntMatMul("matmul", accumulator_bits=64, name="scores")
    exact = q.long() @ k.long()
    assert torch.equal(scores(q, k).long(), exact)  # float64 codes: summed in float64
    fits_float32 = float(q.abs().max()) < 2**24
    if fits_float32:  # float32 codes: the plan measured on the operands
        assert torch.equal(scores(q.float(), k.float()).long(), exact)
    assert scores.max_abs_accumulator == float(exact.abs().max())


def test_a_replaced_or_reloaded_weight_is_used():
    matmul = IntMatMul("linear", torch.ones(2, 3), input_bound=10)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert matmul(x).tolist() == [[6.0, 6.0]]
    matmul.load_state_dict({"weight": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -2.0]])})
    assert matmul(x).tolist() == [[1.0, -6.0]] and matmul.accumulator_bound == 20
    matmul.double()
    assert matmul(x).tolist() == [[1.0, -6.0]]


def test_quantize_gives_the_same_codes_in_float32():
    x = torch.randn(4, 1000, dtype=torch.float64) * 3
    x.view(-1)[:4] = torch.tensor([0.5 * 0.02, 1.5 * 0.02, -2.5 * 0.02, 1e6])  # ties and a clamp
    scale, zero_point = torch.tensor(0.02, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    wide = Quantize(scale, zero_point, -128, 127)(x)
    narrow = Quantize(scale, zero_point, -128, 127, codes_dtype=torch.float32)(x)
    assert wide.dtype == torch.float64 and narrow.dtype == torch.float32
    assert torch.equal(narrow.double(), wide)
    with pytest.raises(BackendError, match="Quantize wide: float32 can not hold codes"):
        Quantize(scale, zero_point, -(2**30), 2**30, "wide", codes_dtype=torch.float32)


def float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def round_half_even(value: Fraction) -> int:
    floor = value.numerator // value.denominator
    rest = value - floor
    return floor + 1 if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2) else floor


@given(
    acc=st.lists(st.integers(-(2**24), 2**24), min_size=1, max_size=16),
    multipliers=st.lists(st.floats(1e-6, 8.0), min_size=1, max_size=3),
    bias=st.floats(-1e4, 1e4),
    swl=st.sampled_from([16, 32, 40, 48]),
    sfl=st.integers(0, 40),
    power_of_two=st.booleans(),
)
def test_the_float64_rescale_equals_the_int64_one_bit_for_bit(acc, multipliers, bias, swl, sfl, power_of_two):
    if power_of_two:
        multipliers = [2.0 ** round(torch.tensor(m).log2().item()) for m in multipliers]
    channels = len(multipliers)
    try:
        multiplier = fixed_point(torch.tensor(multipliers, dtype=torch.float64), swl, sfl, "m")
        fixed_bias = fixed_point(torch.full((channels,), bias, dtype=torch.float64), 63, sfl, "b")
    except BackendError:
        return  # does not fit swl with this sfl
    accumulator = torch.tensor(acc, dtype=torch.float64).reshape(-1, 1).expand(-1, channels).contiguous()
    largest = max(abs(a) for a in acc)
    for bound in (None, largest, torch.full((channels,), float(largest))):
        shifted = MulShift(multiplier, fixed_bias, -1, "s", accumulator_bound=bound)(accumulator.float())
        quant = MulQuant(multiplier, fixed_bias, torch.tensor(-3.0), -(2**40), 2**40, -1, "q", bound)(accumulator)
        for row, a in enumerate(acc):
            for channel in range(channels):
                integer = a * int(multiplier.value[channel]) + int(fixed_bias.value[channel])
                expected = float(integer) * 2.0**-sfl  # int -> float64 rounds once, half to even
                assert float_bits(float(shifted[row, channel])) == float_bits(expected)
                assert quant[row, channel].item() == round_half_even(Fraction(integer, 2**sfl)) - 3


def test_a_rescale_whose_bound_is_too_wide_for_float64_runs_in_int64():
    odd = 2**39 - 1  # 39 significant bits: times accumulators of 2**24 it needs 63
    multiplier = fixed_point(torch.tensor([odd * 2.0**-38], dtype=torch.float64), 40, 38, "m")
    assert int(multiplier.value) == odd
    wide = MulShift(multiplier, None, -1, "wide", accumulator_bound=2**24)
    narrow = MulShift(multiplier, None, -1, "narrow", accumulator_bound=2**10)
    assert wide._largest_output is None and narrow._largest_output is not None
    acc = torch.tensor([2.0**24 - 1, -(2.0**24) + 3, 1001.0])
    expected = [float(int(a) * int(multiplier.value)) * 2.0**-38 for a in acc.tolist()]
    assert wide(acc).tolist() == expected
    with pytest.raises(BackendError, match="accumulator_bound must be finite magnitudes"):
        MulShift(multiplier, None, -1, "bad", accumulator_bound=float("inf"))
