"""Bias quantization proxy: a scale of its own, or the input scale times the weight scale."""

from __future__ import annotations

from torch import Tensor, nn

from quantwire.errors import QuantConfigError
from quantwire.proxy.base import QuantProxyFromInjector
from quantwire.quant_tensor import QuantTensor


class BiasQuantProxyFromInjector(QuantProxyFromInjector):
    """Quantizes a layer's bias.

    A quantizer declaring ``requires_input_scale = True`` (``Int8Bias``, ``Int32Bias``) is built
    on a prescaled core module and quantizes with ``input_scale * weight_scale``, so that the
    bias adds exactly onto the integer accumulator of the matrix product; the layer must then
    see a quantized input (an ``input_quant`` or a QuantTensor input).
    """

    def __init__(self, quant_layer: nn.Module, quant_injector: type, role: str = "bias_quant") -> None:
        self.requires_input_scale = False
        super().__init__(quant_layer, quant_injector, role)

    def init_tensor_quant(self) -> None:
        super().init_tensor_quant()
        injector = self.quant_injector
        self.requires_input_scale = bool(injector.requires_input_scale) if "requires_input_scale" in injector else False

    def _outputs(self, bias: Tensor, input_scale: Tensor | None, weight_scale: Tensor | None) -> tuple[Tensor, ...]:
        if not self.requires_input_scale:
            return self.tensor_quant(bias)
        if input_scale is None or weight_scale is None:
            raise QuantConfigError(
                f"{self.describe()}: this bias quantizer uses input scale x weight scale, but the "
                "layer's input is not quantized; set input_quant on the layer or feed it a QuantTensor"
            )
        if input_scale.numel() != 1:
            raise QuantConfigError(
                f"{self.describe()}: the input scale has shape {tuple(input_scale.shape)}; a bias can "
                "only follow a per-tensor input scale"
            )
        scale = (input_scale.reshape(()) * weight_scale).reshape(-1)
        if scale.numel() == 1:
            scale = scale.reshape(())
        elif scale.numel() != bias.numel():
            raise QuantConfigError(
                f"{self.describe()}: the weight scale has shape {tuple(weight_scale.shape)}; a bias can only "
                "follow a per-tensor or per-output-channel weight scale"
            )
        return self.tensor_quant(bias, scale)

    def fake_quant(self, bias: Tensor, input_scale: Tensor | None = None, weight_scale: Tensor | None = None) -> Tensor:
        if self.disable_quant:
            return bias
        return self._outputs(bias, input_scale, weight_scale)[0]

    def forward(
        self, bias: Tensor, input_scale: Tensor | None = None, weight_scale: Tensor | None = None
    ) -> QuantTensor | Tensor:
        if self.disable_quant:
            return bias
        return self.to_quant_tensor(self._outputs(bias, input_scale, weight_scale))
