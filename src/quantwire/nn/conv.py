"""Quantized convolutions and transposed convolutions."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from quantwire.nn.base import QuantWBIOL
from quantwire.nn.quantizer_kwargs import QuantSpec
from quantwire.quant.scaled_int import Int8WeightPerTensorFloat

_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_CONV_TRANSPOSE_ARGS = (*_CONV_ARGS, "output_padding")


def _float_kwargs(float_layer: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
    kwargs = {name: getattr(float_layer, name) for name in names}
    kwargs.update(bias=float_layer.bias is not None, device=float_layer.weight.device, dtype=float_layer.weight.dtype)
    return kwargs


class _QuantConvNd(QuantWBIOL):
    """Shared by every convolution: the quantizer keyword arguments and float construction."""

    def __init__(
        self,
        *args: Any,
        weight_quant: QuantSpec = Int8WeightPerTensorFloat,
        bias_quant: QuantSpec = None,
        input_quant: QuantSpec = None,
        output_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        torch_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in self._torch_args}
        self._torch_class.__init__(self, *args, **torch_kwargs)
        self._init_quant(weight_quant, bias_quant, input_quant, output_quant, return_quant_tensor, kwargs)

    _torch_class: type[nn.Module]
    _torch_args = frozenset((*_CONV_TRANSPOSE_ARGS, "bias", "device", "dtype"))

    @property
    def fan_in(self) -> int:
        weight = self.weight
        return weight.numel() // weight.shape[self.output_channel_dim]


class _QuantConv(_QuantConvNd):
    def inner_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)

    @staticmethod
    def float_constructor_kwargs(float_layer: nn.Module) -> dict[str, Any]:
        return _float_kwargs(float_layer, _CONV_ARGS)


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with weight, bias, input and output quantizers."""

    _torch_class = nn.Conv1d


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with weight, bias, input and output quantizers."""

    _torch_class = nn.Conv2d


class QuantConv3d(_QuantConv, nn.Conv3d):
    """``nn.Conv3d`` with weight, bias, input and output quantizers."""

    _torch_class = nn.Conv3d


class _QuantConvTranspose(_QuantConvNd):
    """Transposed convolutions: output channels are dim 1 of the weight (per group)."""

    output_channel_dim = 1
    input_channel_dim = 0

    @property
    def fan_in(self) -> int:
        weight = self.weight
        return weight.numel() // weight.shape[1] // self.groups

    def output_channel_scale(self, weight_scale: Tensor) -> Tensor | None:
        # Weight dim 1 holds out_channels / groups: output channel o uses scale o mod that.
        scale = super().output_channel_scale(weight_scale)
        if scale is None or scale.dim() == 0:
            return scale
        return scale.repeat(self.groups)

    def forward(self, x: Any, output_size: list[int] | None = None) -> Any:
        self._output_size = output_size
        return super().forward(x)

    def inner_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        output_padding = self._output_padding(
            x, self._output_size, self.stride, self.padding, self.kernel_size, self.num_spatial_dims, self.dilation
        )
        return self._transposed_conv(x, weight, bias, output_padding)

    @staticmethod
    def float_constructor_kwargs(float_layer: nn.Module) -> dict[str, Any]:
        return _float_kwargs(float_layer, _CONV_TRANSPOSE_ARGS)


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with weight, bias, input and output quantizers."""

    _torch_class = nn.ConvTranspose1d
    num_spatial_dims = 1

    def _transposed_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, output_padding: Any) -> Tensor:
        return nn.functional.conv_transpose1d(
            x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with weight, bias, input and output quantizers."""

    _torch_class = nn.ConvTranspose2d
    num_spatial_dims = 2

    def _transposed_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, output_padding: Any) -> Tensor:
        return nn.functional.conv_transpose2d(
            x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )
