"""The part every proxy shares: building, tracking, rebuilding and describing its quantizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from quantwire import config
from quantwire.errors import QuantConfigError, QuantwireError
from quantwire.function.grad import quantize_gradient
from quantwire.inject import DependencyError, ExtendedInjector
from quantwire.quant_tensor import FloatQuantTensor, IntQuantTensor, QuantTensor


def _forgive_missing_quantizer_keys(proxy: QuantProxyFromInjector, incompatible_keys: Any) -> None:
    """Post-load hook: with ``config.IGNORE_MISSING_KEYS``, a float checkpoint that lacks this
    proxy's quantizer state is accepted (the quantizer keeps what it was rebuilt with)."""
    if config.IGNORE_MISSING_KEYS:
        prefix = proxy._load_prefix + "tensor_quant."
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if not key.startswith(prefix)]


# Whether loading a state dict reshapes quantizer tensors to the saved shapes (set by
# :func:`adapting_quantizer_shapes`; a one-element list so that the flag is shared by reference).
_ADAPT_SHAPES = [False]


@contextlib.contextmanager
def adapting_quantizer_shapes() -> Iterator[None]:
    """Within this context, ``load_state_dict`` gives each rebuilt quantizer's tensors the
    shapes the state dict holds (Torch2Chip's ``reshape_quantizer``): for checkpoints whose
    quantizer shapes depend on data the quantizer saw. Used by
    :func:`quantwire.convert.load_quantized`; weights must still match exactly."""
    previous = _ADAPT_SHAPES[0]
    _ADAPT_SHAPES[0] = True
    try:
        yield
    finally:
        _ADAPT_SHAPES[0] = previous


# Whether new proxies leave their quantizer unbuilt (set by :func:`deferring_quantizer_builds`).
_DEFER_BUILDS = [False]


@contextlib.contextmanager
def deferring_quantizer_builds() -> Iterator[None]:
    """Within this context, proxies created do not build their quantizer (``tensor_quant`` is
    None) until their layer calls :meth:`~quantwire.nn.base.QuantLayer.init_quantizers`: for a
    layer built only to receive another layer's tensors (``from_float``), whose quantizers would
    otherwise be built twice, once from the placeholder weights (an MSE or learned-scale
    initialisation costs a search over the whole weight)."""
    previous = _DEFER_BUILDS[0]
    _DEFER_BUILDS[0] = True
    try:
        yield
    finally:
        _DEFER_BUILDS[0] = previous


class QuantProxyFromInjector(nn.Module):
    """Owns the ``tensor_quant`` built from ``quant_injector`` for the layers it tracks.

    ``module`` is injected as the single tracked layer, or a tuple of them when the proxy is
    shared (``weight_quant=other_layer.weight_quant``). The quantizer is rebuilt when a layer
    joins, when a ``state_dict`` is loaded (after the layer's own tensors, before the
    quantizer's: a loaded learned scale wins over the rebuilt one) and by
    :meth:`init_tensor_quant`. ``disable_quant = True`` turns the proxy into a pass-through.
    """

    def __init__(self, quant_layer: nn.Module, quant_injector: type, role: str = "quant") -> None:
        super().__init__()
        self.quant_injector = quant_injector
        self.role = role
        self.tracked_module_list: list[nn.Module] = []
        self.disable_quant = False
        self._signed: bool | None = None
        self._load_prefix = ""
        self.register_load_state_dict_post_hook(_forgive_missing_quantizer_keys)
        if _DEFER_BUILDS[0]:
            self.tensor_quant = None
            self.grad_tensor_quant = None
            self.tracked_module_list.append(quant_layer)
        else:
            self.add_tracked_module(quant_layer)

    # -- building ---------------------------------------------------------------------------

    def add_tracked_module(self, module: nn.Module) -> None:
        """Start quantizing for ``module`` too, and rebuild the quantizer for all tracked layers."""
        if module is None:
            raise QuantConfigError(f"{self.describe()}: can not track None as a layer")
        if not any(tracked is module for tracked in self.tracked_module_list):
            self.tracked_module_list.append(module)
        self.init_tensor_quant()

    def injected_module(self) -> nn.Module | tuple[nn.Module, ...]:
        """What the quantizer sees as ``module``: the tracked layer, or a tuple when shared."""
        if len(self.tracked_module_list) == 1:
            return self.tracked_module_list[0]
        return tuple(self.tracked_module_list)

    def init_tensor_quant(self) -> None:
        """Build ``tensor_quant`` (again) from the declaration and the tracked layers."""
        injector = self.quant_injector.let(module=self.injected_module())
        try:
            self.tensor_quant = injector.tensor_quant
            signed = injector.signed if "signed" in injector else getattr(self.tensor_quant, "signed", None)
        except (DependencyError, QuantwireError) as error:
            raise type(error)(f"{self.describe()}: {error}") from error
        except (TypeError, ValueError, RuntimeError) as error:
            raise QuantConfigError(f"{self.describe()}: {error}") from error
        self._signed = None if signed is None else bool(signed)
        self.grad_tensor_quant = self._build_grad_quant(injector)
        # A new module starts in training mode: a rebuild in eval mode (load_state_dict after
        # model.eval()) must not leave the quantizer collecting statistics.
        self.tensor_quant.train(self.training)
        reference = self._reference_tensor()
        if reference is not None:
            # Follow a layer that was moved (.double(), .cuda()) before this rebuild.
            self.tensor_quant.to(device=reference.device, dtype=reference.dtype)
        self.clear_cache()

    def _build_grad_quant(self, injector: type) -> nn.Module | None:
        """The core module that quantizes gradients, when the quantizer declares ``grad_quant``
        (another quantizer: the format gradients flowing back through this one take)."""
        if "grad_quant" not in injector:
            return None
        grad_quant = injector.grad_quant
        if grad_quant is None:
            return None
        if not (isinstance(grad_quant, type) and issubclass(grad_quant, ExtendedInjector)):
            raise QuantConfigError(
                f"{self.describe()}: grad_quant must be a quantizer class (an ExtendedInjector), got {grad_quant!r}"
            )
        try:
            return grad_quant.let(module=self.injected_module()).tensor_quant
        except (DependencyError, QuantwireError, TypeError, ValueError, RuntimeError) as error:
            raise QuantConfigError(f"{self.describe()}: grad_quant={grad_quant.__name__}: {error}") from error

    def _quantize_gradient(self, grad: Tensor) -> Tensor:
        return self.grad_tensor_quant(grad)[0]

    def with_grad_quant(self, x: Tensor) -> Tensor:
        """``x`` (the tensor about to be quantized), whose gradient is quantized in the backward
        pass when the quantizer declares ``grad_quant``: the gradient that leaves this quantizer
        towards the layers before it lies on the gradient format's grid. Unchanged otherwise."""
        if self.grad_tensor_quant is None:
            return x
        return quantize_gradient(x, self._quantize_gradient)

    def _reference_tensor(self) -> Tensor | None:
        """The first floating-point parameter of the tracked layers: where quantizers live."""
        for layer in self.tracked_module_list:
            for tensor in layer.parameters(recurse=False):
                if tensor.is_floating_point():
                    return tensor
        return None

    def clear_cache(self) -> None:
        """Forget anything computed from the previous quantizer or weights (subclasses cache)."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._load_prefix = prefix
        self.init_tensor_quant()
        if _ADAPT_SHAPES[0]:
            self._adapt_tensor_quant_shapes(state_dict, prefix + "tensor_quant.")

    def _adapt_tensor_quant_shapes(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Give the rebuilt quantizer's tensors the shapes the state dict has (a learned scale
        whose shape depends on data, e.g. one per token position), so that they load."""
        if self.tensor_quant is None:
            return
        tensors = dict(self.tensor_quant.named_parameters()) | dict(self.tensor_quant.named_buffers())
        for name, tensor in tensors.items():
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.shape != tensor.shape:
                with torch.no_grad():
                    tensor.data = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)

    # -- describing ---------------------------------------------------------------------------

    def describe(self) -> str:
        """``QuantConv2d.weight_quant=Int8WeightPerTensorFloat``: for error messages."""
        layers = "+".join(type(layer).__name__ for layer in self.tracked_module_list) or "unattached"
        return f"{layers}.{self.role}={self.quant_injector.__name__}"

    @property
    def is_quant_enabled(self) -> bool:
        return not self.disable_quant

    @property
    def signed(self) -> bool | None:
        """Whether the quantized values are signed (``None`` if the quantizer does not say)."""
        return self._signed

    def extra_repr(self) -> str:
        return f"quant_injector={self.quant_injector.__name__}, quant_enabled={self.is_quant_enabled}"

    # -- results ------------------------------------------------------------------------------

    def to_quant_tensor(self, outputs: tuple[Tensor, ...]) -> QuantTensor:
        """The core module's output tuple as an Int- or FloatQuantTensor."""
        if self._signed is None:
            raise QuantConfigError(
                f"{self.describe()}: the quantizer does not say whether its values are signed; "
                "declare `signed = True` or `signed = False` on it (or pass it as a keyword argument)"
            )
        if len(outputs) == 4:
            value, scale, zero_point, bit_width = outputs
            return IntQuantTensor(value, scale, zero_point, bit_width, self._signed, self.training)
        value, scale, zero_point, exponent_bit_width, mantissa_bit_width, exponent_bias = outputs
        tensor_quant = self.tensor_quant
        return FloatQuantTensor(
            value,
            scale,
            zero_point,
            exponent_bit_width,
            mantissa_bit_width,
            exponent_bias,
            saturating=tensor_quant.saturating,
            has_inf=tensor_quant.has_inf,
            has_nan=tensor_quant.has_nan,
            signed=self._signed,
            training=self.training,
        )


def plain_value(x: Tensor | QuantTensor) -> Tensor:
    """The float tensor behind ``x``."""
    return x.value if isinstance(x, QuantTensor) else x


def is_frozen_context(module: nn.Module) -> bool:
    """Eval mode without autograd and outside ``torch.compile``: results may be cached."""
    return not module.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
