"""Convolutions with a BatchNorm folded into their quantized weight, for quantization-aware training.

An integer backend runs a convolution followed by a BatchNorm as one convolution, with the
weight ``w * gamma / sqrt(running_var + eps)`` (per output channel) and the bias
``beta + (b - running_mean) * gamma / sqrt(running_var + eps)``; it quantizes *that* weight.
:class:`QuantConvBn2d` trains the model the backend will run, the way PyTorch's fused QAT
modules (``torch.ao.nn.intrinsic.qat.ConvBn2d``) do:

- the layer keeps the convolution's float ``weight`` (and ``bias``, if any) and the BatchNorm
  as its ``bn`` child, so that the BatchNorm's parameters keep training;
- the weight quantizer always sees the *folded* weight (:attr:`folded_weight`);
- training: the convolution runs with the quantized folded weight, the BatchNorm scale factor
  is divided out again and the BatchNorm normalises with the batch's statistics (and updates
  its running statistics), so training keeps BatchNorm's batch-statistics dynamics;
- once the statistics are frozen (:meth:`freeze_bn_stats`, or after ``freeze_bn_step``
  training forwards) and in eval mode: exactly ``conv(x, q(folded_weight)) + folded_bias``,
  with the running statistics left alone.

:meth:`~_QuantConvBnNd.fold_into_conv` turns the layer into the plain quant convolution the
backend runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from quantwire.errors import QuantConfigError
from quantwire.nn.base import QuantWBIOL, copy_float_state
from quantwire.nn.conv import QuantConv1d, QuantConv2d, _QuantConv
from quantwire.nn.quantizer_kwargs import QuantSpec, build_proxy, configured_injector, route_quant_kwargs
from quantwire.proxy.base import QuantProxyFromInjector, is_frozen_context, plain_value
from quantwire.quant import Int8WeightPerTensorFloat
from quantwire.quant_tensor import IntQuantTensor, QuantTensor

__all__ = ["QuantConvBn1d", "QuantConvBn2d"]

FOLDED_WEIGHT = "folded_weight"
"""The attribute the weight proxy of a folded layer quantizes (its ``weight_name``)."""

_QUANT_ROLES = ("weight_quant", "bias_quant", "input_quant", "output_quant")


class _Folded(NamedTuple):
    """The BatchNorm folded into the convolution, from its running statistics."""

    scale: Tensor
    """``gamma / sqrt(running_var + eps)``, one per output channel."""
    weight: Tensor
    """The convolution weight times ``scale`` along its output channels."""
    bias: Tensor
    """``beta + (conv bias - running_mean) * scale``."""


class _QuantConvBnNd(_QuantConv):
    """Shared by the folded conv-BN layers; a subclass sets the torch classes it pairs."""

    _torch_class: type[nn.Module]
    _bn_class: type[nn.modules.batchnorm._BatchNorm]
    _conv_class: type[QuantWBIOL]
    """The plain quant convolution :meth:`fold_into_conv` returns."""

    def __init__(
        self,
        *args: Any,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        freeze_bn_step: int | None = None,
        weight_quant: QuantSpec = Int8WeightPerTensorFloat,
        bias_quant: QuantSpec = None,
        input_quant: QuantSpec = None,
        output_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        torch_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in self._torch_args}
        self._torch_class.__init__(self, *args, bias=bias, **torch_kwargs)
        self._init_bn(eps, momentum, affine, freeze_bn_step)
        self._init_quant(weight_quant, bias_quant, input_quant, output_quant, return_quant_tensor, kwargs)

    def _init_bn(self, eps: float, momentum: float | None, affine: bool, freeze_bn_step: int | None) -> None:
        """The ``bn`` child and the state of its statistics (registered before the quantizers,
        so that ``load_state_dict`` restores the BatchNorm before the weight proxy rebuilds)."""
        if freeze_bn_step is not None and (isinstance(freeze_bn_step, bool) or freeze_bn_step < 0):
            raise QuantConfigError(
                f"{type(self).__name__}: freeze_bn_step must be a non-negative int or None, got {freeze_bn_step!r}"
            )
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.bn = self._bn_class(self.out_channels, eps=eps, momentum=momentum, affine=affine, **factory)
        self.freeze_bn_step = freeze_bn_step
        # Persistent copies of the step count and the frozen flag; the Python mirrors are what
        # forward reads (reading a CUDA buffer on every forward would synchronise the device).
        self.register_buffer("bn_steps", torch.zeros((), dtype=torch.long, device=self.weight.device))
        self.register_buffer("bn_frozen", torch.zeros((), dtype=torch.bool, device=self.weight.device))
        self._steps = 0
        self._frozen = False
        self._fold_cache_key: tuple | None = None
        self._fold_cache: _Folded | None = None

    def _attach_quantizers(self, quantizers: dict[str, tuple[str, QuantSpec]], kwargs: dict[str, Any]) -> None:
        """As for any layer, except that the weight proxy quantizes :attr:`folded_weight`."""
        routed = route_quant_kwargs(type(self).__name__, quantizers, kwargs)
        for prefix, (role, quant) in quantizers.items():
            if role == "weight_quant":
                proxy = self._folded_weight_proxy(quant, routed[prefix])
            else:
                proxy = build_proxy(self, role, quant, routed[prefix])
            setattr(self, role, proxy)

    def _folded_weight_proxy(self, quant: QuantSpec, overrides: dict[str, Any]) -> QuantProxyFromInjector | None:
        """A weight proxy of this layer's own, reading :attr:`folded_weight` (never shared: a
        shared proxy reads each layer's ``weight``)."""
        if quant is None:
            return None
        if isinstance(quant, QuantProxyFromInjector):
            raise QuantConfigError(
                f"{type(self).__name__}: weight_quant can not be another layer's proxy ({quant.describe()}): "
                "a folded conv-BN quantizes its own folded weight; pass a quantizer class"
            )
        injector = configured_injector(self, "weight_quant", quant, overrides, shareable=False)
        return injector.proxy_class(self, injector, role="weight_quant", weight_name=FOLDED_WEIGHT)

    # -- building from float layers -------------------------------------------------------------

    @classmethod
    def from_float(cls, conv: nn.Module, bn: nn.Module, **quant_kwargs: Any) -> _QuantConvBnNd:  # type: ignore[override]
        """A folded layer with ``conv``'s configuration and copies of ``conv``'s and ``bn``'s
        tensors (running statistics included); ``quant_kwargs`` as for the constructor
        (quantizers, their keyword arguments, ``freeze_bn_step``)."""
        cls.check_foldable(conv, bn)
        bn_kwargs = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine}
        layer = cls(**cls.float_constructor_kwargs(conv), **bn_kwargs, **quant_kwargs)
        layer.bn.load_state_dict(bn.state_dict())
        copy_float_state(conv, layer)  # after the BatchNorm: the quantizers rebuild from the folded weight
        return layer

    @classmethod
    def check_foldable(cls, conv: nn.Module, bn: nn.Module) -> None:
        """Raise a :class:`QuantConfigError` unless ``bn`` can be folded into ``conv``."""
        name = cls.__name__
        if not isinstance(conv, cls._torch_class) or isinstance(conv, QuantWBIOL):
            raise QuantConfigError(f"{name}: expected a float {cls._torch_class.__name__}, got {type(conv).__name__}")
        if not isinstance(bn, cls._bn_class):
            raise QuantConfigError(f"{name}: expected a {cls._bn_class.__name__}, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise QuantConfigError(
                f"{name}: the BatchNorm has {bn.num_features} features, the convolution {conv.out_channels} outputs"
            )
        if not bn.track_running_stats or bn.running_var is None:
            raise QuantConfigError(f"{name}: a BatchNorm without running statistics can not be folded")

    # -- folding ----------------------------------------------------------------------------------

    def _fold(self) -> _Folded:
        """Fold the BatchNorm's running statistics into the convolution's weight and bias."""
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        scale = std.reciprocal() if bn.weight is None else bn.weight / std
        weight = self.weight * _along(scale, self.weight.dim(), self.output_channel_dim)
        centred = -bn.running_mean if self.bias is None else self.bias - bn.running_mean
        bias = centred * scale if bn.bias is None else bn.bias + centred * scale
        return _Folded(scale, weight, bias)

    def _folded(self) -> _Folded:
        """:meth:`_fold`, computed once while nothing it reads changes in eval mode without
        autograd. The cached tensors stay alive until replaced, and the weight proxy's cache
        is dropped when they are, so that the proxy never mistakes a new folded weight for
        one it quantized before."""
        if not is_frozen_context(self):
            return self._fold()
        bn = self.bn
        sources = (self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        versions = tuple(None if t is None else (t.data_ptr(), t._version, t.device) for t in sources)
        key = (versions, bn.eps, torch.is_inference_mode_enabled())
        if self._fold_cache is None or key != self._fold_cache_key:
            self._fold_cache = self._fold()
            self._fold_cache_key = key
            if self.weight_quant is not None:
                self.weight_quant.clear_cache()
        return self._fold_cache

    @property
    def folded_weight(self) -> Tensor:
        """``weight * gamma / sqrt(running_var + eps)`` per output channel: what is quantized."""
        return self._folded().weight

    @property
    def folded_bias(self) -> Tensor:
        """``beta + (bias - running_mean) * gamma / sqrt(running_var + eps)`` (bias 0 when none)."""
        return self._folded().bias

    def quant_weight_source(self) -> Tensor:
        """The tensor the weight quantizer quantizes (and initialises learned scales from)."""
        return self.folded_weight

    def quant_weight(self) -> QuantTensor | Tensor:
        """The quantized folded weight (the folded weight itself when there is no quantizer)."""
        weight = self.folded_weight
        return weight if self.weight_quant is None else self.weight_quant(weight)

    def fold_into_conv(self) -> QuantWBIOL:
        """The plain quant convolution an integer backend runs: weight and bias folded from the
        running statistics, the same quantizers with their state (learned or calibrated scales,
        pruning masks) copied, in the same training mode. Shared input/output proxies are not
        shared by the result: it gets its own copy of their state."""
        kwargs = {**self.float_constructor_kwargs(self), "bias": True}
        quantizers = {role: _declaration(getattr(self, role)) for role in _QUANT_ROLES}
        conv = self._conv_class(**kwargs, **quantizers, return_quant_tensor=self.return_quant_tensor)
        with torch.no_grad():
            folded = self._fold()
            conv.weight.copy_(folded.weight)
            conv.bias.copy_(folded.bias)
        conv.init_quantizers()
        for role in _QUANT_ROLES:
            proxy = getattr(self, role)
            if proxy is not None:
                getattr(conv, role).load_state_dict(proxy.state_dict())
                getattr(conv, role).disable_quant = proxy.disable_quant
        return conv.train(self.training)

    # -- BatchNorm statistics ---------------------------------------------------------------------

    @property
    def bn_stats_frozen(self) -> bool:
        """Whether the BatchNorm uses (and keeps) its running statistics in training too: after
        :meth:`freeze_bn_stats`, or once ``freeze_bn_step`` training forwards have run."""
        step_reached = self.freeze_bn_step is not None and self._steps >= self.freeze_bn_step
        return self._frozen or step_reached

    def freeze_bn_stats(self, frozen: bool = True) -> _QuantConvBnNd:
        """Stop (``frozen=False``: resume) updating the running statistics and normalising with
        the batch's; ``freeze_bn_step`` still freezes once reached (set it to None to resume)."""
        self._frozen = bool(frozen)
        self.bn_frozen.fill_(self._frozen)
        return self

    def _count_step(self) -> None:
        self._steps += 1
        self.bn_steps.add_(1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._steps = int(self.bn_steps)
        self._frozen = bool(self.bn_frozen)

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: Tensor | QuantTensor) -> Tensor | QuantTensor:
        if self.training and not self.bn_stats_frozen:
            return self._batch_stats_forward(x)
        if not self._needs_metadata():
            return self._fast_forward(x)
        return self._quant_tensor_forward(x)

    def _batch_stats_forward(self, x: Tensor | QuantTensor) -> Tensor | QuantTensor:
        """Training with batch statistics: ``bn(conv(x, q(w_fold)) / scale + b)``, which with
        quantization disabled is ``bn(conv(x, w) + b)``. The bias is not quantized here: the
        batch mean absorbs it; it is folded (and quantized) once the statistics are frozen.
        Channels with ``gamma == 0`` (whose folded weight is 0) divide by 1 instead of 0. The
        output is a QuantTensor only through ``output_quant``: normalised values lie on no grid."""
        folded = self._fold()
        output = self.inner_forward(self._fake_quant_input(x), self._fake_quant_weight(folded.weight), None)
        scale = torch.where(folded.scale == 0, torch.ones_like(folded.scale), folded.scale)
        output = output / _along(scale, output.dim(), self.output_feature_dim)
        if self.bias is not None:
            output = output + _along(self.bias, output.dim(), self.output_feature_dim)
        output = self.bn(output)
        self._count_step()
        if self.output_quant is None:
            return output
        if self.return_quant_tensor:
            return self.output_quant(output)
        return self.output_quant.fake_quant(output)

    def _fast_forward(self, x: Tensor | QuantTensor) -> Tensor:
        """Running statistics without QuantTensors: ``conv(x, q(w_fold)) + q(b_fold)``."""
        folded = self._folded()
        bias = folded.bias if self.bias_quant is None else self.bias_quant.fake_quant(folded.bias)
        output = self.inner_forward(self._fake_quant_input(x), self._fake_quant_weight(folded.weight), bias)
        return output if self.output_quant is None else self.output_quant.fake_quant(output)

    def _quant_tensor_forward(self, x: Tensor | QuantTensor) -> Tensor | QuantTensor:
        """Running statistics, with QuantTensors (a returned QuantTensor, or a bias quantized
        with input scale x weight scale)."""
        quant_input = self.input_quant(x) if self.input_quant is not None else x
        quant_weight = self.quant_weight()
        input_scale = quant_input.scale if isinstance(quant_input, QuantTensor) else None
        weight_scale = None
        if isinstance(quant_weight, QuantTensor):
            channel_scale = self.output_channel_scale(quant_weight.scale)
            weight_scale = quant_weight.scale if channel_scale is None else channel_scale
        folded_bias = self.folded_bias
        quant_bias = None if self.bias_quant is None else self.bias_quant(folded_bias, input_scale, weight_scale)
        bias = folded_bias if quant_bias is None else plain_value(quant_bias)
        output = self.inner_forward(plain_value(quant_input), plain_value(quant_weight), bias)
        if self.output_quant is not None:
            quant_output = self.output_quant(output)
            return self._finish(quant_output if isinstance(quant_output, QuantTensor) else None, output)
        return self._finish(self._accumulator_tensor(output, quant_input, quant_weight, quant_bias), output)

    def _accumulator_tensor(
        self, output: Tensor, quant_input: Any, quant_weight: Any, quant_bias: Any
    ) -> IntQuantTensor | None:
        """The folded bias is always added, so the output lies on the accumulator grid only
        when that bias is quantized onto it (input scale x weight scale)."""
        if not (isinstance(quant_bias, IntQuantTensor) and self.bias_quant.requires_input_scale):
            return None
        if self.bias is not None:
            return super()._accumulator_tensor(output, quant_input, quant_weight, quant_bias)
        # The base class sizes the accumulator for a bias only when the conv has its own.
        accumulator = super()._accumulator_tensor(output, quant_input, quant_weight, None)
        if accumulator is None:
            return None
        return accumulator._replace(bit_width=torch.maximum(accumulator.bit_width, quant_bias.bit_width) + 1)

    def _fake_quant_input(self, x: Tensor | QuantTensor) -> Tensor:
        return self.input_quant.fake_quant(x) if self.input_quant is not None else plain_value(x)

    def _fake_quant_weight(self, weight: Tensor) -> Tensor:
        return weight if self.weight_quant is None else self.weight_quant.fake_quant(weight)

    def extra_repr(self) -> str:
        frozen = f", freeze_bn_step={self.freeze_bn_step}" if self.freeze_bn_step is not None else ""
        return f"{super().extra_repr()}{frozen}, bn_stats_frozen={self.bn_stats_frozen}"


def _along(values: Tensor, dims: int, dim: int) -> Tensor:
    """One value per channel laid along dimension ``dim`` of a ``dims``-dimensional tensor."""
    shape = [1] * dims
    shape[dim] = -1
    return values.reshape(shape)


def _declaration(proxy: QuantProxyFromInjector | None) -> type | None:
    """The quantizer declaration a proxy was built from (None for no proxy)."""
    return None if proxy is None else proxy.quant_injector


class QuantConvBn1d(_QuantConvBnNd, nn.Conv1d):
    """``nn.Conv1d`` followed by ``nn.BatchNorm1d``, folded for quantization-aware training."""

    _torch_class = nn.Conv1d
    _bn_class = nn.BatchNorm1d
    _conv_class = QuantConv1d


class QuantConvBn2d(_QuantConvBnNd, nn.Conv2d):
    """``nn.Conv2d`` followed by ``nn.BatchNorm2d``, folded for quantization-aware training
    (see the module documentation). A ReLU after the BatchNorm stays a separate module."""

    _torch_class = nn.Conv2d
    _bn_class = nn.BatchNorm2d
    _conv_class = QuantConv2d
