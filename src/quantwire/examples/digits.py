"""A small CNN on scikit-learn's digits dataset (8x8 grey images, shipped with scikit-learn:
no download), used by the demo, the benchmarks and the tests.

:func:`load_digits_splits` gives fixed train/calibration/test tensors; :class:`DigitsCNN` is
the network, built from quantwire layers so that the same class is the float model (every
quantizer ``None``) and any quantized variant; :func:`train` and :func:`accuracy` do what they
say, deterministically for a seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quantwire.algorithms._utils import progress_bar, seeded
from quantwire.algorithms.reconstruction import mark_block
from quantwire.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from quantwire.nn.quantizer_kwargs import QuantSpec

__all__ = ["DigitsCNN", "DigitsSplits", "accuracy", "batches", "load_digits_splits", "train"]


@dataclass(frozen=True)
class DigitsSplits:
    """Images ``(N, 1, 8, 8)`` in ``[0, 1]`` and integer labels, split once with a fixed seed."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def calibration(self, count: int = 256) -> Tensor:
        """The first ``count`` training images: what PTQ calibrates and reconstructs on."""
        return self.train_x[:count]


def load_digits_splits(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplits:
    """scikit-learn's 1797 digits, shuffled with ``seed`` and split into train and test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    images, labels = images[order], labels[order]
    cut = int(len(labels) * (1.0 - test_fraction))
    return DigitsSplits(images[:cut], labels[:cut], images[cut:], labels[cut:])


def batches(x: Tensor, y: Tensor | None = None, batch_size: int = 64) -> list[Any]:
    """``x`` (with ``y``) cut into batches, in order."""
    if y is None:
        return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


class DigitsCNN(nn.Module):
    """conv(1→16) relu, conv(16→32) relu, max-pool, conv(32→32) relu, average, linear(32→10).

    ``weight_quant``/``act_quant`` are the quantizers of every conv/linear weight and every
    ReLU output (``act_quant`` also quantizes the pooled features the classifier reads);
    ``input_quant`` quantizes the image; ``weight_bit_width``/``act_bit_width`` override the
    quantizers' bit widths. The two conv stages are ``features.stage1``/``features.stage2``
    sub-modules marked with :func:`~quantwire.algorithms.mark_block`: the units block
    reconstruction (BRECQ, QDrop) optimises.
    """

    def __init__(
        self,
        weight_quant: QuantSpec = None,
        act_quant: QuantSpec = None,
        input_quant: QuantSpec = None,
        weight_bit_width: int | None = None,
        act_bit_width: int | None = None,
    ) -> None:
        super().__init__()
        weight_kwargs = {"weight_bit_width": weight_bit_width} if weight_bit_width and weight_quant else {}
        act_kwargs = {"bit_width": act_bit_width} if act_bit_width and act_quant else {}

        def conv(cin: int, cout: int) -> QuantConv2d:
            return QuantConv2d(cin, cout, 3, padding=1, weight_quant=weight_quant, **weight_kwargs)

        def relu() -> QuantReLU:
            return QuantReLU(act_quant=act_quant, **act_kwargs)

        self.input_quant = QuantIdentity(act_quant=input_quant)
        stage1 = mark_block(nn.Sequential(conv(1, 16), relu(), conv(16, 32), relu()))
        stage2 = mark_block(nn.Sequential(nn.MaxPool2d(2), conv(32, 32), relu()))
        self.features = nn.Sequential()
        self.features.add_module("stage1", stage1)
        self.features.add_module("stage2", stage2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        classifier_kwargs = {**weight_kwargs, **{f"input_{k}": v for k, v in act_kwargs.items()}}
        self.classifier = QuantLinear(32, 10, weight_quant=weight_quant, input_quant=act_quant, **classifier_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.input_quant(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


def train(
    model: nn.Module,
    splits: DigitsSplits,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    desc: str = "training",
) -> nn.Module:
    """Adam with cosine decay and cross-entropy on the training split; returns ``model``."""
    with seeded(seed):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * ((len(splits.train_y) + batch_size - 1) // batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        model.train()
        for _ in progress_bar(range(epochs), desc=desc, enabled=progress):
            order = torch.randperm(len(splits.train_y))
            for i in range(0, len(order), batch_size):
                index = order[i : i + batch_size]
                loss = nn.functional.cross_entropy(model(splits.train_x[index]), splits.train_y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    model.eval()
    return model


def accuracy(model: nn.Module, data: Iterable[tuple[Tensor, Tensor]] | DigitsSplits) -> float:
    """Top-1 accuracy (in %) of ``model`` in eval mode on ``data`` (the test split of a
    :class:`DigitsSplits`, or ``(x, y)`` batches)."""
    if isinstance(data, DigitsSplits):
        data = batches(data.test_x, data.test_y, 256)
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data:
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)
