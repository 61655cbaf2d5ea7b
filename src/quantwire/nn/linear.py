"""Quantized ``torch.nn.Linear``."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from quantwire.nn.base import QuantWBIOL
from quantwire.nn.quantizer_kwargs import QuantSpec
from quantwire.quant.scaled_int import Int8WeightPerTensorFloat


class QuantLinear(QuantWBIOL, nn.Linear):
    """``nn.Linear`` with weight, bias, input and output quantizers (8-bit weights by default)."""

    output_feature_dim = -1

    def __init__(
        self,
        in_features: int,
        out_features: int,
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
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_quant(weight_quant, bias_quant, input_quant, output_quant, return_quant_tensor, kwargs)

    def inner_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def float_constructor_kwargs(float_layer: nn.Linear) -> dict[str, Any]:
        return {
            "in_features": float_layer.in_features,
            "out_features": float_layer.out_features,
            "bias": float_layer.bias is not None,
            "device": float_layer.weight.device,
            "dtype": float_layer.weight.dtype,
        }
