"""Activation quantization proxy."""

from __future__ import annotations

from torch import Tensor

from quantwire.errors import QuantConfigError
from quantwire.proxy.base import QuantProxyFromInjector, plain_value
from quantwire.quant_tensor import QuantTensor


class ActQuantProxyFromInjector(QuantProxyFromInjector):
    """Quantizes activations (a layer's input, output, or an activation layer's result).

    A QuantTensor input is quantized from its value. The metadata of the last call is kept
    (detached) so that :meth:`scale` and friends can answer between forward passes.
    """

    def __init__(self, quant_layer, quant_injector: type, role: str = "act_quant") -> None:
        self._last: QuantTensor | None = None
        super().__init__(quant_layer, quant_injector, role)

    def clear_cache(self) -> None:
        self._last = None

    def fake_quant(self, x: Tensor | QuantTensor) -> Tensor:
        """The fake-quantized activation only (the layers' fast path)."""
        x = plain_value(x)
        if self.disable_quant:
            return x
        return self.tensor_quant(x)[0]

    def forward(self, x: Tensor | QuantTensor) -> QuantTensor | Tensor:
        """The quantized activation as a QuantTensor (the input itself when disabled)."""
        if self.disable_quant:
            return x
        quant = self.to_quant_tensor(self.tensor_quant(plain_value(x)))
        self._last = quant.detach()
        return quant

    def _last_output(self) -> QuantTensor:
        if self._last is None:
            raise QuantConfigError(
                f"{self.describe()}: activation scales are known after a forward pass that returns "
                "a QuantTensor (return_quant_tensor=True); run one first"
            )
        return self._last

    def scale(self) -> Tensor:
        return self._last_output().scale

    def zero_point(self) -> Tensor:
        return self._last_output().zero_point

    def bit_width(self) -> Tensor:
        return self._last_output().bit_width
