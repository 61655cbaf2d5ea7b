"""Quantized activations: identity, ReLU, hard-tanh, sigmoid, tanh, and any other wrapped."""

from __future__ import annotations

from typing import Any

from torch import nn

from quantwire.inject import wireable_names
from quantwire.nn.base import QuantActLayer
from quantwire.nn.quantizer_kwargs import QuantSpec, is_injector
from quantwire.quant.scaled_int import (
    Int8ActPerTensorFloat,
    Int8ActPerTensorFloatMinMaxInit,
    Uint8ActPerTensorFloat,
)


class QuantIdentity(QuantActLayer):
    """Quantizes its input (8-bit signed by default)."""

    def __init__(
        self,
        act_quant: QuantSpec = Int8ActPerTensorFloat,
        input_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._init_quant(None, act_quant, input_quant, return_quant_tensor, kwargs)


class QuantReLU(QuantActLayer):
    """``nn.ReLU`` followed by an activation quantizer (8-bit unsigned by default)."""

    def __init__(
        self,
        inplace: bool = False,
        act_quant: QuantSpec = Uint8ActPerTensorFloat,
        input_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._init_quant(nn.ReLU(inplace=inplace), act_quant, input_quant, return_quant_tensor, kwargs)


class QuantHardTanh(QuantActLayer):
    """``nn.Hardtanh``; the default quantizer learns a scale initialised from ``max(|min_val|, |max_val|)``."""

    def __init__(
        self,
        min_val: float = -1.0,
        max_val: float = 1.0,
        inplace: bool = False,
        act_quant: QuantSpec = Int8ActPerTensorFloatMinMaxInit,
        input_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if is_injector(act_quant) and "max_val" in wireable_names(act_quant):
            kwargs.setdefault("min_val", min_val)
            kwargs.setdefault("max_val", max_val)
        self._init_quant(nn.Hardtanh(min_val, max_val, inplace), act_quant, input_quant, return_quant_tensor, kwargs)


class QuantSigmoid(QuantActLayer):
    """``nn.Sigmoid`` followed by an activation quantizer (8-bit unsigned by default)."""

    def __init__(
        self,
        act_quant: QuantSpec = Uint8ActPerTensorFloat,
        input_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._init_quant(nn.Sigmoid(), act_quant, input_quant, return_quant_tensor, kwargs)


class QuantTanh(QuantActLayer):
    """``nn.Tanh`` followed by an activation quantizer (8-bit signed by default)."""

    def __init__(
        self,
        act_quant: QuantSpec = Int8ActPerTensorFloat,
        input_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._init_quant(nn.Tanh(), act_quant, input_quant, return_quant_tensor, kwargs)


class QuantActivation(QuantActLayer):
    """Any element-wise activation module (``nn.GELU()``, ``nn.SiLU()``, ``nn.ReLU()``, ...)
    followed by an activation quantizer: what model conversion puts in place of an activation
    the config quantizes. The float module is kept as ``act_impl``."""

    def __init__(
        self,
        act_impl: nn.Module,
        act_quant: QuantSpec = Int8ActPerTensorFloat,
        input_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(act_impl, nn.Module):
            raise TypeError(f"QuantActivation: act_impl must be an nn.Module, got {type(act_impl).__name__}")
        self._init_quant(act_impl, act_quant, input_quant, return_quant_tensor, kwargs)
