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
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from quantwire.algorithms._utils import (
    ForwardFn,
    batch_iterator,
    call_model,
    check_finite,
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


def _stats_sources(model: nn.Module) -> tuple[list[ParameterFromRuntimeStats], list[RuntimeStats]]:
    collected = [m for m in model.modules() if isinstance(m, ParameterFromRuntimeStats)]
    inner = {id(m.runtime_stats) for m in collected}
    running = [m for m in model.modules() if isinstance(m, RuntimeStats) and id(m) not in inner]
    return collected, running


def reset_calibration(model: nn.Module) -> None:
    """Forget every collected statistic, so that the next training steps or calibration
    collect afresh (learned scales and zero points start again from statistics)."""
    collected, running = _stats_sources(model)
    for source in collected:
        source.runtime_stats.set_counter(0)
    for source in running:
        source.set_counter(0)
    for module in model.modules():
        reset = getattr(module, "reset_observer", None)
        if callable(reset):
            reset()


def _finish(source: ParameterFromRuntimeStats, limit: int) -> None:
    """Restore the collection limit; if statistics were collected, start the parameter from them."""
    stats = source.runtime_stats
    stats.sync_counter()
    source.collect_stats_steps = limit
    stats.set_counter_limit(limit)
    if stats.counter > 0:
        with torch.no_grad():
            source.value.copy_(source.collected_value())
        stats.set_counter(max(stats.counter, limit))


@contextlib.contextmanager
def calibration_mode(model: nn.Module, quantize: bool = False, check_inputs: bool = True) -> Iterator[nn.Module]:
    """Calibrate activation quantizers on whatever runs through ``model`` in the body.

    On entry the collected statistics are reset; the model is put in eval mode, except the
    statistics-collecting core modules of activation quantizers, which collect over every call
    (whatever their ``collect_stats_steps``). With ``quantize=False`` (the default) activations
    are observed but not quantized and weights are used in float, so each quantizer sees the
    float model's distribution; ``quantize=True`` quantizes as it goes (statistics then reflect
    the upstream quantization error). ``check_inputs`` raises :class:`QuantInputError` naming
    the layer when an activation quantizer receives NaN or Inf.

    On exit every quantizer that saw data is frozen (its learned scale starts from the
    collected statistic) and every module gets its previous mode back. Calibrating under
    ``torch.no_grad()`` is the caller's choice (:func:`calibrate` does).
    """
    reset_calibration(model)
    collected, running = _stats_sources(model)
    limits = [source.collect_stats_steps for source in collected]
    proxies = quant_proxies(model)
    act_proxies = [p for p in proxies if isinstance(p, ActQuantProxyFromInjector) and not p.disable_quant]
    disabled_before = [p.disable_quant for p in proxies]
    hooks = []
    with eval_mode(model):
        try:
            for source in collected:
                source.collect_stats_steps = _UNBOUNDED_STEPS
                source.runtime_stats.set_counter_limit(_UNBOUNDED_STEPS)
            for proxy in act_proxies:
                proxy.tensor_quant.train()
                if check_inputs:
                    hooks.append(_install_finite_check(proxy))
            if not quantize:
                for proxy in proxies:
                    if proxy not in act_proxies:
                        proxy.disable_quant = True
                for proxy in act_proxies:
                    proxy.observe_only = True
            yield model
        finally:
            for restore in hooks:
                restore()
            for proxy in act_proxies:
                proxy.observe_only = False
                proxy.clear_cache()
            for proxy, disabled in zip(proxies, disabled_before, strict=True):
                proxy.disable_quant = disabled
            for source, limit in zip(collected, limits, strict=True):
                _finish(source, limit)
            for source in running:
                source.sync_counter()
    # eval_mode restored every module's mode, including the quantizers put in training mode.


def _install_finite_check(proxy: ActQuantProxyFromInjector) -> Any:
    """Wrap the proxy's core module so that non-finite inputs raise, naming the layer."""
    tensor_quant = proxy.tensor_quant

    def check(_module: nn.Module, args: tuple) -> None:
        check_finite(args, f"calibration: {proxy.describe()}")

    handle = tensor_quant.register_forward_pre_hook(check)
    return handle.remove


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
    """
    run = forward_fn or call_model
    seen = 0
    with calibration_mode(model, quantize=quantize), torch.no_grad():
        total = num_batches_of(data, num_batches)
        for batch in progress_bar(batch_iterator(data, num_batches), desc="calibrating", total=total, enabled=progress):
            run(model, batch)
            seen += 1
    if seen == 0:
        raise QuantInputError("calibrate: data yielded no batch; nothing was calibrated")
    return model
