"""Weight quantization proxy, with the eval-time cache of the quantized weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantwire.errors import QuantConfigError
from quantwire.proxy.base import QuantProxyFromInjector, is_frozen_context
from quantwire.quant_tensor import QuantTensor


class WeightQuantProxyFromInjector(QuantProxyFromInjector):
    """Quantizes a layer's weight (``weight_name``, ``"weight"`` by default).

    In eval mode without autograd the quantized weight is computed once and reused until the
    weight, the quantizer's tensors (replaced or changed in place), the inference-mode flag or
    the training mode change.
    """

    def __init__(
        self, quant_layer: nn.Module, quant_injector: type, role: str = "weight_quant", weight_name: str = "weight"
    ) -> None:
        self.weight_name = weight_name
        self.cache_inference_quant_weight = True
        self._cache_key: tuple | None = None
        self._cache: tuple[Tensor, ...] | None = None
        self._state_tensors: tuple[Tensor, ...] | None = None
        super().__init__(quant_layer, quant_injector, role)

    def clear_cache(self) -> None:
        self._cache_key = None
        self._cache = None
        self._state_tensors: tuple[Tensor, ...] | None = None

    def train(self, mode: bool = True) -> WeightQuantProxyFromInjector:
        # Training may change quantizer state no version counter shows (step counters).
        self.clear_cache()
        return super().train(mode)

    def tracked_weight(self) -> Tensor:
        """The weight of the first tracked layer."""
        layer = self.tracked_module_list[0]
        weight = getattr(layer, self.weight_name, None)
        if not isinstance(weight, Tensor):
            raise QuantConfigError(f"{self.describe()}: the layer has no tensor named {self.weight_name!r}")
        return weight

    def _quantize(self, weight: Tensor) -> tuple[Tensor, ...]:
        if not (self.cache_inference_quant_weight and is_frozen_context(self)):
            return self.tensor_quant(weight)
        if self._state_tensors is None:
            self._state_tensors = (*self.tensor_quant.parameters(), *self.tensor_quant.buffers())
        quantizer_state = tuple((t.data_ptr(), t._version) for t in self._state_tensors)
        key = (weight.data_ptr(), weight._version, quantizer_state, torch.is_inference_mode_enabled())
        if self._cache is None or key != self._cache_key:
            self._cache = self.tensor_quant(weight)
            self._cache_key = key
            self._state_tensors = None  # re-listed on the next call: `.to()` replaces buffers
        return self._cache

    def fake_quant(self, weight: Tensor) -> Tensor:
        """The fake-quantized weight only (the layers' fast path)."""
        if self.disable_quant:
            return weight
        return self._quantize(weight)[0]

    def forward(self, weight: Tensor) -> QuantTensor | Tensor:
        """The quantized weight as a QuantTensor (the weight itself when disabled)."""
        if self.disable_quant:
            return weight
        return self.to_quant_tensor(self._quantize(weight))

    def quant_output(self) -> QuantTensor:
        quant = self.forward(self.tracked_weight())
        if not isinstance(quant, QuantTensor):
            raise QuantConfigError(f"{self.describe()}: quantization is disabled")
        return quant

    def scale(self) -> Tensor:
        """The scale of the tracked layer's quantized weight."""
        return self.quant_output().scale

    def zero_point(self) -> Tensor:
        return self.quant_output().zero_point

    def bit_width(self) -> Tensor:
        return self.quant_output().bit_width
