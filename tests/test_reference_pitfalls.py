"""Where Brevitas is known to trip, quantwire must not. Each point has tests that can fail.

1. ``torch.save(model)`` + ``torch.load(..., weights_only=False)``, ``pickle`` and
   ``copy.deepcopy`` of a quantized CNN (per-channel weights, runtime-stats activations halfway
   through collecting, a quantizer derived with ``.let`` plus a keyword override, a shared proxy,
   QuantMultiheadAttention) give a model that continues training (collection included) and
   evaluates bit for bit like the original; so does a spawned worker process that unpickles it.
2. ``torch.compile(model, fullgraph=True)`` trains and evaluates (forward and backward) like
   eager mode, while statistics are collected and after, without recompiling per step: 12
   training steps with ``collect_stats_steps=5`` are one graph (they were six, one per step
   until collection ended; with the default 300 steps the 9th step raised
   FailOnRecompileLimitHit). Backend of the two ``slow`` end-to-end tests: ``inductor`` (it
   generates and builds C++ kernels on this CPU-only machine; override with env
   ``QUANTWIRE_TEST_COMPILE_BACKEND``), compared step by step with tolerances. The checks around
   step counters use dynamo's ``CompileCounter`` (graphs run op by op: results must be
   identical) or ``aot_eager`` (dynamo + AOTAutograd, no code generation).
3. ``torch.inference_mode()`` eval forwards equal ``torch.no_grad()`` ones, repeated and
   alternated, and leave the model usable with autograd.
4. ``torch.cat`` of IntQuantTensors without ``dim``, ``torch.relu`` and ``F.relu`` keep valid
   QuantTensors.
5. Fixed-point (power-of-two) quantizers have power-of-two scales at every training step,
   while collecting statistics too, and in eval, from all-zero to float32-max inputs.

The models, inputs and the continuation protocol live in ``pitfall_models.py`` (a spawned
worker imports it).
"""

from __future__ import annotations

import copy
import io
import math
import multiprocessing
import os
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from quantwire.core.utils import StepCounterState
from quantwire.nn import QuantIdentity, QuantLinear, QuantReLU
from quantwire.proxy import QuantProxyFromInjector, WeightQuantProxyFromInjector
from quantwire.quant import (
    Int8ActPerTensorFixedPoint,
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFixedPoint,
    Int8WeightPerTensorFixedPoint,
    Int32Bias,
    Uint8ActPerTensorFixedPoint,
)
from quantwire.quant_tensor import IntQuantTensor, QuantTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pitfall_models as pm  # noqa: E402  (tests/ is not a package; the spawned worker imports it too)
from quantwire import config as quantwire_config  # noqa: E402

BACKEND = os.environ.get("QUANTWIRE_TEST_COMPILE_BACKEND", "inductor")
IMAGE = pm.IMAGE_SHAPE
TOKENS = pm.TOKEN_SHAPE
STEPS_BEFORE_COPY = 3  # of pm.COLLECT_STATS_STEPS = 5: the copies are made halfway through collecting
FLOAT32_MAX = torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def composed_fake_quant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager integer quantizers run the composition the compiled graph holds (not the fused
    autograd node, whose gradients differ by float rounding), so results can match bit for bit."""
    monkeypatch.setattr(quantwire_config, "FUSED_FAKE_QUANT", False)


def assert_identical(a: Any, b: Any, where: str) -> None:
    """Same structure; tensors of the same dtype and shape, bit for bit equal (NaN == NaN);
    QuantTensors field by field."""
    if isinstance(a, QuantTensor):
        assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        assert_identical(a._fields(), b._fields(), where)
    elif isinstance(a, Tensor):
        assert isinstance(b, Tensor), f"{where}: {type(b).__name__} instead of a tensor"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        same = torch.eq(a, b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else torch.eq(a, b)
        assert bool(same.all()), f"{where}: differs, max |a - b| = {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_close(actual: Tensor, expected: Tensor, where: str, rtol: float, atol: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda message: f"{where}\n{message}")


def counters(model: nn.Module) -> dict[str, int]:
    """Every step counter of the model (synced from compiled calls first)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, StepCounterState):
            module.sync_counter()
            found[name] = module.counter
    return found


def runtime_stats_counters(model: nn.Module) -> set[int]:
    return {count for name, count in counters(model).items() if name.endswith("runtime_stats")}


def trained_cnn(steps: int = STEPS_BEFORE_COPY, attention: bool = True) -> pm.SmallCNN:
    """A SmallCNN after ``steps`` training steps and one eval forward under no_grad (which
    fills the weight proxies' eval caches), left in eval mode."""
    torch.manual_seed(0)
    model = pm.SmallCNN(attention=attention)
    with pm.single_thread():
        pm.train_steps(model, IMAGE, range(steps))
        pm.eval_outputs(model, IMAGE, range(50, 51))
    return model


def is_power_of_two(t: Tensor) -> bool:
    mantissa, _ = torch.frexp(t.detach())
    return bool((torch.isfinite(t) & (t > 0) & (mantissa == 0.5)).all())


# ---------------------------------------------------------------------------------------------
# 1. torch.save / torch.load(weights_only=False), pickle, deepcopy, a spawned worker


def _via_torch_save(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIERS = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "torch.save+torch.load": _via_torch_save,
}


def _check_copy_structure(original: pm.SmallCNN, copied: pm.SmallCNN) -> None:
    assert type(copied) is pm.SmallCNN and copied.training == original.training
    # The shared proxy is still one object, shared by the copy's two layers (not the original's).
    shared = copied.conv2.weight_quant
    assert copied.conv3.weight_quant is shared and shared is not original.conv2.weight_quant
    assert [id(m) for m in shared.tracked_module_list] == [id(copied.conv2), id(copied.conv3)]
    # Every proxy tracks layers of the copy only.
    own = {id(m) for m in copied.modules()}
    proxies = [m for m in copied.modules() if isinstance(m, QuantProxyFromInjector)]
    assert len(proxies) >= 10
    for proxy in proxies:
        assert all(id(layer) in own for layer in proxy.tracked_module_list), proxy.describe()
    # The .let-derived quantizer, plus weight_bit_width=4, survives as a declaration.
    injector = shared.quant_injector
    assert (injector.bit_width, injector.scaling_min_val, injector.scaling_per_output_channel) == (4, 1e-8, True)
    assert float(copied.conv2.quant_weight().bit_width) == 4.0

    # No tensor is shared with the original.
    def pointers(model: nn.Module) -> set[int]:
        return {t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}

    assert not pointers(original) & pointers(copied)
    assert counters(copied) == counters(original)
    assert runtime_stats_counters(copied) == {STEPS_BEFORE_COPY}


@pytest.mark.parametrize("copier", list(COPIERS))
def test_copy_continues_training_and_eval_bit_for_bit(copier):
    original = trained_cnn()
    copied = COPIERS[copier](original)
    _check_copy_structure(original, copied)
    # The original runs first: had the copy shared anything with it, the copy would drift.
    expected = pm.protocol(original, IMAGE, start=STEPS_BEFORE_COPY)
    actual = pm.protocol(copied, IMAGE, start=STEPS_BEFORE_COPY)
    assert_identical(expected, actual, f"{copier}: training (collection ends at step 5), eval, state_dict")
    assert runtime_stats_counters(copied) == {pm.COLLECT_STATS_STEPS}


@pytest.mark.parametrize("copier", list(COPIERS))
def test_copied_quantizers_rebuild_from_the_copy(copier):
    original = trained_cnn()
    copied = COPIERS[copier](original)
    x = pm.make_input(IMAGE, 7)
    with torch.no_grad():
        before = copied(x)
        for module in copied.modules():
            if isinstance(module, WeightQuantProxyFromInjector):
                module.init_tensor_quant()  # rebuilt from the copy's layers and declaration
        assert_identical(before, copied(x), f"{copier}: after rebuilding the weight quantizers")
        # load_state_dict rebuilds every proxy of the copy from the original's state.
        copied.load_state_dict(original.state_dict())
        assert_identical(original(x), copied(x), f"{copier}: after load_state_dict")


def test_the_copy_test_notices_a_lost_counter():
    # Control: the protocol depends on the counters, so a copy that lost them would fail above.
    original = trained_cnn()
    copied = copy.deepcopy(original)
    for module in copied.modules():
        if isinstance(module, StepCounterState):
            module.set_counter(0)
    expected = pm.protocol(original, IMAGE, start=STEPS_BEFORE_COPY)
    actual = pm.protocol(copied, IMAGE, start=STEPS_BEFORE_COPY)
    assert not torch.equal(expected["train"][-1], actual["train"][-1])


def test_spawned_worker_continues_training_bit_for_bit():
    original = trained_cnn()
    payload = pickle.dumps(original)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = pool.submit(pm.continue_in_worker, payload, IMAGE, STEPS_BEFORE_COPY).result(timeout=600)
    actual = pickle.loads(result)
    expected = pm.protocol(original, IMAGE, start=STEPS_BEFORE_COPY)
    assert_identical(expected, actual, "spawned worker")


# ---------------------------------------------------------------------------------------------
# 2. torch.compile(fullgraph=True)

MODELS = {
    "SmallCNN": (pm.SmallCNN, IMAGE),
    "TokenBlock": (pm.TokenBlock, TOKENS),
}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    """Parameter gradients by name (without the ``_orig_mod.`` of a compiled model)."""
    return {name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters()}


def _step(model: nn.Module, shape: tuple[int, ...], step: int, lr: float = 0.05) -> dict[str, Any]:
    """One forward and backward (MSE loss) then a plain SGD update; the output and gradients."""
    x = pm.make_input(shape, step).requires_grad_()
    output = model(x)
    target = torch.randn(output.shape, generator=pm.seeded(5000 + step))
    model.zero_grad(set_to_none=True)
    F.mse_loss(output, target).backward()
    grads = _grads(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return {"output": output.detach(), "input_grad": x.grad, "grads": grads}


def _eval_with_grad(model: nn.Module, shape: tuple[int, ...], step: int) -> dict[str, Any]:
    """Eval-mode forward and backward (as PTQ algorithms and attacks run it); no update."""
    x = pm.make_input(shape, step).requires_grad_()
    output = model(x)
    model.zero_grad(set_to_none=True)
    output.square().sum().backward()
    return {
        "output": output.detach(),
        "input_grad": x.grad,
        "grads": _grads(model),
    }


def _assert_close_records(expected: dict, actual: dict, where: str, rtol: float, atol: float) -> None:
    assert_close(actual["output"], expected["output"], f"{where}: output", rtol=rtol, atol=atol)
    scale = float(expected["input_grad"].abs().max()) + 1e-12
    assert_close(
        actual["input_grad"], expected["input_grad"], f"{where}: input grad", rtol=10 * rtol, atol=atol * scale
    )
    # Parameter gradients are sums over the batch with cancellations (a learned scale's is
    # often orders of magnitude below the others): 1e-2 relative, or atol of the largest one.
    largest = max(float(g.abs().max()) for g in expected["grads"].values() if g is not None)
    for name, e in expected["grads"].items():
        a = actual["grads"][name]
        if e is None or a is None:
            # Compiled code computes both phases of a collecting quantizer and picks one with
            # torch.where: its not-yet-used parameter gets a zero gradient, not None.
            present = e if e is not None else a
            assert present is None or (name.endswith("stats.value") and not bool(present.any())), f"{where}: {name}"
            continue
        assert bool(a.any()) == bool(e.any()), f"{where}: grad of {name} is {a}, eager {e}"
        assert_close(a, e, f"{where}: grad of {name}", rtol=100 * rtol, atol=atol * largest)


def _compare_and_align_state(eager: nn.Module, model: nn.Module, where: str) -> None:
    """Parameters and buffers of the compiled model close to the eager one's and its step counts
    equal; then the float tensors are copied over in place (no recompilation), so that the next
    step compares one step of compiled code, not rounding differences grown over many steps
    (one code that flips at a rounding boundary moves a fake-quantized output by a whole step)."""
    model_tensors = dict([*model.named_parameters(), *model.named_buffers()])
    with torch.no_grad():
        for name, e in [*eager.named_parameters(), *eager.named_buffers()]:
            a = model_tensors[name]
            if name.endswith("counter_mirror.value"):
                owner = eager.get_submodule(name.removesuffix(".counter_mirror.value"))
                assert int(a) == owner.counter, f"{where}: {name} = {int(a)}, eager counter {owner.counter}"
                continue
            assert_close(a, e, f"{where}: {name}", rtol=1e-4, atol=1e-5 * (float(e.abs().max()) + 1e-12))
            a.copy_(e)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_training_and_eval_match_eager(fresh_dynamo, name):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    eager = factory()
    model = copy.deepcopy(eager)
    compile_counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(model, fullgraph=True, backend=compile_counter)
    eager.train()
    compiled.train()
    # 12 training steps; runtime-stats quantizers collect during the first 5 (SmallCNN).
    for step in range(12):
        expected, actual = _step(eager, shape, step), _step(compiled, shape, step)
        _assert_close_records(expected, actual, f"{name} train step {step}", rtol=1e-4, atol=1e-5)
        _compare_and_align_state(eager, model, f"{name} after train step {step}")
    assert compile_counter.frame_count == 1, "12 training steps, collecting and after, must be one graph"
    eager.eval()
    compiled.eval()  # syncs the step counters from the compiled graph
    assert counters(model) == counters(eager)
    if name == "SmallCNN":
        assert runtime_stats_counters(model) == {pm.COLLECT_STATS_STEPS}
    with torch.no_grad():
        for step in (100, 101):
            x = pm.make_input(shape, step)
            assert_close(compiled(x), eager(x), f"{name} eval {step}", rtol=1e-4, atol=1e-5)
    # Under torch.compile the weight proxies' eval cache is skipped (not filled, not used)...
    proxies = [m for m in model.modules() if isinstance(m, WeightQuantProxyFromInjector)]
    assert proxies and all(p._cache is None for p in proxies)
    assert any(p._cache is not None for p in eager.modules() if isinstance(p, WeightQuantProxyFromInjector))
    # ... so weights changed in place are seen at once (the eager cache notices the version).
    with torch.no_grad():
        for m in (eager, model):
            for p in m.parameters():
                if p.dim() > 1:
                    p.mul_(0.5)
        x = pm.make_input(shape, 102)
        assert_close(compiled(x), eager(x), f"{name} eval, new weights", rtol=1e-4, atol=1e-5)
    for step in (103, 104):
        expected, actual = _eval_with_grad(eager, shape, step), _eval_with_grad(compiled, shape, step)
        _assert_close_records(expected, actual, f"{name} eval with grad {step}", rtol=1e-4, atol=1e-5)
    # train graph, eval graph under no_grad, eval graph with autograd
    assert compile_counter.frame_count == 3


def _exact_step(model: nn.Module, shape: tuple[int, ...], step: int) -> dict[str, Any]:
    record = _step(model, shape, step)
    record["grads"] = {name: torch.zeros(()) if g is None or not g.any() else g for name, g in record["grads"].items()}
    return record


def test_training_compiles_once_across_the_end_of_collection(fresh_dynamo, composed_fake_quant):
    # CompileCounter runs each graph op by op: compiled results must equal eager ones exactly.
    torch.manual_seed(0)
    eager = pm.SmallCNN(attention=False)
    model = copy.deepcopy(eager)
    compile_counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=compile_counter)
    for step in range(12):
        eager.train()
        compiled.train()  # on every step on purpose: it must not force a recompilation
        assert_identical(_exact_step(eager, IMAGE, step), _exact_step(compiled, IMAGE, step), f"step {step}")
    assert compile_counter.frame_count == 1
    compiled.eval()
    eager.eval()
    assert counters(model) == counters(eager) and runtime_stats_counters(model) == {pm.COLLECT_STATS_STEPS}
    with torch.no_grad():
        x = pm.make_input(IMAGE, 100)
        assert_identical(eager(x), compiled(x), "eval")
    assert compile_counter.frame_count == 2
    compiled.train()
    eager.train()
    for step in range(12, 14):
        assert_identical(_exact_step(eager, IMAGE, step), _exact_step(compiled, IMAGE, step), f"step {step}")
    # Back in training, the host knows collection is over: one lean graph without statistics.
    assert compile_counter.frame_count == 3


def test_default_collection_length_stays_within_the_recompile_limit(fresh_dynamo, composed_fake_quant):
    # collect_stats_steps defaults to 300: a graph per step would hit recompile_limit (8) and,
    # with fullgraph=True, raise FailOnRecompileLimitHit on the 9th step.
    torch.manual_seed(0)
    model = nn.Sequential(QuantIdentity(), QuantLinear(8, 8), QuantReLU())
    eager = copy.deepcopy(model)
    compile_counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=compile_counter)
    for step in range(12):
        assert_identical(_exact_step(eager, (4, 8), step), _exact_step(compiled, (4, 8), step), f"step {step}")
    assert compile_counter.frame_count == 1
    assert set(counters(model).values()) == set(counters(eager).values()) == {0, 12}  # delay counters stay 0


def test_quant_delay_compiles_once_and_matches_eager(fresh_dynamo, composed_fake_quant):
    torch.manual_seed(0)
    layer = QuantLinear(8, 8, weight_quant_delay_steps=3)
    eager = copy.deepcopy(layer)
    compile_counter = CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, backend=compile_counter)
    for step in range(6):
        x = pm.make_input((4, 8), step)
        float_output = F.linear(x, eager.weight, eager.bias)
        expected, actual = _exact_step(eager, (4, 8), step), _exact_step(compiled, (4, 8), step)
        assert_identical(expected, actual, f"step {step}")
        assert torch.equal(expected["output"], float_output) == (step < 3), f"step {step}: delay"
    assert compile_counter.frame_count == 1
    assert counters(layer) == counters(eager) == {"weight_quant.tensor_quant.int_quant.delay_wrapper": 3}


def test_compiled_and_eager_calls_share_one_step_counter(fresh_dynamo):
    torch.manual_seed(0)
    layer = QuantReLU(collect_stats_steps=4)
    reference = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    shape = (4, 8)
    # compiled, eager, compiled, eager, ... on the same module equals eager throughout
    for step, runner in enumerate([compiled, layer, compiled, compiled, layer, compiled, layer]):
        expected = _exact_step(reference, shape, step)
        actual = _exact_step(runner, shape, step)
        assert_close(actual["output"], expected["output"], f"step {step}", rtol=1e-6, atol=1e-7)
        if step == 2:
            # The state dict sees the compiled steps too...
            state = layer.state_dict()
            assert int(state["act_quant.tensor_quant.scaling_impl.stats.runtime_stats._extra_state"]) == 3
    assert counters(layer) == counters(reference)
    # ... and loading one mid-collection into the compiled model resumes from there.
    resumed = QuantReLU(collect_stats_steps=4)
    resumed.load_state_dict(state)
    compiled_resumed = torch.compile(resumed, fullgraph=True, backend="aot_eager")
    replay = QuantReLU(collect_stats_steps=4)
    replay.load_state_dict(state)
    for step in range(3, 6):
        actual, expected = _exact_step(compiled_resumed, shape, step), _exact_step(replay, shape, step)
        assert_close(actual["output"], expected["output"], f"resumed step {step}", rtol=1e-6, atol=1e-7)
    assert counters(resumed) == counters(replay)
    assert runtime_stats_counters(resumed) == {4}


def test_compiled_eval_while_collecting_and_after(fresh_dynamo):
    torch.manual_seed(0)
    eager = pm.SmallCNN(attention=False)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for steps, collected in ((range(0, 2), 2), (range(2, 6), 5)):
        eager.train()
        compiled.train()
        for step in steps:
            expected, actual = _step(eager, IMAGE, step), _step(compiled, IMAGE, step)
            _assert_close_records(expected, actual, f"train step {step}", rtol=1e-5, atol=1e-6)
        eager.eval()
        compiled.eval()
        assert runtime_stats_counters(model) == runtime_stats_counters(eager) == {collected}
        with torch.no_grad():
            x = pm.make_input(IMAGE, 100 + collected)
            assert_close(compiled(x), eager(x), f"eval at {collected}", rtol=1e-5, atol=1e-6)
        expected, actual = _eval_with_grad(eager, IMAGE, 200), _eval_with_grad(compiled, IMAGE, 200)
        _assert_close_records(expected, actual, f"eval with grad at {collected}", rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. torch.inference_mode


class _QuantTensorLinear(nn.Module):
    """The metadata path: QuantTensor output, bias quantized with input scale x weight scale."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = QuantLinear(16, 8, input_quant=Int8ActPerTensorFloat, bias_quant=Int32Bias, return_quant_tensor=True)
        self.act = QuantIdentity(return_quant_tensor=True)

    def forward(self, x: Tensor) -> QuantTensor:
        return self.act(self.fc(x))


def _trained(factory: Any, shape: tuple[int, ...], steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = factory()
    with pm.single_thread():
        pm.train_steps(model, shape, range(steps))
    return model


INFERENCE_MODELS = {
    "SmallCNN collecting": (lambda: trained_cnn(STEPS_BEFORE_COPY), IMAGE),
    "SmallCNN collected": (lambda: trained_cnn(7), IMAGE),
    "SmallCNN untrained": (lambda: _trained(pm.SmallCNN, IMAGE, 0), IMAGE),
    "TokenBlock": (lambda: _trained(pm.TokenBlock, TOKENS, 2), TOKENS),
    "QuantTensor output": (lambda: _trained(_QuantTensorLinear, (4, 16), 0), (4, 16)),
}


def _plain(output: Any) -> Tensor:
    return output.value if isinstance(output, QuantTensor) else output


@pytest.mark.parametrize("name", list(INFERENCE_MODELS))
def test_inference_mode_matches_no_grad(name):
    factory, shape = INFERENCE_MODELS[name]
    model = factory().eval()
    reference = copy.deepcopy(model)
    x = pm.make_input(shape, 9)
    with torch.no_grad():
        expected = model(x)
    for i, mode in enumerate(["inference", "inference", "no_grad", "inference", "no_grad", "no_grad", "inference"]):
        context = torch.inference_mode() if mode == "inference" else torch.no_grad()
        with context:
            output = model(x)
        assert_identical(expected, output, f"{name}: call {i} under {mode}")
        assert _plain(output).is_inference() == (mode == "inference")
    if isinstance(expected, IntQuantTensor):
        assert expected.is_valid
    # Nothing computed under inference_mode leaks into later autograd: eval with grad, then
    # training, behave as on a copy that never saw inference_mode.
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
        _plain(m(x.clone().requires_grad_())).square().sum().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert_identical(b.grad, a.grad, f"{name}: eval grad of {n}")
    model.train()
    reference.train()
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
        _plain(m(x)).square().sum().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert_identical(b.grad, a.grad, f"{name}: training grad of {n}")


def test_inference_mode_of_a_compiled_model(fresh_dynamo):
    torch.manual_seed(0)
    model = trained_cnn(STEPS_BEFORE_COPY, attention=False)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = pm.make_input(IMAGE, 9)
    with torch.no_grad():
        expected = model(x)
    for i in range(2):
        with torch.inference_mode():
            assert_close(compiled(x), expected, f"call {i}", rtol=1e-6, atol=1e-7)
        with torch.no_grad():
            assert_close(compiled(x), expected, f"call {i}", rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 4. torch.cat without dim, torch.relu and F.relu on IntQuantTensors


def _quant_tensors(signed: bool, shape: tuple[int, ...] = (3, 5), count: int = 2) -> list[IntQuantTensor]:
    """IntQuantTensors from one eval-mode quantizer (so they share scale and zero point)."""
    torch.manual_seed(1)
    layer = QuantIdentity(
        act_quant=Int8ActPerTensorFloat.let(signed=signed), return_quant_tensor=True, collect_stats_steps=2
    )
    for _ in range(2):
        layer(torch.randn(shape))
    layer.eval()
    return [layer(torch.randn(shape)) for _ in range(count)]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(
    "call",
    [
        lambda ts: torch.cat(ts),
        lambda ts: torch.cat(tuple(ts)),
        lambda ts: torch.cat(tensors=ts),
        lambda ts: torch.concat(ts),
        lambda ts: torch.cat(ts, 1),
        lambda ts: torch.cat(ts, dim=-1),
    ],
    ids=["list", "tuple", "tensors=", "concat", "dim 1", "dim=-1"],
)
def test_cat_keeps_int_quant_tensors(signed, call):
    tensors = _quant_tensors(signed, count=3)
    result = call(tensors)
    expected_value = call([t.value for t in tensors])
    assert isinstance(result, IntQuantTensor) and result.is_valid
    assert torch.equal(result.value, expected_value)
    first = tensors[0]
    assert (result.signed, result.training) == (signed, False)
    for field in ("scale", "zero_point", "bit_width"):
        assert torch.equal(getattr(result, field), getattr(first, field)), field


def test_cat_of_mismatched_operands_falls_back_to_a_plain_tensor():
    a, b = _quant_tensors(True)
    other = _quant_tensors(False, count=1)[0]  # another scale and signedness
    for operands in ([a, b.value], [a, other]):
        result = torch.cat(operands)
        assert type(result) is Tensor
        assert torch.equal(result, torch.cat([t.value if isinstance(t, QuantTensor) else t for t in operands]))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(
    "call",
    [torch.relu, F.relu, lambda t: F.relu(t, inplace=False), lambda t: t.relu(), nn.ReLU()],
    ids=["torch.relu", "F.relu", "F.relu(inplace=False)", "QuantTensor.relu", "nn.ReLU"],
)
def test_relu_keeps_int_quant_tensors(signed, call):
    (qt,) = _quant_tensors(signed, count=1)
    result = call(qt)
    assert isinstance(result, IntQuantTensor) and result.is_valid
    assert torch.equal(result.value, torch.relu(qt.value))
    assert bool((result.value >= 0).all()) and (not signed or bool((qt.value < 0).any()))
    for field in ("scale", "zero_point", "bit_width", "signed", "training"):
        assert torch.equal(torch.as_tensor(getattr(result, field)), torch.as_tensor(getattr(qt, field))), field


def test_relu_of_a_per_channel_weight_quant_tensor_and_its_gradient():
    torch.manual_seed(0)
    layer = QuantLinear(6, 4, weight_quant=Int8WeightPerChannelFixedPoint)
    weight = layer.quant_weight()
    assert weight.scale.shape == (4, 1)
    (expected,) = torch.autograd.grad(torch.relu(weight.value).sum(), layer.weight, retain_graph=True)
    for call in (torch.relu, F.relu):
        result = call(weight)
        assert isinstance(result, IntQuantTensor) and result.is_valid
        assert torch.equal(result.scale, weight.scale)
        (grad,) = torch.autograd.grad(result.value.sum(), layer.weight, retain_graph=True)
        assert torch.equal(grad, expected)  # the handler keeps the autograd graph


# ---------------------------------------------------------------------------------------------
# 5. Power-of-two scales at every step

COLLECT = 3
MAGNITUDES = st.one_of(
    st.just(0.0),
    st.sampled_from([FLOAT32_MAX, 2.0**127, 1e38, 1.0, 2.0**-126, 2.0**-149, 1e-30]),
    st.builds(
        lambda mantissa, exponent: min(mantissa * 2.0**exponent, FLOAT32_MAX),
        st.floats(0.5, 1.0),
        st.integers(-149, 128),
    ),
)


def _uniform(shape: tuple[int, ...], magnitude: float, seed: int) -> Tensor:
    """Uniform in [-magnitude, magnitude] (float32, never overflowing); all zero for 0."""
    return (torch.rand(shape, generator=pm.seeded(seed)) * 2 - 1) * magnitude


@settings(max_examples=40, deadline=None)
@given(
    quant=st.sampled_from([Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint]),
    layer_class=st.sampled_from([QuantIdentity, QuantReLU]),
    magnitudes=st.lists(MAGNITUDES, min_size=1, max_size=8),
    moves=st.lists(st.floats(-40.0, 40.0), min_size=8, max_size=8),
    eval_at=st.integers(0, 8),
    seed=st.integers(0, 2**16),
)
def test_fixed_point_activation_scale_is_a_power_of_two_at_every_step(
    quant, layer_class, magnitudes, moves, eval_at, seed
):
    layer = layer_class(act_quant=quant, return_quant_tensor=True, collect_stats_steps=COLLECT)
    learned = layer.act_quant.tensor_quant.scaling_impl.stats.value
    for step, magnitude in enumerate(magnitudes):
        phase = "collecting" if step < COLLECT else "learned"
        x = _uniform((4, 8), magnitude, seed + step).requires_grad_()
        output = layer(x)
        where = f"training step {step} ({phase}), |x| <= {magnitude:.3g}: scale {output.scale.item()!r}"
        assert is_power_of_two(output.scale), where
        assert output.is_valid, where
        output.value.sum().backward()  # autograd runs through every phase
        with torch.no_grad():
            learned += moves[step]  # wherever learning takes the log-domain scale
        if step == eval_at:
            layer.eval()
            with torch.no_grad():
                frozen = layer(x)
            assert is_power_of_two(frozen.scale) and frozen.is_valid, f"eval after step {step}: {frozen.scale}"
            layer.train()
    layer.eval()
    for i, magnitude in enumerate(magnitudes[:3]):
        x = _uniform((4, 8), magnitude, seed + 100 + i)
        with torch.no_grad():
            output = layer(x)
        assert is_power_of_two(output.scale) and output.is_valid, f"eval, |x| <= {magnitude:.3g}: {output.scale}"


@settings(max_examples=40, deadline=None)
@given(
    quant=st.sampled_from([Int8WeightPerTensorFixedPoint, Int8WeightPerChannelFixedPoint]),
    magnitudes=st.lists(st.lists(MAGNITUDES, min_size=4, max_size=4), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_fixed_point_weight_scale_is_a_power_of_two(quant, magnitudes, seed):
    layer = QuantLinear(8, 4, weight_quant=quant)
    for step, rows in enumerate(magnitudes):
        with torch.no_grad():
            # One magnitude per output channel (rows of zeros included).
            layer.weight.copy_(_uniform((4, 8), 1.0, seed + step) * torch.tensor(rows).unsqueeze(1))
        for training in (True, False):
            layer.train(training)
            with torch.set_grad_enabled(training):
                weight = layer.quant_weight()
                again = layer.quant_weight()  # eval: from the cache
            mode = "train" if training else "eval"
            where = f"step {step}, {mode}, rows {rows}: scale {weight.scale.flatten().tolist()}"
            assert is_power_of_two(weight.scale) and weight.is_valid, where
            assert torch.equal(again.value, weight.value) and torch.equal(again.scale, weight.scale), where


def test_all_zero_collection_leaves_a_learnable_power_of_two_scale():
    # All-zero activations while collecting used to start the log2-domain parameter at -inf:
    # its gradient was NaN from then on, and one optimizer step made every scale NaN.
    layer = QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True, collect_stats_steps=2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step, magnitude in enumerate([0.0, 0.0, 1.0, 1e6, 1.0]):
        x = _uniform((16,), magnitude, step).requires_grad_()
        output = layer(x)
        assert is_power_of_two(output.scale), f"step {step}: {output.scale}"
        output.value.sum().backward()
        learned = layer.act_quant.tensor_quant.scaling_impl.stats.value
        assert learned.grad is None or bool(torch.isfinite(learned.grad).all()), f"step {step}: {learned.grad}"
        optimizer.step()
        optimizer.zero_grad()
    assert math.isfinite(float(learned.detach()))
