"""Calibration: activation quantizers collect their statistics from data, then freeze.

Activation quantizers whose scale (or zero point) comes from run-time statistics
(:class:`~quantwire.core.stats.RuntimeStats`, and :class:`~quantwire.core.stats.ParameterFromRuntimeStats`
behind every ``ParameterFromRuntime...`` scale or zero point) collect while their core module
is in training mode. Calibration runs the model in eval mode (BatchNorm and dropout as in
inference) with only those core modules in training mode, over as many batches as it is
given, then freezes them: a learned scale starts from the collected value, a running
statistic keeps it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantwire.algorithms._utils import (
    ForwardFn,
    batch_iterator,
    call_model,
    check_finite,
    check_non_empty,
    eval_mode,
    num_batches_of,
    progress_bar,
    quant_proxies,
)
from quantwire.core.stats import ParameterFromRuntimeStats, RuntimeStats
from quantwire.errors import QuantInputError
from quantwire.proxy.act import ActQuantProxyFromInjector

__all__ = ["calibrate", "calibration_mode", "reset_calibration"]

# A collection limit no calibration reaches: calibration collects over every batch it is given.
_UNBOUNDED_STEPS = 2**62


def _stats_sources(modules: list[nn.Module]) -> tuple[list[ParameterFromRuntimeStats], list[RuntimeStats]]:
    """The collect-then-learn sources and the stand-alone running statistics among ``modules``."""
    collected = [m for m in modules if isinstance(m, ParameterFromRuntimeStats)]
    inner = {id(m.runtime_stats) for m in collected}
    running = [m for m in modules if isinstance(m, RuntimeStats) and id(m) not in inner]
    return collected, running


def reset_calibration(model: nn.Module) -> None:
    """Forget every collected statistic, so that the next training steps or calibration
    collect afresh (learned scales and zero points start again from statistics)."""
    _reset(list(model.modules()))


def _reset(modules: list[nn.Module]) -> None:
    collected, running = _stats_sources(modules)
    for source in collected:
        source.runtime_stats.set_counter(0)
    for source in running:
        source.set_counter(0)
    for module in modules:
        reset = getattr(module, "reset_observer", None)
        if callable(reset):
            reset()


def _finish(source: ParameterFromRuntimeStats) -> None:
    """If statistics were collected, start the parameter from them and end its collection."""
    stats = source.runtime_stats
    stats.sync_counter()
    if stats.counter > 0:
        with torch.no_grad():
            source.value.copy_(source.collected_value())
        stats.set_counter(max(stats.counter, source.collect_stats_steps))


@dataclass
class _SourceState:
    """What a statistics source holds, to put back when a calibration fails."""

    source: RuntimeStats
    counter: int
    running: torch.Tensor
    value: torch.Tensor | None


def _snapshot(collected: list[ParameterFromRuntimeStats], running: list[RuntimeStats]) -> list[_SourceState]:
    states = []
    for source in collected:
        stats = source.runtime_stats
        stats.sync_counter()
        states.append(_SourceState(stats, stats.counter, stats.running.detach().clone(), source.value.detach().clone()))
    for stats in running:
        stats.sync_counter()
        states.append(_SourceState(stats, stats.counter, stats.running.detach().clone(), None))
    return states


def _restore(states: list[_SourceState], collected: list[ParameterFromRuntimeStats]) -> None:
    values = iter(collected)
    with torch.no_grad():
        for state in states:
            state.source.running.copy_(state.running)
            state.source.set_counter(state.counter)
            if state.value is not None:
                next(values).value.copy_(state.value)


def _layer_names(model: nn.Module) -> dict[int, str]:
    """Qualified name of every proxy in ``model`` (``features.0.input_quant``), by id."""
    return {id(m): name for name, m in model.named_modules() if isinstance(m, ActQuantProxyFromInjector)}


@contextlib.contextmanager
def calibration_mode(model: nn.Module, quantize: bool = False, check_inputs: bool = True) -> Iterator[nn.Module]:
    """Calibrate activation quantizers on whatever runs through ``model`` in the body.

    On entry the collected statistics are reset; the model is put in eval mode, except the
    statistics-collecting modules of activation quantizers (``RuntimeStats`` and
    ``ParameterFromRuntimeStats``, with the observers inside them), which collect over every
    call (whatever their ``collect_stats_steps``); delayed quantization and stochastic rounding
    stay in their inference behaviour. With ``quantize=False`` (the default) activations are
    observed but not quantized and weights are used in float, so each quantizer sees the float
    model's distribution; ``quantize=True`` quantizes as it goes (statistics then reflect the
    upstream quantization error). ``check_inputs`` raises :class:`QuantInputError` naming the
    quantizer (``features.0.input_quant``) when it receives NaN or Inf.

    On exit every quantizer that saw data is frozen (its learned scale starts from the
    collected statistic) and every module gets its previous mode back. If the body raises, the
    statistics are put back as they were before, so a failed calibration leaves the model
    unchanged. Calibrating under ``torch.no_grad()`` is the caller's choice (:func:`calibrate`
    does).
    """
    modules = list(model.modules())  # one walk of the model serves every step below
    collected, running = _stats_sources(modules)
    before = _snapshot(collected, running)
    limits = [source.collect_stats_steps for source in collected]
    proxies = quant_proxies(modules)
    act_proxies = [p for p in proxies if isinstance(p, ActQuantProxyFromInjector) and not p.disable_quant]
    disabled_before = [p.disable_quant for p in proxies]
    names = _layer_names(model)
    hooks = []
    failed = False
    with eval_mode(model):
        try:
            _reset(modules)
            for source in collected:
                source.collect_stats_steps = _UNBOUNDED_STEPS
                source.runtime_stats.set_counter_limit(_UNBOUNDED_STEPS)
            for proxy in act_proxies:
                for module in proxy.tensor_quant.modules():
                    if isinstance(module, ParameterFromRuntimeStats | RuntimeStats):
                        module.train()
                if check_inputs:
                    hooks.append(_install_finite_check(proxy, names.get(id(proxy), proxy.describe())))
            if not quantize:
                observing = {id(p) for p in act_proxies}
                for proxy in proxies:
                    if id(proxy) not in observing:
                        proxy.disable_quant = True
                for proxy in act_proxies:
                    proxy.observe_only = True
            yield model
        except BaseException:
            failed = True
            raise
        finally:
            for restore in hooks:
                restore()
            for proxy in act_proxies:
                proxy.observe_only = False
                proxy.clear_cache()
            for proxy, disabled in zip(proxies, disabled_before, strict=True):
                proxy.disable_quant = disabled
            for source, limit in zip(collected, limits, strict=True):
                source.collect_stats_steps = limit
                source.runtime_stats.set_counter_limit(limit)
            if failed:
                _restore(before, collected)
            else:
                for source in collected:
                    _finish(source)
                for source in running:
                    source.sync_counter()
    # eval_mode restored every module's mode, including the statistics put in training mode.


def _install_finite_check(proxy: ActQuantProxyFromInjector, name: str) -> Any:
    """Make the proxy raise on NaN/Inf or empty inputs (statistics of an empty tensor do not
    exist) before it quantizes or observes them; returns the remover."""

    def check(x: torch.Tensor) -> None:
        where = f"calibration: {name} ({proxy.describe()})"
        check_finite(x, where)
        check_non_empty(x, where)

    previous = proxy.input_check
    proxy.input_check = check

    def remove() -> None:
        proxy.input_check = previous

    return remove


def calibrate(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    progress: bool = True,
    quantize: bool = False,
    forward_fn: ForwardFn | None = None,
) -> nn.Module:
    """Collect activation statistics over ``data`` (the first ``num_batches`` batches) and
    freeze them; see :func:`calibration_mode`. Runs without autograd. Returns ``model``.

    A batch is a tensor, ``(input, *rest)`` or a dict of keyword arguments;
    ``forward_fn(model, batch)`` runs anything else.

    Calibration is local to the process: under ``torch.distributed`` it never communicates
    (it may run on one rank, or before the process group exists). After calibrating each rank
    on its own shard, :func:`quantwire.distributed.sync_quant_statistics` averages the statistics
    across ranks and restarts the learned scales from them.
    """
    run = forward_fn or call_model
    batches = batch_iterator(data, num_batches)
    first = next(batches, None)  # checked before anything is reset: a refused call changes nothing
    if first is None:
        raise QuantInputError("calibrate: data yielded no batch; nothing was calibrated")
    total = num_batches_of(data, num_batches)
    with calibration_mode(model, quantize=quantize), torch.no_grad():
        for batch in progress_bar(itertools.chain([first], batches), desc="calibrating", total=total, enabled=progress):
            run(model, batch)
    return model
