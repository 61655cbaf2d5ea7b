"""Hypothesis strategies for valid IntQuantTensors, built from their integer codes.

A sample picks integer codes ``k`` in the range of its bit width and signedness, a positive
per-tensor or per-channel scale and an in-range zero point, and sets
``value = (k - zero_point) * scale``; the codes travel with it so properties can compare
against integer arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor

from quantwire.quant_tensor import IntQuantTensor


@dataclass
class IntSample:
    """A valid IntQuantTensor and the integer codes it was built from."""

    qt: IntQuantTensor
    codes: Tensor  # int64, the value's shape


def code_range(bit_width: int, signed: bool) -> tuple[int, int]:
    """The non-narrow integer range of a bit width."""
    if signed:
        return -(2 ** (bit_width - 1)), 2 ** (bit_width - 1) - 1
    return 0, 2**bit_width - 1


def from_codes(
    codes: Tensor, scale: Tensor, zero_point: Tensor, bit_width: int, signed: bool, training: bool = False
) -> IntSample:
    """The IntQuantTensor whose codes are ``codes``."""
    value = (codes.to(scale.dtype) - zero_point) * scale
    qt = IntQuantTensor(value, scale, zero_point, torch.tensor(float(bit_width)), signed, training)
    return IntSample(qt, codes)


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


@st.composite
def int_samples(
    draw: st.DrawFn,
    shape: tuple[int, ...] | None = None,
    bit_widths: tuple[int, int] = (2, 16),
    signed: bool | None = None,
    zero_zero_point: bool = False,
    per_channel: bool | None = None,
    scale: Tensor | None = None,
) -> IntSample:
    """A valid IntQuantTensor of up to 4 dimensions; arguments pin what they name."""
    shape = draw(shapes) if shape is None else shape
    bit_width = draw(st.integers(*bit_widths))
    signed = draw(st.booleans()) if signed is None else signed
    low, high = code_range(bit_width, signed)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    codes = torch.randint(low, high + 1, shape, generator=generator)
    per_channel = draw(st.booleans()) if per_channel is None else per_channel
    metadata_shape = [1] * len(shape)
    if per_channel:
        channel_dim = draw(st.integers(0, len(shape) - 1))
        metadata_shape[channel_dim] = shape[channel_dim]
    if scale is None:
        log_scale = torch.empty(metadata_shape).uniform_(-7.0, 3.0, generator=generator)
        scale = torch.exp(log_scale)
    if zero_zero_point:
        zero_point = torch.zeros(metadata_shape)
    else:
        zero_point = torch.randint(low, high + 1, metadata_shape, generator=generator).float()
    return from_codes(codes, scale, zero_point, bit_width, signed)


@st.composite
def same_scale_pairs(draw: st.DrawFn, bit_widths: tuple[int, int] = (2, 16)) -> tuple[IntSample, IntSample]:
    """Two IntQuantTensors of one shape sharing one (per-tensor or per-channel) scale, with
    independent bit widths, signedness and zero points."""
    first = draw(int_samples(bit_widths=bit_widths))
    second = draw(int_samples(shape=tuple(first.qt.shape), bit_widths=bit_widths, scale=first.qt.scale))
    return first, second
