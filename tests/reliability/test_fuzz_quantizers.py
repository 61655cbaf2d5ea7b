"""Fuzzing: any quantizer configuration either works and gives valid QuantTensors, or fails with
a :mod:`quantwire.errors` exception; any injector graph resolves or raises ``DependencyError``.

Quantizers are composed at random from the catalogue and the building blocks of
:mod:`quantwire.quant.base` (``quantwire.inject.compose``), with random attribute overrides
(valid and invalid), attached to ``QuantLinear``, ``QuantConv2d`` and activation layers, and run
in training and eval mode on inputs of random (also awkward) shapes. Set
``QUANTWIRE_FUZZ_COUNTS=1`` to print how many examples each test ran and how many of them
worked (the rest raised a quantwire error).
"""

from __future__ import annotations

import collections
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantwire import nn as qnn
from quantwire import quant
from quantwire.errors import QuantwireError
from quantwire.inject import DependencyError, ExtendedInjector, compose, value
from quantwire.quant import base as blocks
from quantwire.quant_tensor import FloatQuantTensor, IntQuantTensor, QuantTensor

COUNTS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    if os.environ.get("QUANTWIRE_FUZZ_COUNTS") == "1":
        for key, count in sorted(COUNTS.items()):
            sys.stderr.write(f"fuzz {key}: {count}\n")


def _catalogue(*words: str) -> list[type]:
    return [getattr(quant, name) for name in quant.__all__ if any(word in name for word in words)]


WEIGHT_QUANTS = _catalogue("Weight")
ACT_QUANTS = _catalogue("Act")
MIXINS = [
    blocks.MSEStats,
    blocks.PowerOfTwoScaling,
    blocks.LsqGradientScaling,
    blocks.PactClipping,
    blocks.QuantDropMixin,
    blocks.ShiftedWeightZeroPoint,
    blocks.ShiftedActZeroPoint,
    blocks.ParameterFromWeightStatsScaling,
    blocks.RuntimeStatsScaling,
    blocks.DynamicPerTensorScaling,
    blocks.DynamicPerTokenScaling,
    blocks.PerGroupScaling,
    blocks.ConstUnitScaling,
    blocks.AdaRoundLearnedRounding,
    blocks.Fp8e4m3Mixin,
    blocks.Fp8e5m2Mixin,
]

ANY_NUMBER = st.one_of(
    st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["8", None, True, False])
)
OVERRIDES = {
    "bit_width": st.one_of(st.integers(-2, 34), st.sampled_from([2.5, "8", True, None, float("nan")])),
    "narrow_range": st.one_of(st.booleans(), st.sampled_from([None, 2, "yes"])),
    "signed": st.one_of(st.booleans(), st.sampled_from([None, 0.5])),
    "scaling_per_output_channel": st.one_of(st.booleans(), st.sampled_from([None, 3])),
    "scaling_init": st.one_of(st.floats(-2, 10, allow_nan=False), st.sampled_from([0.0, float("nan"), float("inf")])),
    "collect_stats_steps": ANY_NUMBER,
    "group_size": st.one_of(st.integers(-1, 9), st.sampled_from([2.5, None])),
    "high_percentile_q": st.one_of(st.floats(-10, 110, allow_nan=False), st.sampled_from([float("nan")])),
    "quant_delay_steps": ANY_NUMBER,
}


@dataclass(frozen=True)
class Recipe:
    """A catalogue quantizer with mixins in front and attribute overrides; :meth:`build` composes
    it (which may itself fail with a quantwire error: mixins whose bases can not be ordered)."""

    base: type
    mixins: tuple[type, ...]
    overrides: dict[str, Any]

    def build(self) -> type:
        quantizer = compose(*self.mixins, self.base) if self.mixins else self.base
        return quantizer.let(**self.overrides) if self.overrides else quantizer


@st.composite
def quantizers(draw: st.DrawFn, catalogue: list[type]) -> Recipe:
    """A random :class:`Recipe` from ``catalogue``, the building blocks and :data:`OVERRIDES`."""
    base = draw(st.sampled_from(catalogue))
    mixins = draw(st.lists(st.sampled_from(MIXINS), max_size=2, unique=True))
    names = draw(st.lists(st.sampled_from(sorted(OVERRIDES)), max_size=3, unique=True))
    return Recipe(base, tuple(mixins), {name: draw(OVERRIDES[name]) for name in names})


def awkward_batch(draw: st.DrawFn) -> int:
    return draw(st.sampled_from([1, 2, 3]))


FLOAT32_EXACT_BITS = 24


def assert_valid(output: Any) -> None:
    """A QuantTensor whose values lie on its grid, whose codes fit its bit width, finite."""
    assert isinstance(output, QuantTensor), type(output)
    assert bool(torch.isfinite(output.value).all())
    assert bool(torch.isfinite(output.scale).all()) and bool((output.scale > 0).all())
    if isinstance(output, IntQuantTensor) and int(output.bit_width.max()) > FLOAT32_EXACT_BITS:
        return  # float32 values can not hold every code of a wider grid: is_valid is undecidable
    assert output.is_valid
    if isinstance(output, IntQuantTensor):
        codes = output.int(float_datatype=True).double() - 0  # the codes the value stands for
        value = (codes - output.zero_point.double()) * output.scale.double()
        assert torch.allclose(value, output.value.double(), rtol=1e-5, atol=1e-6 * float(output.scale.max()))
        bit_width = int(output.bit_width.max())
        low = -(2 ** (bit_width - 1)) if output.signed else 0
        high = 2 ** (bit_width - 1) - 1 if output.signed else 2**bit_width - 1
        if output.signed and bit_width == 1:
            low, high = -1, 1
        assert int(codes.min()) >= low and int(codes.max()) <= high
    else:
        assert isinstance(output, FloatQuantTensor)


def delays_quantization(layer: torch.nn.Module) -> bool:
    """Whether a quantizer of ``layer`` declares ``quant_delay_steps > 0`` or QDrop's
    ``quant_drop_prob > 0``: in training mode it then passes (some) values through unquantized,
    by design, so they are not on its grid."""
    for proxy in layer.quant_proxies():
        injector = proxy.quant_injector
        try:
            for name in ("quant_delay_steps", "quant_drop_prob"):
                if name in injector and float(getattr(injector, name)) > 0:
                    return True
        except (TypeError, ValueError):
            continue
    return False


def exercise(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """Forward in training mode, then in eval mode: a layer with a weight gives a valid quantized
    weight and a finite output (a QuantTensor, then valid, when the layer can say its grid: an
    output or input quantizer); an activation layer gives a valid QuantTensor."""
    for training in (True, False):
        layer.train(training)
        with torch.no_grad():
            output = layer(x)
            if training and delays_quantization(layer):
                continue
            if isinstance(layer, qnn.QuantWBIOL):
                assert_valid(layer.quant_weight())
                if isinstance(output, QuantTensor):
                    assert_valid(output)
                else:
                    assert bool(torch.isfinite(output).all())
            else:
                assert_valid(output)


def run_or_quantwire_error(key: str, build: Any, x: torch.Tensor) -> None:
    """Build and run; a failure must be a quantwire error (anything else propagates and fails)."""
    COUNTS[f"{key} examples"] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exercise(build(), x)
    except QuantwireError:
        COUNTS[f"{key} quantwire errors"] += 1
        return
    COUNTS[f"{key} worked"] += 1


FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(data=st.data(), layer_kind=st.sampled_from(["linear", "conv"]))
def test_random_weight_and_input_quantizers(data: st.DataObject, layer_kind: str) -> None:
    weight_quant = data.draw(quantizers(WEIGHT_QUANTS), label="weight_quant")
    input_quant = data.draw(st.one_of(st.none(), quantizers(ACT_QUANTS)), label="input_quant")
    channels = data.draw(st.integers(1, 6), label="out channels")
    features = data.draw(st.integers(1, 9), label="in features")
    batch = data.draw(st.sampled_from([1, 2, 3]), label="batch")
    torch.manual_seed(data.draw(st.integers(0, 3), label="seed"))
    if layer_kind == "linear":
        extra = data.draw(st.lists(st.integers(1, 4), max_size=2), label="extra dims")
        x = torch.randn(batch, *extra, features)

        def build() -> torch.nn.Module:
            return qnn.QuantLinear(
                features,
                channels,
                weight_quant=weight_quant.build(),
                input_quant=input_quant and input_quant.build(),
                return_quant_tensor=True,
            )
    else:
        size = data.draw(st.integers(1, 5), label="image size")
        kernel = data.draw(st.integers(1, 3), label="kernel")
        x = torch.randn(batch, features, size + kernel - 1, size + kernel - 1)

        def build() -> torch.nn.Module:
            return qnn.QuantConv2d(
                features,
                channels,
                kernel,
                weight_quant=weight_quant.build(),
                input_quant=input_quant and input_quant.build(),
                return_quant_tensor=True,
            )

    run_or_quantwire_error(f"{layer_kind} layer", build, x)


@FUZZ
@given(
    data=st.data(),
    layer_class=st.sampled_from([qnn.QuantIdentity, qnn.QuantReLU, qnn.QuantHardTanh]),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
)
def test_random_activation_quantizers(data: st.DataObject, layer_class: type, shape: list[int], scale: float) -> None:
    act_quant = data.draw(quantizers(ACT_QUANTS), label="act_quant")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * scale
    run_or_quantwire_error(
        "activation layer", lambda: layer_class(act_quant=act_quant.build(), return_quant_tensor=True), x
    )


# -- random injector graphs -----------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]


@st.composite
def injector_graphs(draw: st.DrawFn) -> dict[str, tuple[int, list[str]] | int]:
    """Each name is a constant or a ``@value`` summing its dependencies (any names, itself
    included, and names nobody declares) plus a constant."""
    declared = draw(st.lists(st.sampled_from(NAMES), min_size=1, unique=True))
    graph: dict[str, tuple[int, list[str]] | int] = {}
    for name in declared:
        constant = draw(st.integers(-5, 5))
        if draw(st.booleans()):
            graph[name] = constant
        else:
            # Mostly acyclic (dependencies on earlier names); sometimes any name, itself or a missing one.
            wild = draw(st.sampled_from([False, False, True]))
            choices = [*NAMES, "missing"] if wild else [n for n in NAMES if n < name] or ["missing"]
            graph[name] = (constant, draw(st.lists(st.sampled_from(choices), max_size=3, unique=True)))
    return graph


def summing(name: str, constant: int, dependencies: list[str]) -> Any:
    """A ``@value`` function with ``dependencies`` as its argument names, returning their sum
    plus ``constant``."""
    namespace: dict[str, Any] = {}
    exec(f"def {name}({', '.join(dependencies)}):\n    return {constant} + sum([{', '.join(dependencies)}])", namespace)
    return value(namespace[name])


def expected(graph: dict[str, Any], name: str, resolving: tuple[str, ...] = ()) -> int | None:
    """What resolving ``name`` gives, or None when it can not (a missing name or a cycle)."""
    if name not in graph or name in resolving:
        return None
    entry = graph[name]
    if isinstance(entry, int):
        return entry
    constant, dependencies = entry
    total = constant
    for dependency in dependencies:
        part = expected(graph, dependency, (*resolving, name))
        if part is None:
            return None
        total += part
    return total


def has_cycle(graph: dict[str, Any]) -> bool:
    """Whether following dependencies from some declared name comes back to a name on the way."""

    def cycles_from(name: str, path: tuple[str, ...]) -> bool:
        if name in path:
            return True
        entry = graph.get(name)
        if entry is None or isinstance(entry, int):
            return False
        return any(cycles_from(dependency, (*path, name)) for dependency in entry[1])

    return any(cycles_from(name, ()) for name in graph)


@FUZZ
@given(graph=injector_graphs(), name=st.sampled_from(NAMES))
def test_random_injector_graphs_resolve_or_raise_dependency_error(graph: dict[str, Any], name: str) -> None:
    COUNTS["injector graph examples"] += 1
    attributes = {
        key: entry if isinstance(entry, int) else summing(key, *entry) for key, entry in sorted(graph.items())
    }
    want = expected(graph, name)
    try:
        injector = type("Fuzzed", (ExtendedInjector,), attributes)
    except DependencyError as error:  # a cycle anywhere is refused when the class is declared
        assert isinstance(error, QuantwireError)
        assert has_cycle(graph), f"no cycle in {graph}, got {error}"
        COUNTS["injector graph dependency errors"] += 1
        return
    try:
        got = getattr(injector, name)
    except DependencyError as error:
        assert want is None, f"{name} should resolve to {want}, got {error}"
        assert str(error)
        COUNTS["injector graph dependency errors"] += 1
        return
    assert want is not None and got == want
    assert math.isfinite(got)
    COUNTS["injector graph resolved"] += 1
