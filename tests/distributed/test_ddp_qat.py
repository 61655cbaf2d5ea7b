"""Quantization-aware training under torch.distributed, with 2 gloo processes spawned per test.

Each test runs a scenario function on both ranks (``run_on_ranks``); a scenario returns a dict
of tensors that the test compares across ranks and against a single-process run. The rules
tested here are those of ``docs/distributed.md``.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import quantwire
from quantwire.core.scaling import RuntimeStatsScaling
from quantwire.core.stats import AbsMax, ParameterFromRuntimeStats, RuntimeStats
from quantwire.distributed import sync_quant_statistics
from quantwire.errors import QuantConfigError
from quantwire.nn import QuantIdentity
from quantwire.quant import Int8ActPerTensorFloat

WORLD = 2
JOIN_TIMEOUT_S = 150  # a hung collective fails the test instead of the run
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
BATCH = 4  # per rank; the single-process reference takes WORLD * BATCH
STEPS = 3
LR = 0.05
# DDP sums gradients across ranks in another order than one process sums a batch of 2B: equal
# in exact arithmetic, a few float32 ulps apart in practice.
ATOL, RTOL = 1e-6, 1e-5


# ---------------------------------------------------------------------------------------------
# Running a scenario on 2 ranks


def _rank_entry(rank: int, scenario: Any, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        torch.save(scenario(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(scenario: Any, tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``scenario(rank)`` in ``WORLD`` spawned processes; returns what each rank returned.
    A rank that raises fails the test with its traceback; a hang fails it after a timeout."""
    context = mp.start_processes(
        _rank_entry,
        args=(scenario, str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise AssertionError(f"{scenario.__name__}: the ranks did not finish within {JOIN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# Models and data (identical on every rank: same seeds)


def _float_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _calibrated_lsq_cnn() -> nn.Module:
    """The CNN, W8A8 LSQ (learned weight and activation scales), calibrated on the same batches
    on every rank."""
    model = quantwire.quantize_model(_float_cnn(), "w8a8_lsq")
    generator = torch.Generator().manual_seed(1)
    quantwire.calibrate(model, [torch.randn(8, 3, 6, 6, generator=generator) for _ in range(2)], progress=False)
    return model.train()


def _full_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` batches of ``WORLD * BATCH`` samples; rank ``r`` trains on rows ``r*BATCH:(r+1)*BATCH``."""
    generator = torch.Generator().manual_seed(2)
    return [
        (torch.randn(WORLD * BATCH, 3, 6, 6, generator=generator), torch.randn(WORLD * BATCH, 5, generator=generator))
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], parameters: Any) -> None:
    optimizer = torch.optim.SGD(parameters, lr=LR)
    for inputs, targets in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (``buffer:`` prefix), detached copies."""
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    state.update({f"buffer:{name}": b.detach().clone() for name, b in model.named_buffers()})
    return state


def _learned_scales(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in state.items() if "scaling_impl" in name and not name.startswith("buffer:")}


def _assert_same_on_every_rank(results: list[dict[str, Any]], keys: Any = None) -> None:
    first = results[0]
    for name in keys if keys is not None else first:
        for rank, other in enumerate(results[1:], start=1):
            assert torch.equal(first[name], other[name]), f"{name}: rank 0 {first[name]} vs rank {rank} {other[name]}"


# ---------------------------------------------------------------------------------------------
# 1. DDP on shards of B == one process on 2B


def _ddp_training(rank: int) -> dict[str, torch.Tensor]:
    model = _calibrated_lsq_cnn()
    ddp = nn.parallel.DistributedDataParallel(model)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    _train(ddp, [(x[rows], y[rows]) for x, y in _full_batches()], ddp.parameters())
    return _state(model)


def test_ddp_on_two_ranks_matches_one_process_on_the_full_batch(tmp_path):
    results = run_on_ranks(_ddp_training, tmp_path)
    reference = _calibrated_lsq_cnn()
    _train(reference, _full_batches(), reference.parameters())
    expected = _state(reference)

    assert set(results[0]) == set(expected)
    scales = _learned_scales(expected)
    assert len(scales) == 4, sorted(scales)  # weight and input scales of both layers: all trained
    _assert_same_on_every_rank(results)  # parameters (learned scales included) and buffers, exactly
    for name, value in expected.items():
        torch.testing.assert_close(results[0][name], value, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
    start = _state(_calibrated_lsq_cnn())
    unmoved = [name for name in scales if torch.equal(start[name], expected[name])]
    assert not unmoved, f"these learned scales did not train: {unmoved}"


# ---------------------------------------------------------------------------------------------
# 2. Collection ending inside a DDP training forward


COLLECT_STEPS = 2
_COLLECTING_CONFIG = {
    "preset": "w8a8_lsq",
    "input": {"bit_width": 8, "method": "lsq", "options": {"collect_stats_steps": COLLECT_STEPS}},
}


def _training_from_uncalibrated(rank: int, synchronise: bool) -> dict[str, torch.Tensor]:
    if not synchronise:  # what happened before the collection-end average: each rank kept its own
        ParameterFromRuntimeStats.average_statistic_over_ranks = lambda self, group=None: False
    model = quantwire.quantize_model(_float_cnn(), _COLLECTING_CONFIG).train()
    # While collecting, a learned activation scale is not used (no gradient): DDP must be told.
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    generator = torch.Generator().manual_seed(10 + rank)  # different data on each rank
    batches = [
        (torch.randn(BATCH, 3, 6, 6, generator=generator) * (1 + rank), torch.randn(BATCH, 5, generator=generator))
        for _ in range(COLLECT_STEPS + 1)
    ]
    _train(ddp, batches, ddp.parameters())
    sources = [m for m in model.modules() if isinstance(m, ParameterFromRuntimeStats)]
    assert sources and not any(source.is_collecting() for source in sources)
    state = _state(model)
    state.update({f"seed:{i}": source.collected_value().detach().clone() for i, source in enumerate(sources)})
    return state


def _synchronised(rank: int) -> dict[str, torch.Tensor]:
    return _training_from_uncalibrated(rank, synchronise=True)


def _unsynchronised(rank: int) -> dict[str, torch.Tensor]:
    return _training_from_uncalibrated(rank, synchronise=False)


def test_learned_scales_agree_across_ranks_when_collection_ends_in_training(tmp_path):
    results = run_on_ranks(_synchronised, tmp_path)
    scales = _learned_scales(results[0])
    assert any("input_quant" in name for name in scales)
    _assert_same_on_every_rank(results)  # every parameter and buffer, exactly


@pytest.mark.slow  # one more pair of spawned processes: the file stays under a minute without it
def test_without_the_collection_end_average_learned_scales_diverge(tmp_path):
    # The control: each rank starting the scale from its own statistic gives different scales
    # that DDP never reconciles (it averages gradients, not parameters).
    results = run_on_ranks(_unsynchronised, tmp_path)
    input_scales = [name for name in _learned_scales(results[0]) if "input_quant" in name]
    assert input_scales
    for name in input_scales:
        assert not torch.equal(results[0][name], results[1][name]), name


# ---------------------------------------------------------------------------------------------
# 3. Running statistics (EMA) under broadcast_buffers, and sync_quant_statistics


def _ema_model() -> nn.Module:
    torch.manual_seed(0)
    ema = Int8ActPerTensorFloat.let(
        scaling_impl=RuntimeStatsScaling, scaling_stats_impl=AbsMax, scaling_stats_momentum=0.5
    )
    return nn.Sequential(QuantIdentity(act_quant=ema), nn.Linear(8, 4)).train()


def _ema_training(rank: int) -> dict[str, Any]:
    model = _ema_model()
    ddp = nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True: rank 0's before each forward
    generator = torch.Generator().manual_seed(20 + rank)
    batches = [(torch.randn(BATCH, 8, generator=generator) * (1 + rank), torch.randn(BATCH, 4)) for _ in range(2)]
    _train(ddp, batches, ddp.parameters())
    (stats,) = [m for m in model.modules() if isinstance(m, RuntimeStats)]
    weights = model[1].weight.detach().clone()
    before = stats.running.detach().clone()
    averaged = sync_quant_statistics(model, restart_learned=False)
    return {
        "before": before,
        "after": stats.running.detach().clone(),
        "averaged": torch.tensor(averaged),
        "weight_before": weights,
        "weight_after": model[1].weight.detach().clone(),
    }


@pytest.mark.slow  # one more pair of spawned processes: the file stays under a minute without it
def test_running_statistics_differ_after_ddp_training_until_synchronised(tmp_path):
    results = run_on_ranks(_ema_training, tmp_path)
    # Each rank folded its own last batch into rank 0's broadcast buffer.
    assert not torch.equal(results[0]["before"], results[1]["before"])
    _assert_same_on_every_rank(results, ["after", "weight_before", "weight_after"])
    torch.testing.assert_close(results[0]["after"], (results[0]["before"] + results[1]["before"]) / 2)
    assert int(results[0]["averaged"]) == 1
    assert torch.equal(results[0]["weight_before"], results[0]["weight_after"])


def _shard_calibration(rank: int) -> dict[str, Any]:
    model = quantwire.quantize_model(_float_cnn(), "w8a8_lsq")
    generator = torch.Generator().manual_seed(30 + rank)  # each rank calibrates on its own shard
    shard = [torch.randn(BATCH, 3, 6, 6, generator=generator) * (1 + rank) for _ in range(2)]
    quantwire.calibrate(model, shard, progress=False)
    sources = [m for m in model.modules() if isinstance(m, ParameterFromRuntimeStats)]
    result: dict[str, Any] = {f"local:{i}": s.runtime_stats.running.detach().clone() for i, s in enumerate(sources)}
    result["averaged"] = torch.tensor(sync_quant_statistics(model))
    for i, source in enumerate(sources):
        result[f"running:{i}"] = source.runtime_stats.running.detach().clone()
        result[f"value:{i}"] = source.value.detach().clone()
        result[f"seed:{i}"] = source.collected_value().detach().clone()
    # A model calibrated on rank 0 only (rank 1 builds a fresh one) is refused, by name, on every rank.
    if rank == 1:
        model = quantwire.quantize_model(_float_cnn(), "w8a8_lsq")
    try:
        sync_quant_statistics(model)
    except QuantConfigError as error:
        result["error"] = str(error)
    return result


def test_sync_after_calibrating_each_rank_on_its_shard(tmp_path):
    results = run_on_ranks(_shard_calibration, tmp_path)
    sources = int(results[0]["averaged"])
    assert sources == 2  # the input quantizers of the conv and the linear layer
    for i in range(sources):
        assert not torch.equal(results[0][f"local:{i}"], results[1][f"local:{i}"])
        expected = (results[0][f"local:{i}"] + results[1][f"local:{i}"]) / 2
        torch.testing.assert_close(results[0][f"running:{i}"], expected)
        assert torch.equal(results[0][f"value:{i}"], results[0][f"seed:{i}"])  # restarted from the average
    _assert_same_on_every_rank(results, [f"{kind}:{i}" for kind in ("running", "value") for i in range(sources)])
    for rank, result in enumerate(results):
        assert "input_quant" in result.get("error", ""), f"rank {rank} did not refuse: {result.get('error')}"
        assert "counted" in result["error"]


# ---------------------------------------------------------------------------------------------
# 4. FSDP


def _fsdp_training(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    result: dict[str, Any] = {}
    try:
        fully_shard(_calibrated_lsq_cnn())
    except ValueError as error:
        result["refusal"] = str(error)
    model = _calibrated_lsq_cnn()
    # Per-tensor scales are 0-d parameters, which FSDP does not shard: leave them to us.
    scalars = [p for p in model.parameters() if p.dim() == 0]
    fully_shard(model, ignored_params=set(scalars))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    for inputs, targets in _full_batches():
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs[rows]), targets[rows]).backward()
        for scalar in scalars:  # FSDP does not reduce the gradients of ignored parameters
            dist.all_reduce(scalar.grad)
            scalar.grad.div_(WORLD)
        optimizer.step()
    result.update({f"scalar:{i}": p.detach().clone() for i, p in enumerate(scalars)})
    return result


@pytest.mark.slow  # one more pair of spawned processes: the file stays under a minute without it
def test_fsdp_refuses_scalar_scales_and_trains_with_them_ignored(tmp_path):
    results = run_on_ranks(_fsdp_training, tmp_path)
    for result in results:
        assert "scalar parameters" in result.get("refusal", ""), result.get("refusal")
    scalars = [name for name in results[0] if name.startswith("scalar:")]
    assert len(scalars) == 2  # the two per-tensor input scales
    _assert_same_on_every_rank(results, scalars)
    start = [p for p in _calibrated_lsq_cnn().parameters() if p.dim() == 0]
    assert any(not torch.equal(p.detach(), results[0][name]) for p, name in zip(start, scalars, strict=True))


def test_sync_is_a_no_op_without_an_initialised_process_group():
    model = _calibrated_lsq_cnn()
    before = _state(model)
    assert not dist.is_initialized()
    assert sync_quant_statistics(model) == 0
    after = _state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
