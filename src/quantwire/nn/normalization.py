"""Quantized ``torch.nn.LayerNorm``."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from quantwire.nn.base import QuantWBIOL
from quantwire.nn.quantizer_kwargs import QuantSpec
from quantwire.quant.scaled_int import Int8WeightPerTensorFloat


class QuantLayerNorm(QuantWBIOL, nn.LayerNorm):
    """``nn.LayerNorm`` with weight, bias, input and output quantizers (the affine weight is
    quantized to 8 bits per tensor by default; without ``elementwise_affine`` there is none)."""

    def __init__(
        self,
        normalized_shape: Any,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        weight_quant: QuantSpec = Int8WeightPerTensorFloat,
        bias_quant: QuantSpec = None,
        input_quant: QuantSpec = None,
        output_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        nn.LayerNorm.__init__(self, normalized_shape, eps, elementwise_affine, bias, device, dtype)
        if self.weight is None:
            weight_quant = None
        if self.bias is None:
            bias_quant = None
        self._init_quant(weight_quant, bias_quant, input_quant, output_quant, return_quant_tensor, kwargs)

    def inner_forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    def _accumulator_tensor(self, *args: Any) -> None:
        """A normalisation is no sum of products: its output has no accumulator grid."""
        return None

    @staticmethod
    def float_constructor_kwargs(float_layer: nn.LayerNorm) -> dict[str, Any]:
        reference = float_layer.weight
        return {
            "normalized_shape": float_layer.normalized_shape,
            "eps": float_layer.eps,
            "elementwise_affine": float_layer.elementwise_affine,
            "bias": float_layer.bias is not None,
            "device": None if reference is None else reference.device,
            "dtype": None if reference is None else reference.dtype,
        }
