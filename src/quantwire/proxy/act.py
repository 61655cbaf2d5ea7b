"""Activation quantization proxy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from quantwire.core.stats import ParameterFromRuntimeStats, RuntimeStats, TensorStats
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.proxy.base import QuantProxyFromInjector, plain_value
from quantwire.quant_tensor import QuantTensor


class ActQuantProxyFromInjector(QuantProxyFromInjector):
    """Quantizes activations (a layer's input, output, or an activation layer's result).

    A QuantTensor input is quantized from its value. The metadata of the last call is kept
    (detached) so that :meth:`scale` and friends can answer between forward passes.

    ``observe_only = True`` (what calibration without quantization sets) runs the part of the
    quantizer that computes its scale and zero point (the core module's ``observe``, or the
    whole quantizer when it has none), so that its statistics see the activation, and returns
    the input unchanged.

    ``input_check`` (a callable, None by default) sees every tensor before it is quantized or
    observed and may raise: calibration checks its data with it.

    ``quant_drop_prob = p`` (declared on the quantizer, or set by QDrop reconstruction) makes
    the proxy, in training mode, keep each element of its input unquantized with probability
    ``p`` (QDrop, Wei et al., 2022).
    """

    def __init__(self, quant_layer, quant_injector: type, role: str = "act_quant") -> None:
        self._last: QuantTensor | None = None
        self.observe_only = False
        self.input_check: Callable[[Tensor], None] | None = None
        self.quant_drop_prob = 0.0
        super().__init__(quant_layer, quant_injector, role)

    def init_tensor_quant(self) -> None:
        super().init_tensor_quant()
        injector = self.quant_injector
        self.quant_drop_prob = float(injector.quant_drop_prob) if "quant_drop_prob" in injector else 0.0
        if not 0.0 <= self.quant_drop_prob <= 1.0:
            raise QuantConfigError(f"{self.describe()}: quant_drop_prob must be in [0, 1], got {self.quant_drop_prob}")

    def _quantize(self, x: Tensor) -> tuple[Tensor, ...]:
        outputs = self._run(self.tensor_quant, self.with_grad_quant(x))
        if self.quant_drop_prob > 0.0 and self.training:
            keep_float = torch.rand_like(x) < self.quant_drop_prob
            outputs = (torch.where(keep_float, x, outputs[0]), *outputs[1:])
        return outputs

    def _run(self, function: Any, x: Tensor) -> Any:
        """``function(x)``, with an empty ``x`` or one the quantizer can not take reported as a
        :class:`QuantInputError` naming the quantizer."""
        if self.input_check is not None:
            self.input_check(x)
        if x.numel() == 0:
            raise QuantInputError(f"{self.describe()}: can not quantize an empty tensor (shape {tuple(x.shape)})")
        try:
            return function(x)
        except (RuntimeError, IndexError) as error:  # e.g. an activation whose shape the learned scale can not take
            raise QuantInputError(
                f"{self.describe()}: can not quantize a tensor of shape {tuple(x.shape)}: {error}"
            ) from error

    def _observe(self, x: Tensor) -> None:
        """Let the quantizer's statistics see ``x``: only the scale and zero point are computed
        when the core module can (``observe``), the quantized value is not."""
        observe = getattr(self.tensor_quant, "observe", None)
        self._run(self.tensor_quant if observe is None else observe, x)

    def scale_depends_on_input(self) -> bool:
        """Whether this call's scale and zero point depend on the tensor quantized: statistics
        being collected (a :class:`~quantwire.core.stats.ParameterFromRuntimeStats` still
        collecting, a :class:`~quantwire.core.stats.RuntimeStats` in training mode or with nothing
        collected yet) or computed per call (a :class:`~quantwire.core.stats.TensorStats` outside
        them: weight-style and dynamic scales). A custom scale module that reads its input is
        expected to do so through these. Disabled and observe-only proxies compute no scale."""
        if self.tensor_quant is None:
            return False
        inside_sources: set[int] = set()
        for module in self.tensor_quant.modules():
            if isinstance(module, ParameterFromRuntimeStats):
                inside_sources.update((id(module.runtime_stats), id(module.runtime_stats.stats)))
                if module.is_collecting():
                    return True
            elif isinstance(module, RuntimeStats):
                inside_sources.add(id(module.stats))
                if id(module) not in inside_sources:
                    module.sync_counter()
                    if module.training or module.counter == 0:
                        return True
            elif isinstance(module, TensorStats) and id(module) not in inside_sources:
                return True
        return False

    def clear_cache(self) -> None:
        self._last = None

    def fake_quant(self, x: Tensor | QuantTensor) -> Tensor:
        """The fake-quantized activation only (the layers' fast path)."""
        x = plain_value(x)
        if self.disable_quant:
            return x
        if self.observe_only:
            self._observe(x)
            return x
        return self._quantize(x)[0]

    def forward(self, x: Tensor | QuantTensor) -> QuantTensor | Tensor:
        """The quantized activation as a QuantTensor (the input itself when disabled)."""
        if self.disable_quant:
            return x
        if self.observe_only:
            self._observe(plain_value(x))
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
