"""Scaling modules: parameter shapes, power-of-two restriction at every step, the scale floor,
running statistics (EMA and exact average), and collect-then-learn scales."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwire.core.function_wrapper import OverChannelView
from quantwire.core.restrict_val import FloatRestrictValue, LogFloatRestrictValue, PowerOfTwoRestrictValue
from quantwire.core.scaling import (
    ConstScaling,
    IntScaling,
    ParameterFromRuntimeStatsScaling,
    ParameterScaling,
    PowerOfTwoIntScaling,
    RuntimeStatsScaling,
    StatsScaling,
)
from quantwire.core.stats import AbsMax
from quantwire.errors import QuantConfigError

positive = st.floats(2.0**-20, 2.0**20, width=32)
# Powers of two and their float32 neighbours: where a log2-and-ceil restriction can slip.
near_powers_of_two = st.builds(
    lambda k, ulps: float(
        np.float32(2.0**k) if ulps == 0 else np.nextafter(np.float32(2.0**k), np.float32(ulps * np.inf))
    ),
    st.integers(-20, 20),
    st.sampled_from([-1, 0, 1]),
)


def batches(max_count=5, shape=(2, 3, 4), magnitude=1e3):
    """A list of input batches; some are all zeros (the scale floor must catch them)."""
    elements = st.one_of(st.floats(-magnitude, magnitude, width=32), near_powers_of_two)
    batch = st.one_of(
        arrays(np.float32, shape, elements=elements),
        st.just(np.zeros(shape, dtype=np.float32)),
    )
    return st.lists(batch.map(torch.from_numpy), min_size=1, max_size=max_count)


def is_power_of_two(t: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(t.detach())
    return bool((mantissa == 0.5).all())


def abs_max_of(x: torch.Tensor) -> torch.Tensor:
    return x.abs().max()


@given(init=positive, shape=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple))
def test_parameter_scaling_broadcasts_a_scalar_init(init, shape):
    scaling = ParameterScaling(init, scaling_shape=shape)
    assert [name for name, _ in scaling.named_parameters()] == ["value"]
    assert "value" in scaling.state_dict()
    assert scaling.value.shape == shape
    scale = scaling(torch.zeros(1))
    assert torch.equal(scale, torch.full(shape, np.float32(init)))
    scale.sum().backward()
    assert torch.equal(scaling.value.grad, torch.ones(shape))


def test_parameter_scaling_rejects_an_init_that_cannot_broadcast():
    with pytest.raises(QuantConfigError, match="broadcast"):
        ParameterScaling(torch.ones(3), scaling_shape=(2, 1))


@given(init=positive)
def test_log_domain_parameter_scaling_stores_log2(init):
    scaling = ParameterScaling(init, restrict_scaling_impl=LogFloatRestrictValue())
    assert scaling.value.item() == pytest.approx(math.log2(np.float32(init)), abs=1e-6)
    torch.testing.assert_close(scaling(torch.zeros(1)), torch.tensor(np.float32(init)), rtol=1e-6, atol=0)


@given(init=st.one_of(positive, near_powers_of_two), min_val=st.floats(1e-12, 1e-3))
def test_power_of_two_standalone_scales(init, min_val):
    for module in (
        ConstScaling(init, PowerOfTwoRestrictValue(), min_val),
        ParameterScaling(init, (2, 1), PowerOfTwoRestrictValue(), min_val),
    ):
        scale = module(torch.zeros(1))
        assert is_power_of_two(scale)
        assert bool((scale >= np.float32(init)).all())  # ceil: the range is never shrunk


@given(xs=batches(), momentum=st.one_of(st.none(), st.floats(0.01, 1.0)), min_val=st.floats(1e-12, 1e-3))
def test_power_of_two_stats_scales_at_every_step(xs, momentum, min_val):
    restrict = PowerOfTwoRestrictValue
    modules = [
        StatsScaling(AbsMax(), restrict_scaling_impl=restrict(), scaling_min_val=min_val),
        RuntimeStatsScaling(
            AbsMax(),
            scaling_stats_momentum=momentum,
            restrict_scaling_impl=restrict(),
            scaling_min_val=min_val,
        ),
        ParameterFromRuntimeStatsScaling(2, AbsMax(), restrict_scaling_impl=restrict(), scaling_min_val=min_val),
    ]
    for module in modules:
        module.eval()
        assert is_power_of_two(module(xs[0]))  # eval before any statistic was collected
        module.train()
        for x in xs + xs:  # through and past the collection phase
            scale = module(x)
            assert is_power_of_two(scale) and scale.item() >= np.float32(min_val) / 2
            if module is modules[0]:
                assert scale.item() >= x.abs().max().item()  # ceil: the range is never shrunk
        module.eval()
        assert is_power_of_two(module(xs[0]))


@pytest.mark.parametrize("restrict", [FloatRestrictValue, LogFloatRestrictValue, PowerOfTwoRestrictValue])
@given(min_val=st.floats(1e-12, 1.0), steps=st.integers(1, 3))
def test_scale_floor_catches_all_zero_inputs(restrict, min_val, steps):
    zeros = torch.zeros(2, 3)
    modules = [
        StatsScaling(AbsMax(), restrict_scaling_impl=restrict(), scaling_min_val=min_val),
        RuntimeStatsScaling(AbsMax(), restrict_scaling_impl=restrict(), scaling_min_val=min_val),
        ParameterFromRuntimeStatsScaling(steps, AbsMax(), restrict_scaling_impl=restrict(), scaling_min_val=min_val),
    ]
    for module in modules:
        for _ in range(steps + 1):
            scale = module(zeros)
            assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
            # The floor is itself restricted (a power of two is rounded up, never down).
            assert bool((scale >= np.float32(min_val) * (1 - 1e-6)).all())


@pytest.mark.parametrize("min_val", [0.0, -1.0, math.inf, math.nan])
def test_scale_floor_must_be_positive_and_finite(min_val):
    with pytest.raises(QuantConfigError, match="scaling_min_val"):
        StatsScaling(AbsMax(), scaling_min_val=min_val)


@given(xs=batches(), momentum=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_runtime_stats_scaling_tracks_the_running_statistic(xs, momentum):
    view = OverChannelView(1)
    module = RuntimeStatsScaling(
        AbsMax(), view, scaling_shape=(1, 3, 1), scaling_stats_momentum=momentum, scaling_min_val=None
    )
    expected = None
    for step, x in enumerate(xs, start=1):
        batch = x.abs().amax(dim=(0, 2), keepdim=True).double()
        assert torch.equal(module(x), batch.float())  # training returns the batch statistic
        if expected is None:
            expected = batch
        elif momentum is None:
            expected = expected + (batch - expected) / step
        else:
            expected = expected * (1 - momentum) + batch * momentum
        torch.testing.assert_close(module.stats.running.double(), expected, rtol=1e-5, atol=1e-6)
    if momentum is None:
        mean = torch.stack([x.abs().amax(dim=(0, 2), keepdim=True) for x in xs]).double().mean(0)
        torch.testing.assert_close(module.stats.running.double(), mean, rtol=1e-5, atol=1e-6)
    module.eval()
    other = xs[0] * 3 + 1
    assert torch.equal(module(other), module.stats.running)  # eval: the buffer, not the input


@given(xs=batches(), steps=st.integers(1, 4), log_domain=st.booleans())
def test_parameter_from_runtime_stats_collects_then_learns(xs, steps, log_domain):
    restrict = LogFloatRestrictValue() if log_domain else FloatRestrictValue()
    module = ParameterFromRuntimeStatsScaling(steps, AbsMax(), restrict_scaling_impl=restrict)
    inputs = [xs[i % len(xs)] for i in range(steps)]
    for x in inputs:
        assert module.stats.is_collecting()
        # While collecting: the batch statistic itself (floored).
        torch.testing.assert_close(module(x), torch.clamp_min(abs_max_of(x), 1e-10), rtol=1e-6, atol=0)
        assert module.stats.value.grad is None
    assert not module.stats.is_collecting()
    average = torch.stack([abs_max_of(x) for x in inputs]).double().mean()
    stored = module.stats.value.detach().double()
    expected = torch.log2(average) if log_domain else average
    if bool(average > 0):
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-6)
    # From now on the parameter is the scale, whatever the input, and it learns.
    scale = module(xs[0] * 7 + 1)
    torch.testing.assert_close(scale, torch.clamp_min(restrict(module.stats.value), 1e-10))
    scale.backward()
    # (A log-domain value initialised from all-zero statistics is log2(0) = -inf, where exp2 has no
    # gradient: the scale sits at its floor, finite, but cannot learn. Left as Brevitas does.)
    if not (log_domain and bool(average == 0)):
        assert module.stats.value.grad is not None and bool(module.stats.value.grad != 0)


@given(xs=batches(), steps=st.integers(2, 4), done=st.integers(0, 5))
def test_parameter_from_runtime_stats_state_dict_restores_the_phase(xs, steps, done):
    module = ParameterFromRuntimeStatsScaling(steps, AbsMax())
    for i in range(done):
        module(xs[i % len(xs)])
    state = module.state_dict()
    assert any(key.endswith("_extra_state") for key in state)
    restored = ParameterFromRuntimeStatsScaling(steps, AbsMax())
    restored.load_state_dict(state)
    assert restored.stats.is_collecting() == module.stats.is_collecting() == (done < steps)
    for x in xs:  # both continue identically, through the end of the collection phase
        assert torch.equal(restored(x), module(x))
    assert torch.equal(restored.stats.value, module.stats.value)


@given(bit_width=st.integers(1, 16), signed=st.booleans(), narrow_range=st.booleans())
def test_int_scaling_divisors(bit_width, signed, narrow_range):
    bits = torch.tensor(float(bit_width))
    expected = 2 ** (bit_width - 1) - int(narrow_range) if signed else 2**bit_width - 1 - int(narrow_range)
    assert IntScaling(signed, narrow_range)(bits).item() == expected
    assert PowerOfTwoIntScaling(signed)(bits).item() == 2 ** (bit_width - int(signed))
