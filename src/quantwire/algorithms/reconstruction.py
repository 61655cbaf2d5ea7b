"""Reconstruction PTQ: AdaRound (layer by layer), BRECQ (block by block) and QDrop.

All three are one loop. Blocks (single quant layers for AdaRound; residual blocks, transformer
blocks or any module you mark for BRECQ and QDrop) are reconstructed in execution order. For
each block, the float model's output of the block is the target and the quantized model's
input of the block (every earlier block already reconstructed) is the input; the block's
weights get AdaRound's learned rounding (:class:`~quantwire.core.quant.AdaRoundRounding`,
composed onto each layer's own weight quantizer through the injector) and the rounding
decisions ``V`` are optimised to minimise the output error plus AdaRound's rounding
regulariser, whose ``beta`` anneals from 20 to 2 so that every decision ends hard. QDrop also
feeds, per element with probability ``drop_prob``, the float input instead of the quantized
one and leaves activations inside the block unquantized, and learns the activation scales.

After reconstruction each weight quantizer keeps its learned rounding (hard decisions, the
``value`` tensors in the state dict): a model rebuilt with the same quantizers loads it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantwire.algorithms._utils import (
    Captured,
    ForwardFn,
    call_model,
    capture,
    eval_mode,
    execution_order,
    progress_bar,
    quantization_disabled,
    resolve_modules,
    seeded,
    weight_quant_layers,
)
from quantwire.algorithms.calibration import calibrate
from quantwire.core.quant import AdaRoundRounding, LearnedRoundIntQuant, RescalingIntQuant
from quantwire.core.stats import ParameterFromRuntimeStats
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.nn.base import QuantWBIOL
from quantwire.proxy.act import ActQuantProxyFromInjector
from quantwire.quant.base import AdaRoundLearnedRounding

__all__ = [
    "BLOCK_TYPE_NAMES",
    "ReconstructionResult",
    "adaround",
    "brecq",
    "find_blocks",
    "mark_block",
    "qdrop",
    "reconstruct",
    "register_block_type",
    "use_learned_rounding",
]

# Class names of the blocks BRECQ reconstructs as a whole when found in a model: torchvision
# residual blocks, timm and Hugging Face transformer blocks. Extend with register_block_type.
BLOCK_TYPE_NAMES: set[str] = {
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "Block",
    "SwinTransformerBlock",
    "BertLayer",
    "ViTLayer",
    "DeiTLayer",
    "GPT2Block",
    "OPTDecoderLayer",
    "LlamaDecoderLayer",
}

_BLOCK_MARK = "_quantwire_reconstruction_block"


def mark_block(module: nn.Module) -> nn.Module:
    """Mark ``module`` as a block that block reconstruction treats as one unit. Returns it."""
    setattr(module, _BLOCK_MARK, True)
    return module


def register_block_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Reconstruct every instance of ``cls`` as one block (usable as a class decorator)."""
    BLOCK_TYPE_NAMES.add(cls.__name__)
    return cls


def _has_weight_quant(module: nn.Module) -> bool:
    return any(isinstance(m, QuantWBIOL) and m.weight_quant is not None for m in module.modules())


def find_blocks(model: nn.Module, block_types: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The units block reconstruction works on, as ``(name, module)`` in registration order:
    every module marked with :func:`mark_block` or whose class name is in ``block_types``
    (:data:`BLOCK_TYPE_NAMES` by default) and that holds a weight quantizer, outermost first;
    then every weight-quantized layer outside them, on its own."""
    names = set(BLOCK_TYPE_NAMES if block_types is None else block_types)
    blocks: list[tuple[str, nn.Module]] = []
    covered: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}.{name}" if prefix else name
            is_block = getattr(child, _BLOCK_MARK, False) or type(child).__name__ in names
            if is_block and _has_weight_quant(child):
                blocks.append((qualified, child))
                covered.update(id(m) for m in child.modules())
            else:
                visit(qualified, child)

    visit("", model)
    for name, layer in weight_quant_layers(model):
        if id(layer) not in covered:
            blocks.append((name, layer))
    return blocks


def use_learned_rounding(layer: QuantWBIOL) -> None:
    """Compose AdaRound's learned rounding onto ``layer``'s weight quantizer and rebuild it.

    The quantizer becomes ``quant_injector.let(...)`` with the attributes of
    :class:`~quantwire.quant.base.AdaRoundLearnedRounding` (so everything else it declares is
    kept, and the model still pickles); a layer that already rounds with AdaRound is left as
    it is.
    """
    proxy = layer.weight_quant
    if proxy is None:
        raise QuantConfigError(f"{type(layer).__name__}: no weight quantizer to give learned rounding to")
    tensor_quant = proxy.tensor_quant
    if not isinstance(tensor_quant, RescalingIntQuant):
        raise QuantConfigError(
            f"{proxy.describe()}: learned rounding needs an integer weight quantizer "
            f"(RescalingIntQuant), not {type(tensor_quant).__name__}"
        )
    if isinstance(tensor_quant.int_quant.float_to_int_impl, AdaRoundRounding):
        return
    learned_state = tensor_quant.state_dict()
    proxy.quant_injector = proxy.quant_injector.let(
        int_quant=LearnedRoundIntQuant,
        float_to_int_impl=AdaRoundRounding,
        learned_round_shape=tuple(proxy.tracked_weight().shape),
        learned_round_zeta=AdaRoundLearnedRounding.learned_round_zeta,
        learned_round_gamma=AdaRoundLearnedRounding.learned_round_gamma,
    )
    proxy.init_tensor_quant()
    # A learned (LSQ, GPTQ-frozen) scale or zero point is kept: the rebuild starts from the
    # declaration, the saved state puts back what training or calibration made of it.
    incompatible = proxy.tensor_quant.load_state_dict(learned_state, strict=False)
    if incompatible.unexpected_keys:
        raise QuantConfigError(
            f"{proxy.describe()}: learned rounding changed the quantizer's state layout "
            f"({incompatible.unexpected_keys} no longer exist)"
        )


@dataclass(frozen=True)
class ReconstructionResult:
    """Per block: its name, the output error before and after (on the reconstruction data)."""

    name: str
    error_before: float
    error_after: float


def _reconstruction_error(output: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over dim 1 and averaged over the others (BRECQ's normalisation)."""
    diff = (output - target).float() ** 2
    return diff.sum(dim=1).mean() if diff.dim() > 1 else diff.mean()


def _first_tensor(value: object) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, Tensor):
                return item
    raise QuantInputError(f"reconstruction: a block returned {type(value).__name__}, which holds no tensor")


def _mix_inputs(quant: Captured, float_: Captured, index: int, drop_prob: float) -> tuple[tuple, dict]:
    """The block's arguments for one step: the quantized model's, with QDrop's per-element
    substitution of the float model's first tensor argument when ``drop_prob > 0``."""
    args, kwargs = quant.args[index], quant.kwargs[index]
    if drop_prob <= 0.0 or not args or not isinstance(args[0], Tensor):
        return args, kwargs
    x_quant, x_float = args[0], float_.args[index][0]
    keep_float = torch.rand_like(x_quant) < drop_prob
    return (torch.where(keep_float, x_float, x_quant), *args[1:]), kwargs


def _block_error(block: nn.Module, quant: Captured, float_: Captured) -> float:
    with torch.no_grad():
        total = sum(
            float(_reconstruction_error(_first_tensor(block(*quant.args[i], **quant.kwargs[i])), _first_tensor(t)))
            for i, t in enumerate(float_.outputs)
        )
    return total / max(len(float_.outputs), 1)


def _beta(step: int, iters: int, warmup: float, start: float, end: float) -> float | None:
    """AdaRound's annealed exponent; None during warm-up (no regularisation yet)."""
    warm = int(warmup * iters)
    if step < warm:
        return None
    progress = (step - warm) / max(iters - warm, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)


def _ensure_calibrated(model: nn.Module, data: Iterable, num_batches: int | None, forward_fn: ForwardFn) -> None:
    """Calibrate activation quantizers still collecting statistics (on the same data)."""
    if any(m.is_collecting() for m in model.modules() if isinstance(m, ParameterFromRuntimeStats)):
        calibrate(model, data, num_batches=num_batches, progress=False, forward_fn=forward_fn)


def reconstruct(
    model: nn.Module,
    data: Iterable,
    blocks: Sequence[str | nn.Module] | None = None,
    *,
    num_batches: int | None = None,
    iters: int = 1000,
    lr: float = 1e-3,
    reg_weight: float = 0.01,
    beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    drop_prob: float = 0.0,
    learn_act_scale: bool = False,
    act_lr: float = 4e-5,
    seed: int | None = 0,
    progress: bool = True,
    forward_fn: ForwardFn | None = None,
    storage_device: torch.device | str | None = None,
) -> list[ReconstructionResult]:
    """Reconstruct ``blocks`` of ``model`` (names or modules; all of :func:`find_blocks` when
    None) one after the other in execution order, in place; returns the per-block errors.

    ``iters`` optimisation steps per block, each on one cached batch chosen at random, with
    Adam at ``lr`` on the rounding decisions (and at ``act_lr`` on activation scales inside the
    block when ``learn_act_scale``). The loss is the block's output error
    (:func:`_reconstruction_error`) plus ``reg_weight`` times the rounding regulariser, whose
    exponent anneals from ``beta[0]`` to ``beta[1]`` after ``warmup`` (a fraction of
    ``iters``). ``drop_prob > 0`` is QDrop. Activation quantizers not yet calibrated are
    calibrated first on ``data``. Deterministic for a given ``seed``.
    """
    if iters < 1:
        raise QuantConfigError(f"reconstruction: iters must be at least 1, got {iters!r}")
    if not 0.0 <= drop_prob <= 1.0:
        raise QuantConfigError(f"reconstruction: drop_prob must be in [0, 1], got {drop_prob!r}")
    run = forward_fn or call_model
    units = find_blocks(model) if blocks is None else resolve_modules(model, blocks)
    if not units:
        raise QuantConfigError(f"reconstruction: {type(model).__name__} has no weight-quantized layer to reconstruct")
    results = []
    layers = [m for _, block in units for m in block.modules() if isinstance(m, QuantWBIOL) and m.weight_quant]
    with seeded(seed), eval_mode(model):
        _ensure_calibrated(model, data, num_batches, run)
        for layer in layers:
            use_learned_rounding(layer)
        with quantization_disabled(model):
            order = execution_order(model, [block for _, block in units], data, run)
        if len(order) < len(units):
            missing = next(name for i, (name, _) in enumerate(units) if i not in order)
            raise QuantInputError(f"reconstruction: {missing} is never called by the model's forward pass")
        bar = progress_bar([units[i] for i in order], desc="reconstructing", total=len(units), enabled=progress)
        for name, block in bar:
            results.append(
                _reconstruct_block(
                    model, name, block, data, num_batches, run, storage_device,
                    iters=iters, lr=lr, reg_weight=reg_weight, beta=beta, warmup=warmup,
                    drop_prob=drop_prob, learn_act_scale=learn_act_scale, act_lr=act_lr,
                )
            )  # fmt: skip
    for layer in layers:  # quantizers rebuilt above follow their proxy's restored mode
        layer.weight_quant.tensor_quant.train(layer.weight_quant.training)
    return results


def _reconstruct_block(
    model: nn.Module,
    name: str,
    block: nn.Module,
    data: Iterable,
    num_batches: int | None,
    run: ForwardFn,
    storage_device: torch.device | str | None,
    *,
    iters: int,
    lr: float,
    reg_weight: float,
    beta: tuple[float, float],
    warmup: float,
    drop_prob: float,
    learn_act_scale: bool,
    act_lr: float,
) -> ReconstructionResult:
    with quantization_disabled(model):
        float_io = capture(model, block, data, num_batches, storage_device=storage_device, forward_fn=run)
    quant_in = capture(model, block, data, num_batches, outputs=False, storage_device=storage_device, forward_fn=run)
    roundings = [m for m in block.modules() if isinstance(m, AdaRoundRounding)]
    act_proxies = [m for m in block.modules() if isinstance(m, ActQuantProxyFromInjector) and not m.disable_quant]
    act_params = [p for proxy in act_proxies for p in proxy.tensor_quant.parameters()] if learn_act_scale else []
    error_before = _block_error(block, quant_in, float_io)

    groups = [{"params": [r.value for r in roundings], "lr": lr}]
    if act_params:
        groups.append({"params": act_params, "lr": act_lr})
    trainable = [p for group in groups for p in group["params"]]
    if not trainable:
        return ReconstructionResult(name, error_before, error_before)
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    saved_drop = [(proxy, proxy.quant_drop_prob, proxy.training) for proxy in act_proxies]
    optimizer = torch.optim.Adam(groups)
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        for rounding in roundings:
            rounding.soft = True
        if drop_prob > 0.0:
            for proxy in act_proxies:
                proxy.quant_drop_prob = drop_prob
                proxy.training = True  # the proxy alone: its quantizer's statistics stay frozen
        for step in range(iters):
            index = int(torch.randint(len(quant_in), ()).item())
            args, kwargs = _mix_inputs(quant_in, float_io, index, drop_prob)
            output = _first_tensor(block(*args, **kwargs))
            loss = _reconstruction_error(output, _first_tensor(float_io.outputs[index]))
            exponent = _beta(step, iters, warmup, *beta)
            if exponent is not None and roundings:
                loss = loss + reg_weight * sum(r.regularization(exponent) for r in roundings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for rounding in roundings:
            rounding.soft = False  # hard decisions from now on
        for proxy, prob, training in saved_drop:
            proxy.quant_drop_prob = prob
            proxy.training = training
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
        for proxy in act_proxies:
            proxy.clear_cache()
    return ReconstructionResult(name, error_before, _block_error(block, quant_in, float_io))


def adaround(
    model: nn.Module, data: Iterable, layers: Sequence[str] | None = None, **kwargs
) -> list[ReconstructionResult]:
    """AdaRound: reconstruct every weight-quantized layer on its own (``layers``: fnmatch
    patterns of layer names to restrict to). Keyword arguments as in :func:`reconstruct`."""
    names = [name for name, _ in weight_quant_layers(model)]
    if layers is not None:
        selected = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in layers)]
        if not selected:
            raise QuantConfigError(f"adaround: no weight-quantized layer matches {list(layers)}")
        names = selected
    return reconstruct(model, data, blocks=names, **kwargs)


def brecq(
    model: nn.Module,
    data: Iterable,
    blocks: Sequence[str | nn.Module] | None = None,
    learn_act_scale: bool = True,
    **kwargs,
) -> list[ReconstructionResult]:
    """BRECQ-style block reconstruction: blocks from :func:`find_blocks` unless given (mark your
    own with :func:`mark_block`); as in the paper, the activation step sizes inside each block
    are learned with the rounding. Keyword arguments as in :func:`reconstruct`."""
    return reconstruct(model, data, blocks=blocks, learn_act_scale=learn_act_scale, **kwargs)


def qdrop(
    model: nn.Module,
    data: Iterable,
    blocks: Sequence[str | nn.Module] | None = None,
    drop_prob: float = 0.5,
    learn_act_scale: bool = True,
    **kwargs,
) -> list[ReconstructionResult]:
    """QDrop: block reconstruction where activation quantization is dropped per element with
    probability ``drop_prob`` (block inputs and activations inside the block), activation
    scales learned alongside the rounding. Keyword arguments as in :func:`reconstruct`."""
    return reconstruct(model, data, blocks=blocks, drop_prob=drop_prob, learn_act_scale=learn_act_scale, **kwargs)
