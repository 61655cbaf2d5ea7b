"""Quantized ``torch.nn.Embedding``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantwire.nn.base import QuantLayer, copy_float_state
from quantwire.nn.quantizer_kwargs import QuantSpec
from quantwire.proxy.base import plain_value
from quantwire.quant.scaled_int import Int8WeightPerTensorFloat
from quantwire.quant_tensor import IntQuantTensor, QuantTensor


class QuantEmbedding(QuantLayer, nn.Embedding):
    """``nn.Embedding`` looking rows up in the quantized table. Per-row (per output channel)
    scales are gathered with the rows, so the returned QuantTensor stays valid."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Tensor | None = None,
        _freeze: bool = False,
        device: Any = None,
        dtype: Any = None,
        weight_quant: QuantSpec = Int8WeightPerTensorFloat,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        nn.Embedding.__init__(
            self,
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            _freeze,
            device,
            dtype,
        )
        self.return_quant_tensor = return_quant_tensor
        self._attach_quantizers({"weight_": ("weight_quant", weight_quant)}, kwargs)

    def _lookup(self, indices: Tensor, table: Tensor) -> Tensor:
        return F.embedding(indices, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def _renorm(self, indices: Tensor) -> None:
        """``max_norm``: renormalise the looked-up rows of the float table in place, as
        ``nn.Embedding`` does, before it is quantized (renormalising the quantized table would
        move its rows off the grid, and corrupt the eval-time cache of it)."""
        if self.max_norm is not None:
            with torch.no_grad():
                torch.embedding_renorm_(self.weight, indices.contiguous(), self.max_norm, self.norm_type)

    def quant_weight(self) -> QuantTensor | Tensor:
        """The quantized table (a QuantTensor; the float table when there is no quantizer)."""
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def forward(self, indices: Tensor) -> Tensor | QuantTensor:
        self._renorm(indices)
        if self.weight_quant is None:
            return self._lookup(indices, self.weight)
        if not self.return_quant_tensor:
            return self._lookup(indices, self.weight_quant.fake_quant(self.weight))
        table = self.quant_weight()
        output = self._lookup(indices, plain_value(table))
        if not isinstance(table, IntQuantTensor):
            return output
        scale, zero_point = table.scale, table.zero_point
        if scale.numel() > 1:
            scale = F.embedding(indices, scale.reshape(self.num_embeddings, -1))
        if zero_point.numel() > 1:
            zero_point = F.embedding(indices, zero_point.reshape(self.num_embeddings, -1))
        return IntQuantTensor(output, scale, zero_point, table.bit_width, table.signed, self.training)

    @classmethod
    def from_float(cls, float_layer: nn.Embedding, **quant_kwargs: Any) -> QuantEmbedding:
        layer = cls(
            float_layer.num_embeddings,
            float_layer.embedding_dim,
            float_layer.padding_idx,
            float_layer.max_norm,
            float_layer.norm_type,
            float_layer.scale_grad_by_freq,
            float_layer.sparse,
            device=float_layer.weight.device,
            dtype=float_layer.weight.dtype,
            **quant_kwargs,
        )
        copy_float_state(float_layer, layer)
        return layer
