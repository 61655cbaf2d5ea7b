"""Observer mixins on activation quantizers: the scale a quant layer starts from after the
collection steps is the observer's statistic of all the batches, divided by the integer range."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from quantwire.core.stats import (
    MSE,
    AbsMax,
    AbsPercentile,
    HistogramEntropy,
    HistogramMSE,
    HistogramPercentile,
)
from quantwire.errors import QuantConfigError
from quantwire.function.int_range import int_scaling_divisor
from quantwire.nn import QuantIdentity, QuantReLU
from quantwire.quant.observers import (
    AsymmetricMinMaxObserver,
    EmaMinMaxObserver,
    EntropyObserver,
    HistogramObserver,
    HistogramPercentileObserver,
    Int8ActPerTensorFloatEntropy,
    Int8ActPerTensorFloatHistogram,
    Int8ActPerTensorFloatMinMax,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    ShiftedUint8ActPerTensorFloatMinMax,
    Uint8ActPerTensorFloatEntropy,
    Uint8ActPerTensorFloatHistogram,
    Uint8ActPerTensorFloatMinMax,
)
from quantwire.quant.scaled_int import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from quantwire.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloat

STEPS = 4


def batches(unsigned: bool = False) -> list[Tensor]:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 8, 16, generator=g) * scale for scale in (1.0, 3.0, 0.5, 2.0)]
    return [torch.relu(x) for x in xs] if unsigned else xs


def divisor(signed: bool) -> float:
    return float(int_scaling_divisor(signed, False, torch.tensor(8.0)))


def collected_scale(quant: type, xs: list[Tensor]) -> tuple[QuantIdentity, Tensor]:
    """The layer after ``STEPS`` training batches, and the scale it then uses in eval."""
    layer = QuantIdentity(act_quant=quant, collect_stats_steps=STEPS, return_quant_tensor=True)
    layer.train()
    for x in xs:
        layer(x)
    layer.eval()
    return layer, layer(xs[0]).scale


def over_batches(stats: torch.nn.Module, xs: list[Tensor]) -> Tensor:
    """A fresh observer's answer after seeing every batch (per tensor: one row)."""
    stats.train()
    for x in xs:
        out = stats(x.reshape(1, -1))
    return out.reshape(())


def average(values: list[Tensor]) -> Tensor:
    """The running average RuntimeStats keeps (momentum None), in the same order of operations."""
    running = values[0].clone()
    for k, value in enumerate(values[1:], start=1):
        running = running + (value - running) / (k + 1)
    return running


def ema(values: list[Tensor], momentum: float) -> Tensor:
    running = values[0].clone()
    for value in values[1:]:
        running = running * (1.0 - momentum) + value * momentum
    return running


def _per_batch(stats: torch.nn.Module, xs: list[Tensor]) -> list[Tensor]:
    return [stats(x.reshape(1, -1)).reshape(()) for x in xs]


CASES = {
    "min_max": (MinMaxObserver, lambda xs: torch.stack([x.abs().max() for x in xs]).max()),
    "ema_min_max": (EmaMinMaxObserver, lambda xs: ema(_per_batch(AbsMax(), xs), 0.01)),
    "percentile": (PercentileObserver, lambda xs: average(_per_batch(AbsPercentile(99.99), xs))),
    "mse": (MSEObserver, lambda xs: average(_per_batch(MSE(8), xs))),
    "entropy": (EntropyObserver, lambda xs: over_batches(HistogramEntropy(8), xs)),
    "histogram": (HistogramObserver, lambda xs: over_batches(HistogramMSE(8), xs)),
    "histogram_percentile": (HistogramPercentileObserver, lambda xs: over_batches(HistogramPercentile(99.99), xs)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_signed_observer_sets_the_collected_scale(case):
    mixin, expected = CASES[case]

    class Quant(mixin, Int8ActPerTensorFloat):
        pass

    xs = batches()
    _, scale = collected_scale(Quant, xs)
    torch.testing.assert_close(scale, expected(xs) / divisor(True), rtol=1e-6, atol=0.0)


def test_min_max_scale_is_the_abs_max_over_all_batches():
    xs = batches()
    _, scale = collected_scale(Int8ActPerTensorFloatMinMax, xs)
    assert torch.equal(scale, max(x.abs().max() for x in xs) / 128.0)  # signed 8-bit: threshold / 2^7


def test_unsigned_observers_use_their_own_levels():
    xs = batches(unsigned=True)
    _, scale = collected_scale(Uint8ActPerTensorFloatMinMax, xs)
    assert torch.equal(scale, max(x.max() for x in xs) / 255.0)
    _, scale = collected_scale(Uint8ActPerTensorFloatEntropy, xs)
    torch.testing.assert_close(scale, over_batches(HistogramEntropy(8, signed=False), xs) / 255.0)
    _, scale = collected_scale(Uint8ActPerTensorFloatHistogram, xs)
    torch.testing.assert_close(scale, over_batches(HistogramMSE(8, signed=False), xs) / 255.0)


@pytest.mark.parametrize(
    ("ready", "composed"),
    [
        (Int8ActPerTensorFloatMinMax, (MinMaxObserver, Int8ActPerTensorFloat)),
        (Int8ActPerTensorFloatEntropy, (EntropyObserver, Int8ActPerTensorFloat)),
        (Int8ActPerTensorFloatHistogram, (HistogramObserver, Int8ActPerTensorFloat)),
        (Uint8ActPerTensorFloatEntropy, (EntropyObserver, Uint8ActPerTensorFloat)),
    ],
)
def test_ready_quantizers_are_their_mixins(ready, composed):
    quant = type("Composed", composed, {})
    xs = batches()
    assert torch.equal(collected_scale(ready, xs)[1], collected_scale(quant, xs)[1])


def test_asymmetric_min_max_observer_sets_scale_and_zero_point():
    xs = batches()
    layer = QuantIdentity(act_quant=ShiftedUint8ActPerTensorFloatMinMax, collect_stats_steps=STEPS)
    layer.return_quant_tensor = True
    layer.train()
    for x in xs:
        layer(x)
    layer.eval()
    quant = layer(xs[0])
    high = torch.stack([x.max() for x in xs]).max().clamp_min(0)
    low = torch.stack([x.min() for x in xs]).min().clamp_max(0)
    scale = (high - low) / 255.0
    assert torch.equal(quant.scale, scale)
    assert torch.equal(quant.zero_point, torch.clamp(torch.round(-low / scale), 0, 255))
    assert quant.is_valid
    # Same as composing the mixin by hand.
    composed = type("Composed", (AsymmetricMinMaxObserver, ShiftedUint8ActPerTensorFloat), {})
    other = QuantIdentity(act_quant=composed, collect_stats_steps=STEPS, return_quant_tensor=True)
    other.train()
    for x in xs:
        other(x)
    other.eval()
    assert torch.equal(other(xs[0]).scale, quant.scale)


def test_collected_scale_is_frozen_after_the_collection_steps():
    xs = batches()
    layer, scale = collected_scale(Int8ActPerTensorFloatEntropy, xs)
    layer.train()
    layer(xs[1] * 100)  # now a learned parameter: the observer is not called any more
    layer.eval()
    assert torch.equal(layer(xs[0]).scale, scale)


OBSERVED = [
    Int8ActPerTensorFloatMinMax,
    Int8ActPerTensorFloatEntropy,
    Int8ActPerTensorFloatHistogram,
    ShiftedUint8ActPerTensorFloatMinMax,
]


@pytest.mark.parametrize("quant", OBSERVED, ids=lambda q: q.__name__)
def test_observers_keep_their_state_out_of_the_state_dict(quant):
    base = ShiftedUint8ActPerTensorFloat if "Shifted" in quant.__name__ else Int8ActPerTensorFloat
    layer = QuantIdentity(act_quant=quant, collect_stats_steps=10)
    layer.train()
    for x in batches():
        layer(x)  # mid-collection: the observers hold histograms / running extremes
    observers = [m for m in layer.modules() if hasattr(m, "reset_observer")]
    assert observers
    assert list(layer.state_dict()) == list(QuantIdentity(act_quant=base).state_dict())
    fresh = QuantIdentity(act_quant=quant, collect_stats_steps=10)
    fresh.load_state_dict(layer.state_dict())  # strict: nothing missing, nothing unexpected


def test_reset_observer_forgets_the_batches_seen():
    xs = batches()
    layer = QuantIdentity(act_quant=Int8ActPerTensorFloatMinMax, collect_stats_steps=10, return_quant_tensor=True)
    layer.train()
    layer(xs[1])  # abs-max 3x the others
    for module in layer.modules():
        if hasattr(module, "reset_observer"):
            module.reset_observer()
    assert torch.equal(layer(xs[0]).scale, xs[0].abs().max() / 128.0)


def test_observer_arguments_are_layer_keywords():
    layer = QuantReLU(act_quant=Uint8ActPerTensorFloatEntropy, histogram_num_bins=512, entropy_stride=4)
    observer = next(m for m in layer.modules() if isinstance(m, HistogramEntropy))
    assert (observer.num_bins, observer.stride, observer.levels) == (512, 4, 256)
    with pytest.raises(QuantConfigError, match=r"histogram_num_bins \(128\)"):
        QuantReLU(act_quant=Uint8ActPerTensorFloatEntropy, histogram_num_bins=128)
    with pytest.raises(QuantConfigError, match="entropy_stride"):
        QuantIdentity(act_quant=Int8ActPerTensorFloatEntropy, entropy_stride=0)
