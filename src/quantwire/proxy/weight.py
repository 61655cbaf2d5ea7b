"""Weight quantization proxy, with the eval-time cache of the quantized weight and the
weight's pruning mask."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from quantwire import config
from quantwire.errors import QuantConfigError, QuantwireError
from quantwire.inject import DependencyError
from quantwire.proxy.base import QuantProxyFromInjector, is_frozen_context
from quantwire.quant_tensor import QuantTensor


def _forgive_missing_mask_keys(proxy: WeightQuantProxyFromInjector, incompatible_keys: Any) -> None:
    """Post-load hook: with ``config.IGNORE_MISSING_KEYS``, a checkpoint without this proxy's
    pruning mask is accepted (the mask stays the one just computed from the loaded weight)."""
    if config.IGNORE_MISSING_KEYS:
        prefix = proxy._load_prefix + "pruning."
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if not key.startswith(prefix)]


class WeightQuantProxyFromInjector(QuantProxyFromInjector):
    """Quantizes a layer's weight (``weight_name``, ``"weight"`` by default).

    In eval mode without autograd the quantized weight is computed once and reused until the
    weight, the quantizer's tensors (replaced or changed in place), the pruning mask, the
    inference-mode flag or the training mode change.

    Pruning: a quantizer that declares ``pruning_impl`` (e.g. through the
    :class:`~quantwire.quant.pruning.MagnitudePruning` or
    :class:`~quantwire.quant.pruning.NMPruning` mixins) gives the proxy a ``pruning`` module
    (None otherwise), built from the same declaration as ``tensor_quant`` and rebuilt with it;
    its mask is computed from the tracked layer's weight whenever the proxy (re)builds, and a
    mask saved in a ``state_dict`` is loaded after that rebuild, so the saved mask wins. The
    mask is applied to the weight *before* quantization: the quantizer's statistics see the
    pruned weight and a pruned weight is exactly zero after quantization (for any quantizer
    on which zero is a grid point, i.e. every integer and minifloat one). Pruning is a change
    of the model's structure, not quantization: with ``disable_quant = True`` the weight is
    still pruned. A pruning mask belongs to one weight, so a pruning proxy can not be shared.
    """

    def __init__(
        self, quant_layer: nn.Module, quant_injector: type, role: str = "weight_quant", weight_name: str = "weight"
    ) -> None:
        self.weight_name = weight_name
        self.cache_inference_quant_weight = True
        self._cache_key: tuple | None = None
        self._cache: tuple[Tensor, ...] | None = None
        self._state_tensors: tuple[Tensor, ...] | None = None
        self.pruning: nn.Module | None = None
        super().__init__(quant_layer, quant_injector, role)
        self.register_load_state_dict_post_hook(_forgive_missing_mask_keys)

    def init_tensor_quant(self) -> None:
        """Build ``tensor_quant`` and, if the quantizer declares ``pruning_impl``, ``pruning``
        (with its mask computed from the tracked weight) again."""
        super().init_tensor_quant()
        injector = self.quant_injector.let(module=self.injected_module())
        if "pruning_impl" not in injector:
            self.pruning = None
            return
        if len(self.tracked_module_list) > 1:
            raise QuantConfigError(
                f"{self.describe()}: the weight quantizer prunes, and a pruning mask belongs to one weight; "
                f"it can not be shared by {len(self.tracked_module_list)} layers"
            )
        weight = self.tracked_weight()
        try:
            pruning = injector.pruning_impl
            pruning.init_mask(weight)
        except (DependencyError, QuantwireError) as error:
            raise type(error)(f"{self.describe()}: {error}") from error
        except (TypeError, ValueError, RuntimeError) as error:
            raise QuantConfigError(f"{self.describe()}: {error}") from error
        pruning.train(self.training)
        self.pruning = pruning.to(device=weight.device)
        self.clear_cache()

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

    def pruned(self, weight: Tensor) -> Tensor:
        """``weight`` with the pruning mask applied (``weight`` itself when nothing prunes)."""
        return weight if self.pruning is None else self.pruning(weight)

    def _quantize(self, weight: Tensor) -> tuple[Tensor, ...]:
        try:
            return self._quantize_unchecked(weight)
        except RuntimeError as error:  # e.g. a loaded per-channel scale that does not fit the weight
            raise QuantConfigError(
                f"{self.describe()}: can not quantize the weight of shape {tuple(weight.shape)}: {error}"
            ) from error

    def _quantize_unchecked(self, weight: Tensor) -> tuple[Tensor, ...]:
        if not (self.cache_inference_quant_weight and is_frozen_context(self)):
            return self.tensor_quant(self.with_grad_quant(self.pruned(weight)))
        if self._state_tensors is None:
            self._state_tensors = (*self.tensor_quant.parameters(), *self.tensor_quant.buffers())
        quantizer_state = tuple((t.data_ptr(), t._version) for t in self._state_tensors)
        mask = None
        if self.pruning is not None:
            # Read on every call: `init_mask` changes the mask in place or replaces it.
            mask = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in self.pruning.buffers())
        key = (weight.data_ptr(), weight._version, quantizer_state, mask, torch.is_inference_mode_enabled())
        if self._cache is None or key != self._cache_key:
            self._cache = self.tensor_quant(self.pruned(weight))
            self._cache_key = key
            self._state_tensors = None  # re-listed on the next call: `.to()` replaces buffers
        return self._cache

    def fake_quant(self, weight: Tensor) -> Tensor:
        """The fake-quantized weight only (the layers' fast path); pruned even when disabled."""
        if self.disable_quant:
            return self.pruned(weight)
        return self._quantize(weight)[0]

    def forward(self, weight: Tensor) -> QuantTensor | Tensor:
        """The quantized weight as a QuantTensor (the pruned weight itself when disabled)."""
        if self.disable_quant:
            return self.pruned(weight)
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
