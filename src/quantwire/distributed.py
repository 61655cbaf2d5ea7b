"""Quantizer statistics under ``torch.distributed``: making every rank hold the same ones.

DDP keeps parameters in step (one broadcast at construction, then averaged gradients) and, with
``broadcast_buffers=True``, copies rank 0's buffers to every rank before each training forward.
What it does not see is where a quantizer's state comes from data on one rank: a statistic
collected on each rank's shard by :func:`quantwire.calibrate`, a running statistic updated by
each rank's last batch, and the Python-int step counters (kept in ``_extra_state``, not in a
buffer). :func:`sync_quant_statistics` averages the statistics over the ranks and checks the
counters agree. The rules are in ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from quantwire.core.stats import ParameterFromRuntimeStats, RuntimeStats
from quantwire.errors import QuantConfigError

__all__ = ["sync_quant_statistics"]


def _statistics_sources(model: nn.Module) -> list[tuple[str, RuntimeStats, ParameterFromRuntimeStats | None]]:
    """Every running statistic of ``model`` with its qualified name and, when it feeds a learned
    parameter, the :class:`ParameterFromRuntimeStats` that owns it; in ``named_modules`` order."""
    owners = {
        id(module.runtime_stats): module for module in model.modules() if isinstance(module, ParameterFromRuntimeStats)
    }
    return [
        (name, module, owners.get(id(module)))
        for name, module in model.named_modules()
        if isinstance(module, RuntimeStats)
    ]


def _check_same_counters(names: list[str], counters: list[int], group: Any) -> None:
    """Raise :class:`QuantConfigError` unless every rank of ``group`` has as many statistics as
    this one and the same step count in each. (Averaging statistics collected over different
    numbers of steps, or in a different model, would silently mix unrelated values.)"""
    sizes = torch.tensor([len(counters), -len(counters)], dtype=torch.int64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    if int(sizes[0]) != -int(sizes[1]):
        raise QuantConfigError(
            f"sync_quant_statistics: this rank (rank {dist.get_rank()}) has {len(counters)} running statistics, "
            f"other ranks have between {-int(sizes[1])} and {int(sizes[0])}: every rank must pass the same model"
        )
    if not counters:
        return
    local = torch.tensor(counters, dtype=torch.int64)
    extremes = torch.cat([local, -local])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    highest, lowest = extremes[: len(counters)], -extremes[len(counters) :]
    for name, count, low, high in zip(names, counters, lowest.tolist(), highest.tolist(), strict=True):
        if low != high:
            raise QuantConfigError(
                f"sync_quant_statistics: {name or 'the model'} counted {count} statistics steps on rank "
                f"{dist.get_rank()}, and between {low} and {high} across ranks: calibrate (or train) every rank "
                "over the same number of batches before synchronising"
            )


def sync_quant_statistics(model: nn.Module, group: Any = None, restart_learned: bool = True) -> int:
    """Make every rank of ``group`` (``None``: the default process group) hold the same
    quantizer statistics. A collective: every rank calls it, with the same model.

    - Every running statistic that has seen data (the ``running`` buffer of each
      :class:`~quantwire.core.stats.RuntimeStats`, including those that feed a learned scale or
      zero point) is replaced by its average over the ranks.
    - With ``restart_learned`` (the default), every learned parameter whose collection is over
      (a :class:`~quantwire.core.stats.ParameterFromRuntimeStats` ``value``) restarts from the
      averaged statistic, as :func:`quantwire.calibrate` starts it. Use this right after
      calibrating each rank on its own shard, before training. After training, pass
      ``restart_learned=False``: learned parameters keep what training taught them (DDP keeps
      them equal) and only the running statistics (EMA scales, used in eval) are averaged.

    Raises :class:`~quantwire.errors.QuantConfigError`, naming the quantizer, when ranks counted
    different numbers of statistics steps (a rank that was not calibrated, or calibrated on
    fewer batches). Without an initialised ``torch.distributed``, or with one rank, nothing
    changes. Returns the number of statistics averaged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return 0
    sources = _statistics_sources(model)
    for _, stats, _ in sources:
        stats.sync_counter()
    _check_same_counters([name for name, _, _ in sources], [stats.counter for _, stats, _ in sources], group)
    averaged = 0
    for _, stats, owner in sources:
        if stats.counter == 0:  # nothing collected: the same on every rank (the counters agree)
            continue
        if owner is None:
            with torch.no_grad():
                dist.all_reduce(stats.running, op=dist.ReduceOp.SUM, group=group)
                stats.running.div_(dist.get_world_size(group))
        else:
            owner.average_statistic_over_ranks(group)
            if restart_learned and not owner.is_collecting():
                with torch.no_grad():
                    owner.value.copy_(owner.collected_value())
        averaged += 1
    return averaged
