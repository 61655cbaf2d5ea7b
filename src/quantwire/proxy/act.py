"""Activation quantization proxy."""

from __future__ import annotations

import torch
from torch import Tensor

from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.proxy.base import QuantProxyFromInjector, plain_value
from quantwire.quant_tensor import QuantTensor


class ActQuantProxyFromInjector(QuantProxyFromInjector):
    """Quantizes activations (a layer's input, output, or an activation layer's result).

    A QuantTensor input is quantized from its value. The metadata of the last call is kept
    (detached) so that :meth:`scale` and friends can answer between forward passes.

    ``observe_only = True`` (what calibration without quantization sets) still runs the
    quantizer, so that its statistics see the activation, but returns the input unchanged.

    ``quant_drop_prob = p`` (declared on the quantizer, or set by QDrop reconstruction) makes
    the proxy, in training mode, keep each element of its input unquantized with probability
    ``p`` (QDrop, Wei et al., 2022).
    """

    def __init__(self, quant_layer, quant_injector: type, role: str = "act_quant") -> None:
        self._last: QuantTensor | None = None
        self.observe_only = False
        self.quant_drop_prob = 0.0
        super().__init__(quant_layer, quant_injector, role)

    def init_tensor_quant(self) -> None:
        super().init_tensor_quant()
        injector = self.quant_injector
        self.quant_drop_prob = float(injector.quant_drop_prob) if "quant_drop_prob" in injector else 0.0
        if not 0.0 <= self.quant_drop_prob <= 1.0:
            raise QuantConfigError(f"{self.describe()}: quant_drop_prob must be in [0, 1], got {self.quant_drop_prob}")

    def _quantize(self, x: Tensor) -> tuple[Tensor, ...]:
        try:
            outputs = self.tensor_quant(self.with_grad_quant(x))
        except RuntimeError as error:  # e.g. an activation whose shape the learned scale can not take
            raise QuantInputError(
                f"{self.describe()}: can not quantize a tensor of shape {tuple(x.shape)}: {error}"
            ) from error
        if self.quant_drop_prob > 0.0 and self.training:
            keep_float = torch.rand_like(x) < self.quant_drop_prob
            outputs = (torch.where(keep_float, x, outputs[0]), *outputs[1:])
        return outputs

    def clear_cache(self) -> None:
        self._last = None

    def fake_quant(self, x: Tensor | QuantTensor) -> Tensor:
        """The fake-quantized activation only (the layers' fast path)."""
        x = plain_value(x)
        if self.disable_quant:
            return x
        y = self._quantize(x)[0]
        return x if self.observe_only else y

    def forward(self, x: Tensor | QuantTensor) -> QuantTensor | Tensor:
        """The quantized activation as a QuantTensor (the input itself when disabled)."""
        if self.disable_quant:
            return x
        if self.observe_only:
            self._quantize(plain_value(x))
            return x
        quant = self.to_quant_tensor(self._quantize(plain_value(x)))
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
