"""Models, inputs and a training protocol shared by ``test_reference_pitfalls.py``.

A module of its own (not the test file) so that a spawned worker process can import it to
unpickle the models and run :func:`continue_in_worker`.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantwire.nn import (
    QuantConv2d,
    QuantIdentity,
    QuantLayerNorm,
    QuantLinear,
    QuantMaxPool2d,
    QuantMultiheadAttention,
    QuantReLU,
)
from quantwire.quant import Int8ActDynamicPerTokenFloat, Int8ActPerTensorFloat, Int8WeightPerChannelFloat

COLLECT_STATS_STEPS = 5
IMAGE_SHAPE = (4, 3, 16, 16)
TOKEN_SHAPE = (4, 6, 16)


class SmallCNN(nn.Module):
    """QuantConv2d + QuantReLU + QuantMaxPool2d + QuantLinear, per-channel weights, runtime-stats
    activation quantizers collecting for ``collect_stats_steps`` training steps, a quantizer
    derived with ``.let`` plus a keyword override, a proxy shared by two layers and (optionally)
    a QuantMultiheadAttention over the 4x4 feature map's 16 positions."""

    def __init__(self, collect_stats_steps: int = COLLECT_STATS_STEPS, attention: bool = True) -> None:
        super().__init__()
        steps = collect_stats_steps
        self.conv1 = QuantConv2d(
            3,
            8,
            3,
            padding=1,
            weight_quant=Int8WeightPerChannelFloat,
            input_quant=Int8ActPerTensorFloat,
            input_collect_stats_steps=steps,
        )
        self.relu1 = QuantReLU(collect_stats_steps=steps)
        self.pool1 = QuantMaxPool2d(2)
        # Derived in the constructor (not a module-level name): pickling must rebuild it from
        # its base and overrides. weight_bit_width=4 derives it once more.
        derived = Int8WeightPerChannelFloat.let(scaling_min_val=1e-8)
        self.conv2 = QuantConv2d(8, 8, 3, padding=1, weight_quant=derived, weight_bit_width=4)
        self.conv3 = QuantConv2d(8, 8, 3, padding=1, weight_quant=self.conv2.weight_quant)  # shared proxy
        self.relu2 = QuantReLU(collect_stats_steps=steps)
        self.pool2 = QuantMaxPool2d(2)
        self.attention = None
        if attention:
            self.attention = QuantMultiheadAttention(
                8,
                2,
                batch_first=True,
                q_scaled_collect_stats_steps=steps,
                k_transposed_collect_stats_steps=steps,
                v_collect_stats_steps=steps,
                attn_output_weights_collect_stats_steps=steps,
            )
        self.fc = QuantLinear(8 * 4 * 4, 10, weight_quant=Int8WeightPerChannelFloat)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv3(self.conv2(x))))
        if self.attention is not None:
            tokens = x.flatten(2).transpose(1, 2)  # (N, 16 positions, 8 channels)
            attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
            x = x + attended.transpose(1, 2).reshape(x.shape)
        return self.fc(x.flatten(1))

    def runtime_stats_counters(self) -> dict[str, int]:
        """Every step counter of a runtime-stats activation quantizer, by module path."""
        return {
            name: module.counter
            for name, module in self.named_modules()
            if hasattr(module, "counter") and hasattr(module, "running")
        }


class TokenBlock(nn.Module):
    """A transformer-style MLP block: QuantLayerNorm, QuantIdentity with dynamic per-token
    quantization, two QuantLinear with a GELU between them, and a residual."""

    def __init__(self, dim: int = TOKEN_SHAPE[-1], hidden: int = 32) -> None:
        super().__init__()
        self.norm = QuantLayerNorm(dim)
        self.act_quant = QuantIdentity(act_quant=Int8ActDynamicPerTokenFloat)
        self.fc1 = QuantLinear(dim, hidden, weight_quant=Int8WeightPerChannelFloat)
        self.fc2 = QuantLinear(
            hidden, dim, weight_quant=Int8WeightPerChannelFloat, input_quant=Int8ActDynamicPerTokenFloat
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.act_quant(self.norm(x)))))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_input(shape: tuple[int, ...], step: int, seed: int = 0) -> Tensor:
    """A deterministic input for ``step``, with a magnitude that changes from step to step (so
    that each collected statistic matters)."""
    generator = seeded(1000 * seed + step)
    return torch.randn(shape, generator=generator) * (1.0 + 0.25 * (step % 4))


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: float sums then run in the same order in every process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_steps(model: nn.Module, shape: tuple[int, ...], steps: range, lr: float = 0.05) -> list[Tensor]:
    """Training steps (forward, MSE loss against a fixed target, backward, plain SGD update) on
    ``make_input(shape, step)``; returns each step's output (detached)."""
    model.train()
    outputs = []
    for step in steps:
        x = make_input(shape, step)
        output = model(x)
        target = torch.randn(output.shape, generator=seeded(5000 + step))
        loss = F.mse_loss(output, target)
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter -= lr * parameter.grad
        outputs.append(output.detach())
    return outputs


def eval_outputs(model: nn.Module, shape: tuple[int, ...], steps: range) -> list[Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(make_input(shape, step)) for step in steps]


def protocol(model: nn.Module, shape: tuple[int, ...], start: int) -> dict[str, Any]:
    """What a copy must reproduce: four more training steps from ``start`` (crossing the end of
    statistics collection), eval outputs, then the full state dict."""
    with single_thread():
        train = train_steps(model, shape, range(start, start + 4))
        evaluated = eval_outputs(model, shape, range(100, 102))
    return {"train": train, "eval": evaluated, "state": model.state_dict()}


def continue_in_worker(payload: bytes, shape: tuple[int, ...], start: int) -> bytes:
    """Run in a spawned process: unpickle the model, run :func:`protocol`, pickle the results."""
    model = pickle.loads(payload)
    return pickle.dumps(protocol(model, shape, start))
