"""Pooling and resampling of quantized tensors.

Max pooling and nearest-neighbour upsampling pick elements, so a QuantTensor keeps its grid.
Average pooling over ``K`` elements sums ``K`` integer codes and divides by ``K``: the result is
exactly on the grid of scale ``scale / K`` with ``ceil(log2 K)`` more bits, which is what these
layers return (optionally re-quantized by ``output_quant``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from quantwire.nn.base import QuantLayer
from quantwire.nn.quantizer_kwargs import QuantSpec
from quantwire.proxy.base import plain_value
from quantwire.quant_tensor import IntQuantTensor, QuantTensor


class _PassThroughQuantLayer(QuantLayer):
    """Layers whose torch op keeps a QuantTensor's metadata through ``__torch_function__``."""

    def _init_pass_through(self, return_quant_tensor: bool) -> None:
        self.return_quant_tensor = return_quant_tensor

    def forward(self, x: Tensor | QuantTensor) -> Tensor | QuantTensor:
        output = super().forward(x)
        return output if self.return_quant_tensor else plain_value(output)


class QuantMaxPool1d(_PassThroughQuantLayer, nn.MaxPool1d):
    """``nn.MaxPool1d`` that keeps a QuantTensor input quantized."""

    def __init__(self, *args: Any, return_quant_tensor: bool = False, **kwargs: Any) -> None:
        nn.MaxPool1d.__init__(self, *args, **kwargs)
        self._init_pass_through(return_quant_tensor)


class QuantMaxPool2d(_PassThroughQuantLayer, nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps a QuantTensor input quantized."""

    def __init__(self, *args: Any, return_quant_tensor: bool = False, **kwargs: Any) -> None:
        nn.MaxPool2d.__init__(self, *args, **kwargs)
        self._init_pass_through(return_quant_tensor)


class QuantUpsample(_PassThroughQuantLayer, nn.Upsample):
    """``nn.Upsample``; in ``nearest`` mode a QuantTensor input stays quantized."""

    def __init__(self, *args: Any, return_quant_tensor: bool = False, **kwargs: Any) -> None:
        nn.Upsample.__init__(self, *args, **kwargs)
        self._init_pass_through(return_quant_tensor)


class _QuantAvgPool(QuantLayer):
    """Average pooling whose QuantTensor output carries the exact grid of the average."""

    def _init_avg(self, output_quant: QuantSpec, return_quant_tensor: bool, kwargs: dict[str, Any]) -> None:
        self.return_quant_tensor = return_quant_tensor
        self._attach_quantizers({"output_": ("output_quant", output_quant)}, kwargs)

    def _window_size(self, x: Tensor) -> int | None:
        """Elements averaged per output, or None when it varies between outputs."""
        raise NotImplementedError  # pragma: no cover - defined by each pooling layer

    def forward(self, x: Tensor | QuantTensor) -> Tensor | QuantTensor:
        output = super().forward(plain_value(x))
        quant: Any = None
        window = self._window_size(plain_value(x))
        if isinstance(x, IntQuantTensor) and window is not None and x.scale.numel() == 1 and x.zero_point.numel() == 1:
            quant = IntQuantTensor(
                output,
                x.scale / window,
                x.zero_point * window,
                x.bit_width + math.ceil(math.log2(window)),
                x.signed,
                self.training,
            )
        if self.output_quant is not None:
            quant = self.output_quant(output)
            output = plain_value(quant)
        return self._finish(quant, output)


class QuantAvgPool2d(_QuantAvgPool, nn.AvgPool2d):
    """``nn.AvgPool2d`` with an exact output grid (bit width grows by ``ceil(log2 K)``)."""

    def __init__(
        self, *args: Any, output_quant: QuantSpec = None, return_quant_tensor: bool = False, **kwargs: Any
    ) -> None:
        torch_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _AVG_POOL_ARGS}
        nn.AvgPool2d.__init__(self, *args, **torch_kwargs)
        self._init_avg(output_quant, return_quant_tensor, kwargs)

    def _window_size(self, x: Tensor) -> int | None:
        padding = self.padding if isinstance(self.padding, tuple) else (self.padding, self.padding)
        if self.divisor_override is not None or (any(padding) and not self.count_include_pad) or self.ceil_mode:
            return None
        kernel = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size, self.kernel_size)
        return kernel[0] * kernel[1]


class QuantAdaptiveAvgPool2d(_QuantAvgPool, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` with an exact output grid when the windows are all equal."""

    def __init__(
        self, output_size: Any, output_quant: QuantSpec = None, return_quant_tensor: bool = False, **kwargs: Any
    ) -> None:
        nn.AdaptiveAvgPool2d.__init__(self, output_size)
        self._init_avg(output_quant, return_quant_tensor, kwargs)

    def _window_size(self, x: Tensor) -> int | None:
        size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size, self.output_size)
        height, width = x.shape[-2:]
        out_h = height if size[0] is None else size[0]
        out_w = width if size[1] is None else size[1]
        if height % out_h or width % out_w:
            return None
        return (height // out_h) * (width // out_w)


_AVG_POOL_ARGS = frozenset({"kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"})
