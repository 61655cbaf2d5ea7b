"""AdaRound's learned rounding: :class:`AdaRoundRounding` and :class:`LearnedRoundIntQuant`.

The rectified sigmoid ``h(V)`` stays in ``[0, 1]``; the lazy initialisation sets ``h(V)`` to the
fractional part of the first input, so the hard decision (eval) rounds half up; eval output is
integer; the rounding regulariser alone, with ``beta`` annealed to 2, makes every decision hard;
a loaded ``V`` is kept (no re-initialisation) after a ``weights_only`` round trip; learned
rounding clamps after rounding, so rounding up at the range's end stays in range; and
``torch.jit.script`` gives the eager results.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from quantwire.core.quant import AdaRoundRounding, IntQuant, LearnedRoundIntQuant
from quantwire.nn import QuantLinear
from quantwire.quant import Int8WeightPerTensorFloat
from quantwire.quant.ptq import Int4WeightPerChannelAdaRound, Int8WeightPerTensorAdaRound

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def initialised(y: Tensor) -> AdaRoundRounding:
    rounding = AdaRoundRounding(tuple(y.shape))
    rounding.soft = True
    rounding(y)
    return rounding


@given(values=st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=64))
def test_soft_decision_is_in_the_unit_interval(values):
    rounding = AdaRoundRounding((len(values),))
    with torch.no_grad():
        rounding.value.copy_(torch.tensor(values))
    h = rounding.soft_decision()
    assert bool(((h >= 0) & (h <= 1)).all())
    with torch.no_grad():
        rounding.value.copy_(torch.tensor([float("inf"), float("-inf")] * len(values))[: len(values)])
    h = rounding.soft_decision()
    assert bool(((h >= 0) & (h <= 1)).all())


@given(values=st.lists(finite, min_size=1, max_size=64))
def test_initialisation_is_the_fractional_part_and_rounds_half_up(values):
    y = torch.tensor(values)
    rounding = initialised(y)
    rest = y - torch.floor(y)
    # A whole y starts at h = 1e-5, just inside the clamp, rather than on its edge.
    torch.testing.assert_close(rounding.soft_decision(), rest.clamp_min(1e-5), rtol=0, atol=2e-6)
    torch.testing.assert_close(rounding(y), y, rtol=1e-6, atol=1.2e-5)  # soft: floor + h = y

    up = rest >= 0.5
    clear = (rest - 0.5).abs() > 1e-5  # near-ties: float32 rounding in the init may go either way
    assert torch.equal(rounding.hard_decision().bool()[clear], up[clear])
    rounding.soft = False
    out = rounding(y)
    assert torch.equal(out, torch.round(out))  # integers
    assert torch.equal(out[clear], torch.floor(y + 0.5)[clear])


def test_decisions_are_hard_in_training_mode_unless_soft_is_set():
    y = torch.tensor([0.2, 1.7, -0.4, 3.5])
    rounding = initialised(y)
    rounding.soft = False
    rounding.train()
    assert torch.equal(rounding(y), torch.tensor([0.0, 2.0, 0.0, 4.0]))


def test_exact_ties_round_up():
    y = torch.tensor([-2.5, -0.5, 0.5, 1.5, 2.5, 126.5, -127.5])
    rounding = initialised(y)
    rounding.soft = False
    assert torch.equal(rounding(y), torch.tensor([-2.0, 0.0, 1.0, 2.0, 3.0, 127.0, -127.0]))


def test_the_regulariser_alone_makes_every_decision_hard():
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(256, generator=generator) * 10.0
    rounding = initialised(y)
    soft = rounding.soft_decision().detach()
    assert bool(((soft - 0.5).abs() < 0.4).any())  # some decisions start far from hard
    optimizer = torch.optim.Adam([rounding.value], lr=0.05)
    iters = 400
    for step in range(iters):
        beta = 2.0 + (20.0 - 2.0) * (1.0 - step / (iters - 1))
        loss = rounding.regularization(beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    h = rounding.soft_decision().detach()
    assert float((h - 0.5).abs().min()) >= 0.5 - 1e-3
    assert float(rounding.regularization(2.0).detach()) < 1e-2
    # Hard decisions agree with the soft ones they ended at.
    assert torch.equal(rounding.hard_decision().bool(), h > 0.5)


def test_a_loaded_value_wins_over_lazy_initialisation():
    generator = torch.Generator().manual_seed(1)
    y = torch.randn(4, 9, generator=generator) * 5.0
    source = initialised(y)
    with torch.no_grad():
        source.value.copy_(torch.randn(4, 9, generator=generator) * 3.0)  # "learned" decisions
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = AdaRoundRounding((4, 9))
    target.load_state_dict(torch.load(buffer, weights_only=True))
    for soft in (True, False):
        source.soft = target.soft = soft
        assert torch.equal(target(y), source(y))
    assert torch.equal(target.value, source.value)
    assert not torch.equal(target.value, initialised(y).value)


def test_a_layers_learned_rounding_survives_a_checkpoint():
    torch.manual_seed(2)
    layer = QuantLinear(16, 6, weight_quant=Int4WeightPerChannelAdaRound)
    layer.eval()
    rounding = layer.weight_quant.tensor_quant.int_quant.float_to_int_impl
    layer.quant_weight()  # initialises V
    with torch.no_grad():
        rounding.value.neg_()  # flip every decision
    flipped = layer.quant_weight().value.detach()

    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(3)
    other = QuantLinear(16, 6, weight_quant=Int4WeightPerChannelAdaRound)
    other.eval()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.quant_weight().value, flipped)


def test_learned_rounding_clamps_after_rounding():
    scale, zero_point, bit_width = torch.tensor(0.5), torch.tensor(0.0), torch.tensor(8.0)
    # y = x / scale: at the range's ends, just inside, beyond.
    y = torch.tensor([127.0, 126.6, 300.0, -127.0, -126.6, -127.5, -300.0, 0.3])
    x = y * scale
    learned = LearnedRoundIntQuant(True, True, AdaRoundRounding((8,)))
    clamp_first = IntQuant(True, True, float_to_int_impl=AdaRoundRounding((8,)))
    for quant in (learned, clamp_first):
        quant.float_to_int_impl.soft = True
        quant(scale, zero_point, bit_width, x)  # initialise V
        with torch.no_grad():
            quant.float_to_int_impl.value.fill_(10.0)  # round every element up
    for mode in (True, False):
        learned.float_to_int_impl.soft = mode
        out = (learned(scale, zero_point, bit_width, x) / scale).detach()
        assert float(out.max()) <= 127.0 and float(out.min()) >= -127.0
        assert out[0] == 127.0 and out[2] == 127.0 and out[5] == -127.0 and out[6] == -127.0
    # Clamping before rounding up (plain IntQuant) would leave the range: what learned rounding avoids.
    clamp_first.float_to_int_impl.soft = False
    assert float((clamp_first(scale, zero_point, bit_width, x) / scale).max()) == 128.0


def test_adaround_weight_quantizer_keeps_the_grid_of_its_base():
    torch.manual_seed(4)
    base = QuantLinear(24, 5, weight_quant=Int8WeightPerTensorFloat)
    learned = QuantLinear(24, 5, weight_quant=Int8WeightPerTensorAdaRound)
    learned.load_state_dict(base.state_dict(), strict=False)
    base.eval()
    learned.eval()
    q_base, q_learned = base.quant_weight(), learned.quant_weight()
    assert torch.equal(q_learned.scale, q_base.scale)
    assert torch.equal(q_learned.bit_width, q_base.bit_width)
    assert torch.equal(q_learned.value, q_base.value)  # random weights: no exact .5 ties


@pytest.mark.parametrize("kind", ["rounding", "int_quant"])
def test_torch_jit_script_matches_eager(kind):
    generator = torch.Generator().manual_seed(5)
    y = torch.randn(3, 16, generator=generator) * 4.0
    if kind == "rounding":
        eager = AdaRoundRounding((3, 16))

        def call(module):
            return module(y)
    else:
        eager = LearnedRoundIntQuant(True, True, AdaRoundRounding((3, 16)))
        scale, zero_point, bit_width = torch.tensor(0.05), torch.tensor(0.0), torch.tensor(4.0)

        def call(module):
            return module(scale, zero_point, bit_width, y)

    scripted = torch.jit.script(copy.deepcopy(eager))
    for mode in (True, False, True):
        eager.train(mode)
        scripted.train(mode)
        assert torch.equal(call(scripted), call(eager))
    with torch.no_grad():
        for module in (eager, scripted):
            for name, parameter in module.named_parameters():
                if name.endswith("value"):
                    parameter.mul_(-0.5)
    for mode in (True, False):
        eager.train(mode)
        scripted.train(mode)
        assert torch.equal(call(scripted), call(eager))
