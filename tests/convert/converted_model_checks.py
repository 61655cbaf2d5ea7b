"""Checks shared by the real-model conversion tests (torchvision, timm): a float model with
random weights goes through ``quantize_model``; these helpers measure what came out.

tests/convert is not a package: the test modules import this one by its bare name.
"""

from __future__ import annotations

import copy
import pickle

import torch
from torch import Tensor, nn

import quantwire
from quantwire.convert import ConvertedModule, quantize_model
from quantwire.nn import QuantEltwiseAdd, QuantScaledDotProductAttention
from quantwire.nn.base import QuantLayer
from quantwire.proxy import QuantProxyFromInjector

RESIDUAL_AND_ATTENTION_OFF = {"residual": None, "attention": None, "attention_probs": None}
"""QuantConfig keywords that leave residual adds and attention float."""


def seeded_batches(count: int, shape: tuple[int, ...], seed: int) -> list[Tensor]:
    """``count`` standard-normal batches of ``shape``, the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def settle_batch_norms(model: nn.Module, batches: list[Tensor]) -> nn.Module:
    """Give a randomly initialised model's BatchNorms the statistics of ``batches`` (their
    fresh running stats, mean 0 and variance 1, make deep random nets collapse to near-constant
    outputs, which says nothing about quantization error). Returns ``model`` in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model.eval()


def count(model: nn.Module, kind: type) -> int:
    """How many modules of ``model`` are instances of ``kind``."""
    return sum(isinstance(module, kind) for module in model.modules())


def quant_modules(model: nn.Module) -> list[str]:
    """Names of the quantwire modules (quant layers, proxies, converted twins) in ``model``."""
    quant_types = (QuantLayer, QuantProxyFromInjector, ConvertedModule)
    return [name for name, module in model.named_modules() if isinstance(module, quant_types)]


def state_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``model``'s state dict, to compare against later."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, Tensor]) -> None:
    """``model`` still has the state ``before`` and holds no quantwire module."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"the float model's {key} changed"
    assert quant_modules(model) == []


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two outputs, flattened."""
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def calibrated_cosine(float_model: nn.Module, qmodel: nn.Module, calibration: list[Tensor], probe: Tensor) -> float:
    """Calibrate ``qmodel`` on ``calibration``, then the cosine similarity of its eval output on
    ``probe`` to the float model's."""
    quantwire.calibrate(qmodel, calibration, progress=False)
    float_model.eval()
    qmodel.eval()
    with torch.no_grad():
        return cosine(qmodel(probe), float_model(probe))


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Turn every quantizer of ``model`` on or off (off: the float computation)."""
    for module in model.modules():
        if isinstance(module, QuantProxyFromInjector):
            module.disable_quant = not enabled


def assert_float_when_disabled(float_model: nn.Module, qmodel: nn.Module, probe: Tensor, atol: float = 1e-5) -> None:
    """With every quantizer off, the converted model computes what the float one does: the
    twins' forwards are the library's forwards with the quantizers put in."""
    set_quantization(qmodel, enabled=False)
    try:
        float_model.eval()
        qmodel.eval()
        with torch.no_grad():
            expected, got = float_model(probe), qmodel(probe)
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)
    finally:
        set_quantization(qmodel, enabled=True)


def quantizer_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The learned parameters (scales, zero points) of the quantizers inside ``module``."""
    found = []
    for proxy_name, proxy in module.named_modules():
        if isinstance(proxy, QuantProxyFromInjector):
            found += [(f"{proxy_name}.{name}", p) for name, p in proxy.named_parameters()]
    return found


def assert_trains(qmodel: nn.Module, batch: Tensor) -> int:
    """A training step's forward and backward reach every weight and the learned scales of the
    residual adds and attention quantizers (run on a copy: training mode moves BatchNorm
    statistics). Returns how many such scales got a gradient."""
    model = copy.deepcopy(qmodel).train()
    model(batch).square().mean().backward()
    weights = [(n, p) for n, p in model.named_parameters() if n.endswith(".weight") and p.requires_grad]
    assert weights
    missing = [n for n, p in weights if p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    scales = []
    for name, module in model.named_modules():
        if isinstance(module, QuantEltwiseAdd | QuantScaledDotProductAttention):
            scales += [(f"{name}.{n}", p) for n, p in quantizer_parameters(module)]
    for name, scale in scales:
        assert scale.grad is not None and torch.isfinite(scale.grad).all(), f"{name}: no finite gradient"
    return len(scales)


def assert_copies_and_pickles(qmodel: nn.Module, probe: Tensor) -> None:
    """A deep copy and a pickle round trip of the converted model compute what it does."""
    qmodel.eval()
    with torch.no_grad():
        expected = qmodel(probe)
        for clone in (copy.deepcopy(qmodel), pickle.loads(pickle.dumps(qmodel))):
            torch.testing.assert_close(clone.eval()(probe), expected)


def convert(float_model: nn.Module, **config: object) -> nn.Module:
    """``quantize_model`` with a :class:`QuantConfig` built from ``config`` (default W8A8)."""
    from quantwire.convert import QuantConfig

    return quantize_model(float_model, QuantConfig(**config))


def convert_and_measure(
    name: str, float_model: nn.Module, shape: tuple[int, ...]
) -> tuple[dict[str, Tensor], nn.Module, Tensor, float]:
    """A settled float model's state, its W8A8 conversion, a probe batch and the calibrated
    cosine similarity to float on it (printed under ``name``)."""
    before = state_snapshot(float_model)
    qmodel = convert(float_model)
    probe = seeded_batches(1, shape, seed=3)[0]
    similarity = calibrated_cosine(float_model, qmodel, seeded_batches(2, shape, seed=2), probe)
    print(f"\n{name}: W8A8 cosine similarity to float {similarity:.5f}")
    return before, qmodel, probe, similarity
