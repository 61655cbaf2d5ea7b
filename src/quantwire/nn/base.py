"""Base classes of quant layers: one for layers with a weight, one for activation layers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from quantwire.errors import QuantInputError
from quantwire.nn.quantizer_kwargs import QuantSpec, build_proxy, route_quant_kwargs
from quantwire.proxy.base import QuantProxyFromInjector, deferring_quantizer_builds, plain_value
from quantwire.quant_tensor import IntQuantTensor, QuantTensor


class QuantLayer(nn.Module):
    """What every quant layer shares: attaching quantizers and returning QuantTensors on request."""

    return_quant_tensor: bool
    # Where a layer's weight keeps its output and input channels (per-channel and per-group
    # quantizers read these); transposed convolutions swap them.
    output_channel_dim = 0
    input_channel_dim = 1

    def _attach_quantizers(self, quantizers: dict[str, tuple[str, QuantSpec]], kwargs: dict[str, Any]) -> None:
        """Build each ``role`` proxy from ``quantizers`` (prefix -> (role, quantizer)) and route
        the layer's remaining keyword arguments to them by prefix."""
        routed = route_quant_kwargs(type(self).__name__, quantizers, kwargs)
        for prefix, (role, quant) in quantizers.items():
            setattr(self, role, build_proxy(self, role, quant, routed[prefix]))

    def quant_proxies(self) -> list[QuantProxyFromInjector]:
        """The proxies this layer owns or shares."""
        return [m for m in self.children() if isinstance(m, QuantProxyFromInjector)]

    def init_quantizers(self) -> None:
        """Rebuild every quantizer from the layer as it is now (after editing its weights)."""
        for proxy in self.quant_proxies():
            proxy.init_tensor_quant()

    def _finish(self, quant: QuantTensor | None, value: Tensor) -> Tensor | QuantTensor:
        """What the layer returns: a QuantTensor when asked for and available, else the value."""
        if self.return_quant_tensor and quant is not None:
            return quant
        return value


def _channel_view(scale: Tensor, output: Tensor, channel_dim: int) -> Tensor:
    """A per-output-channel weight scale laid along the output's channel dimension."""
    if scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * output.dim()
    shape[channel_dim] = -1
    return scale.reshape(shape)


class QuantWBIOL(QuantLayer):
    """Layers with a weight, a bias, an input and an output quantizer (Linear, Conv, ...).

    A subclass also derives from its ``torch.nn`` twin, implements :meth:`inner_forward` and
    says where output channels are (``output_channel_dim`` in the weight,
    ``output_feature_dim`` in the output) and how many products each output sums (``fan_in``).
    """

    output_feature_dim = 1

    def _init_quant(
        self,
        weight_quant: QuantSpec,
        bias_quant: QuantSpec,
        input_quant: QuantSpec,
        output_quant: QuantSpec,
        return_quant_tensor: bool,
        kwargs: dict[str, Any],
    ) -> None:
        self.return_quant_tensor = return_quant_tensor
        self._attach_quantizers(
            {
                "weight_": ("weight_quant", weight_quant),
                "bias_": ("bias_quant", bias_quant),
                "input_": ("input_quant", input_quant),
                "output_": ("output_quant", output_quant),
            },
            kwargs,
        )

    def inner_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - every concrete layer defines it

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight.shape) // self.weight.shape[self.output_channel_dim]

    def output_channel_scale(self, weight_scale: Tensor) -> Tensor | None:
        """The weight scale as one value (shape ``()``) or one per output channel (``(C,)``);
        None when it also varies along the weight's other dims (per group)."""
        if weight_scale.numel() == 1:
            return weight_scale.reshape(())
        dim = self.output_channel_dim
        if weight_scale.dim() != self.weight.dim() or any(
            size != 1 for d, size in enumerate(weight_scale.shape) if d != dim
        ):
            return None
        return weight_scale.reshape(-1)

    def quant_weight(self) -> QuantTensor | Tensor:
        """The quantized weight (a QuantTensor; the float weight when there is no quantizer)."""
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def _needs_metadata(self) -> bool:
        bias_needs_scales = self.bias_quant is not None and self.bias_quant.requires_input_scale
        return self.return_quant_tensor or bias_needs_scales

    def forward(self, x: Tensor | QuantTensor) -> Tensor | QuantTensor:
        if not self._needs_metadata():
            return self._fast_forward(x)
        quant_input = self.input_quant(x) if self.input_quant is not None else x
        quant_weight = self.quant_weight()
        input_scale = quant_input.scale if isinstance(quant_input, QuantTensor) else None
        weight_scale = None
        if isinstance(quant_weight, QuantTensor):
            channel_scale = self.output_channel_scale(quant_weight.scale)
            weight_scale = quant_weight.scale if channel_scale is None else channel_scale
        quant_bias = None
        if self.bias is not None and self.bias_quant is not None:
            quant_bias = self.bias_quant(self.bias, input_scale, weight_scale)
        bias = self.bias if quant_bias is None else plain_value(quant_bias)
        output = self.inner_forward(plain_value(quant_input), plain_value(quant_weight), bias)
        if self.output_quant is not None:
            quant_output = self.output_quant(output)
            return self._finish(quant_output if isinstance(quant_output, QuantTensor) else None, output)
        return self._finish(self._accumulator_tensor(output, quant_input, quant_weight, quant_bias), output)

    def _fast_forward(self, x: Tensor | QuantTensor) -> Tensor:
        """Forward without building any QuantTensor (the common training and inference path)."""
        x = self.input_quant.fake_quant(x) if self.input_quant is not None else plain_value(x)
        weight = self.weight if self.weight_quant is None else self.weight_quant.fake_quant(self.weight)
        bias = self.bias
        if bias is not None and self.bias_quant is not None:
            bias = self.bias_quant.fake_quant(bias)
        output = self.inner_forward(x, weight, bias)
        if self.output_quant is not None:
            output = self.output_quant.fake_quant(output)
        return output

    def _accumulator_tensor(
        self, output: Tensor, quant_input: Any, quant_weight: Any, quant_bias: Any
    ) -> IntQuantTensor | None:
        """The output as the integer accumulator sees it, when input and weight are symmetric
        integers and the bias (if any) shares their scale: scale = input scale x weight scale,
        bit width grown by the sum of ``fan_in`` products."""
        if not (isinstance(quant_input, IntQuantTensor) and isinstance(quant_weight, IntQuantTensor)):
            return None
        if quant_input.scale.numel() != 1 or bool(quant_input.zero_point.any()) or bool(quant_weight.zero_point.any()):
            return None
        has_bias = self.bias is not None
        if has_bias and not (isinstance(quant_bias, IntQuantTensor) and self.bias_quant.requires_input_scale):
            return None
        weight_scale = self.output_channel_scale(quant_weight.scale)
        if weight_scale is None:  # a scale that varies along the sum: no common accumulator grid
            return None
        scale = quant_input.scale.reshape(()) * _channel_view(weight_scale, output, self.output_feature_dim)
        # b-bit by c-bit products need b + c bits (signed: the corner -2^(b-1) * -2^(c-1)).
        products = quant_input.bit_width + quant_weight.bit_width
        bit_width = products + math.ceil(math.log2(max(self.fan_in, 1)))
        if has_bias:
            bit_width = torch.maximum(bit_width, quant_bias.bit_width) + 1
        return IntQuantTensor(
            output,
            scale,
            torch.zeros_like(quant_input.zero_point),
            bit_width,
            signed=True,
            training=self.training,
        )

    @classmethod
    def from_float(cls, float_layer: nn.Module, **quant_kwargs: Any) -> QuantWBIOL:
        """A quant layer with the float layer's configuration and a copy of its tensors."""
        with deferring_quantizer_builds():  # built once, from the copied tensors
            layer = cls(**cls.float_constructor_kwargs(float_layer), **quant_kwargs)
        copy_float_state(float_layer, layer)
        return layer

    @staticmethod
    def float_constructor_kwargs(float_layer: nn.Module) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover - every concrete layer defines it


def copy_float_state(float_layer: nn.Module, layer: QuantLayer) -> None:
    """Copy a float layer's own parameters and buffers into its quant twin, then rebuild the
    twin's quantizers from them."""
    with torch.no_grad():
        for name, tensor in [*float_layer.named_parameters(recurse=False), *float_layer.named_buffers(recurse=False)]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                raise QuantInputError(
                    f"{type(layer).__name__}.from_float: {type(float_layer).__name__}.{name} holds {bad} values"
                )
            getattr(layer, name).copy_(tensor)
    layer.init_quantizers()


class QuantActLayer(QuantLayer):
    """Activation layers: ``act_quant(act_impl(input_quant(x)))``.

    Un-prefixed keyword arguments go to ``act_quant``, ``input_``-prefixed ones to ``input_quant``.
    """

    def _init_quant(
        self,
        act_impl: nn.Module | None,
        act_quant: QuantSpec,
        input_quant: QuantSpec,
        return_quant_tensor: bool,
        kwargs: dict[str, Any],
    ) -> None:
        self.return_quant_tensor = return_quant_tensor
        self.act_impl = act_impl
        self._attach_quantizers({"": ("act_quant", act_quant), "input_": ("input_quant", input_quant)}, kwargs)

    def forward(self, x: Tensor | QuantTensor) -> Tensor | QuantTensor:
        if self.input_quant is not None:
            x = self.input_quant(x) if self.return_quant_tensor else self.input_quant.fake_quant(x)
        if self.act_impl is not None:
            x = self.act_impl(x) if self._act_keeps_grid() else self.act_impl(plain_value(x))
        if self.act_quant is None:
            return x if self.return_quant_tensor else plain_value(x)
        if self.return_quant_tensor:
            return self.act_quant(x)
        return self.act_quant.fake_quant(x)

    def _act_keeps_grid(self) -> bool:
        """Whether ``act_impl`` maps quantized values to quantized values (ReLU does)."""
        return isinstance(self.act_impl, nn.ReLU)
