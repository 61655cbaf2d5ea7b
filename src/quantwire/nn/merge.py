"""Layers that merge tensors: element-wise addition (residuals) and concatenation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quantwire.nn.base import QuantLayer
from quantwire.nn.quantizer_kwargs import QuantSpec
from quantwire.proxy.base import plain_value
from quantwire.quant.scaled_int import Int8ActPerTensorFloat
from quantwire.quant_tensor import QuantTensor


class _QuantMerge(QuantLayer):
    """Quantizes every operand with one shared ``input_quant`` (so that, once its scale is
    frozen, operands share a grid and the merge stays on it), then ``output_quant``."""

    def __init__(
        self,
        input_quant: QuantSpec = Int8ActPerTensorFloat,
        output_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.return_quant_tensor = return_quant_tensor
        self._attach_quantizers(
            {"input_": ("input_quant", input_quant), "output_": ("output_quant", output_quant)}, kwargs
        )

    def _quantize_inputs(self, tensors: tuple[Any, ...]) -> list[Any]:
        """Every operand on the shared quantizer's grid (QuantTensors when asked for).

        While the shared quantizer's scale depends on its input (statistics being collected in
        training or calibration, or computed per call) it sees all operands in one call: its
        range must cover every operand, not average the ranges of separate calls (which would
        clip the larger operand). Once its scale is fixed, quantizing each operand on its own
        gives the same result without copying the operands into one tensor."""
        if self.input_quant is None:
            return [t if self.return_quant_tensor else plain_value(t) for t in tensors]
        values = [plain_value(t) for t in tensors]
        quantize = self.input_quant if self.return_quant_tensor else self.input_quant.fake_quant
        # Under torch.compile the joint call stays: whether statistics are still being collected
        # is read from step counters the compiled graph must not branch on.
        if not torch.compiler.is_compiling() and not self.input_quant.scale_depends_on_input():
            return [quantize(v) for v in values]
        if all(v.shape == values[0].shape for v in values):
            joint = quantize(torch.stack(values))
            return [joint[i] for i in range(len(values))]
        if self.return_quant_tensor:  # operands that broadcast: one call each
            return [quantize(v) for v in values]
        flat = quantize(torch.cat([v.reshape(-1) for v in values]))
        return [part.reshape(v.shape) for part, v in zip(flat.split([v.numel() for v in values]), values, strict=True)]

    def _quantize_output(self, output: Any) -> Tensor | QuantTensor:
        if self.output_quant is not None:
            output = self.output_quant(output) if self.return_quant_tensor else self.output_quant.fake_quant(output)
        return output if self.return_quant_tensor else plain_value(output)


class QuantEltwiseAdd(_QuantMerge):
    """``a + b`` of quantized operands (residual connections)."""

    def forward(self, a: Tensor | QuantTensor, b: Tensor | QuantTensor) -> Tensor | QuantTensor:
        qa, qb = self._quantize_inputs((a, b))
        return self._quantize_output(qa + qb)


class QuantCat(_QuantMerge):
    """``torch.cat`` of quantized operands along ``dim``."""

    def __init__(self, dim: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim = dim

    def forward(self, tensors: list[Tensor | QuantTensor]) -> Tensor | QuantTensor:
        return self._quantize_output(torch.cat(self._quantize_inputs(tuple(tensors)), dim=self.dim))
