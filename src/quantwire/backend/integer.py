"""``to_integer``: a calibrated fake-quantized model in, a model of integer operators out.

Conversion is a registry of handlers keyed by quant-layer type (like model conversion): each
quant layer becomes its integer twin with the same call signature, so the float glue around
layers (a ResNet block's forward, a transformer's reshapes) runs unchanged and no model needs
its own fuser. BatchNorms that only follow a quantized convolution fold into its rescale.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from quantwire.backend.fixed_point import BackendError
from quantwire.backend.layers import (
    FixedPointSpec,
    Grid,
    IntegerAdd,
    IntegerWBIOL,
    activation_grid,
    fixed_rescale,
    integer_wbiol,
)
from quantwire.backend.nonlinear import IntGELU, IntLayerNorm, int_softmax
from quantwire.backend.ops import IntMatMul, MulShift, Quantize
from quantwire.convert.fold_bn import find_conv_bn_pairs, fold_into_convs
from quantwire.core.utils import non_finite_kind
from quantwire.errors import QuantInputError
from quantwire.nn import (
    QuantActLayer,
    QuantAdaptiveAvgPool2d,
    QuantAvgPool2d,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantEltwiseAdd,
    QuantEmbedding,
    QuantLayerNorm,
    QuantLinear,
    QuantMaxPool1d,
    QuantMaxPool2d,
    QuantScaledDotProductAttention,
    QuantUpsample,
)
from quantwire.nn.attention import sdpa_forward
from quantwire.nn.base import QuantLayer

__all__ = ["IntegerAttention", "IntegerConfig", "register_integer_handler", "to_integer"]


@dataclass(frozen=True)
class IntegerConfig:
    """How :func:`to_integer` builds the integer model.

    ``swl``/``sfl``: fixed-point word and fractional bits of every rescale (``sfl=None``: the
    most that fit, per layer); ``overrides`` maps a layer-name glob to a :class:`FixedPointSpec`
    of its own. ``accumulator_bits``: the integer products' accumulator width, and what an
    overflow does (``"raise"``, ``"wrap"``, ``"ignore"``).
    """

    swl: int = 32
    sfl: int | None = None
    accumulator_bits: int = 32
    overflow: str = "raise"
    overrides: dict[str, FixedPointSpec] = field(default_factory=dict)
    integer_softmax: bool = False
    """Attention softmax in integers (I-BERT, :func:`quantwire.backend.nonlinear.int_softmax`)
    on the ``Q·Kᵀ`` accumulator, its probabilities on a ``2**-b`` grid (``b``: the bit width of
    the probability quantizer) instead of the probability quantizer's scale; see
    ``docs/backend.md`` for its accuracy cost."""
    integer_gelu: bool = False
    """GELU layers (``nn.GELU``, transformers' ``GELUActivation``) in integers (I-BERT's i-GELU)
    on their input put onto a ``nonlinear_input_bits`` grid calibrated on ``example_input``."""
    integer_layer_norm: bool = False
    """LayerNorms in integers (exact integer mean, variance and square root) likewise."""
    nonlinear_input_bits: int = 16
    """Bits of the grid the inputs of integer GELU and LayerNorm are put on (signed)."""

    def spec_for(self, name: str) -> FixedPointSpec:
        import fnmatch

        for pattern, spec in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return spec
        return FixedPointSpec(self.swl, self.sfl, self.accumulator_bits, self.overflow)


IntegerHandler = Callable[[nn.Module, str, "_Context"], nn.Module]
_HANDLERS: dict[type, IntegerHandler] = {}


def register_integer_handler(*types: type) -> Callable[[IntegerHandler], IntegerHandler]:
    """Register the decorated ``handler(layer, name, context) -> integer module`` for quant
    layer ``types`` (subclasses included)."""

    def decorator(handler: IntegerHandler) -> IntegerHandler:
        for layer_type in types:
            _HANDLERS[layer_type] = handler
        return handler

    return decorator


@dataclass
class _Context:
    config: IntegerConfig
    batch_norms: dict[str, nn.Module]

    def spec(self, name: str) -> FixedPointSpec:
        return self.config.spec_for(name)


def to_integer(qmodel: nn.Module, config: IntegerConfig | None = None, example_input: Any = None) -> nn.Module:
    """The integer model of ``qmodel`` (calibrated or trained, its scales frozen): a new model
    whose every matrix product is an :class:`~quantwire.backend.ops.IntMatMul` on integer codes
    followed by a fixed-point :class:`~quantwire.backend.ops.MulShift` or
    :class:`~quantwire.backend.ops.MulQuant`. ``qmodel`` is not modified. Raises
    :class:`~quantwire.backend.fixed_point.BackendError` naming the layer for what can not run
    on integers (dynamic scales, minifloat quantizers, a quant layer without a handler).

    ``example_input`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments) calibrates the input grids of integer GELU and LayerNorm; it is needed only
    when the config asks for them."""
    config = config or IntegerConfig()
    _check_finite_inputs(qmodel, example_input)
    model = copy.deepcopy(qmodel).eval()
    fold_into_convs(model)
    context = _Context(config, {})
    for conv_name, bn_name in find_conv_bn_pairs(model, _quant_conv_bn_pair):
        context.batch_norms[conv_name] = model.get_submodule(bn_name)
        model.set_submodule(bn_name, nn.Identity())
    model = _replace(model, "", context) or model
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            raise BackendError(f"{name}: no integer handler for {type(module).__name__}")
    # The glue between integer operators (normalisations, reshapes, float nonlinearities) runs
    # in float64, as the rescaled outputs are; integer buffers stay integers.
    model = model.double().eval()
    if config.integer_gelu or config.integer_layer_norm:
        _integer_nonlinearities(model, config, example_input)
    return model


def _check_finite_inputs(qmodel: nn.Module, example_input: Any) -> None:
    """Refuse NaN or Inf in a quant layer's parameters or in ``example_input``, naming the
    tensor: fixed-point conversion would otherwise fail on ``int(nan)`` far from the cause."""
    for name, module in qmodel.named_modules():
        if not isinstance(module, QuantLayer):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if (bad := non_finite_kind(param.detach())) is not None:
                where = f"{name}.{param_name}" if name else param_name
                raise QuantInputError(f"to_integer: {where} ({type(module).__name__}) holds {bad} values")
    for index, tensor in enumerate(torch.utils._pytree.tree_leaves(example_input)):
        if isinstance(tensor, Tensor) and (bad := non_finite_kind(tensor)) is not None:
            raise QuantInputError(f"to_integer: example_input tensor {index} holds {bad} values")


def _quant_conv_bn_pair(conv: nn.Module, bn: nn.Module) -> bool:
    kinds = {QuantConv1d: nn.BatchNorm1d, QuantConv2d: nn.BatchNorm2d, QuantConv3d: nn.BatchNorm3d}
    expected = next((b for c, b in kinds.items() if isinstance(conv, c)), None)
    return expected is not None and type(bn) is expected and bn.num_features == conv.out_channels


def _find(layer: nn.Module) -> IntegerHandler | None:
    for cls in type(layer).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def _replace(module: nn.Module, name: str, context: _Context) -> nn.Module | None:
    handler = _find(module)
    if handler is not None:
        return handler(module, name, context)
    for child_name, child in list(module.named_children()):
        replacement = _replace(child, f"{name}.{child_name}" if name else child_name, context)
        if replacement is not None:
            setattr(module, child_name, replacement)
    return None


# -- handlers -------------------------------------------------------------------------------------


@register_integer_handler(QuantLinear, QuantConv1d, QuantConv2d, QuantConv3d)
def _weight_layer(layer: nn.Module, name: str, context: _Context) -> IntegerWBIOL:
    return integer_wbiol(layer, name, context.spec(name), context.batch_norms.get(name))


@register_integer_handler(QuantEltwiseAdd)
def _add(layer: QuantEltwiseAdd, name: str, context: _Context) -> nn.Module:
    if layer.input_quant is None:
        raise BackendError(f"{name}: a residual add without a quantizer has no integer grid")
    if layer.output_quant is not None:
        raise BackendError(f"{name}: an output quantizer after a residual add is not supported")
    return IntegerAdd(name, activation_grid(layer.input_quant, f"{name}.input_quant"))


class _GridRound(nn.Module):
    """A real tensor onto a grid and back: a quantizer between floating-point operations."""

    def __init__(self, grid: Grid, name: str) -> None:
        super().__init__()
        self.quantize = grid.quantize(name)
        self.register_buffer("scale", grid.scale.clone())
        self.register_buffer("zero_point", grid.zero_point.clone())

    def forward(self, x: Tensor) -> Tensor:
        return (self.quantize(x) - self.zero_point) * self.scale


class IntegerActivation(nn.Module):
    """An activation layer: its input quantizer, the (float) activation, its output quantizer."""

    def __init__(self, layer: QuantActLayer, name: str) -> None:
        super().__init__()
        self.input_grid = (
            None
            if layer.input_quant is None
            else _GridRound(activation_grid(layer.input_quant, f"{name}.input_quant"), f"{name}.input")
        )
        self.act_impl = layer.act_impl
        self.output_grid = (
            None
            if layer.act_quant is None
            else _GridRound(activation_grid(layer.act_quant, f"{name}.act_quant"), f"{name}.act")
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.input_grid is not None:
            x = self.input_grid(x)
        if self.act_impl is not None:
            x = self.act_impl(x)
        return x if self.output_grid is None else self.output_grid(x)


@register_integer_handler(QuantActLayer)
def _activation(layer: QuantActLayer, name: str, context: _Context) -> nn.Module:
    return IntegerActivation(layer, name)


class IntegerAttention(nn.Module):
    """The integer twin of :class:`~quantwire.nn.QuantScaledDotProductAttention`: ``Q·Kᵀ`` and
    ``A·V`` are :class:`IntMatMul` s on the codes of the Q, Kᵀ, V and attention-probability
    quantizers, rescaled by :class:`MulShift`; the mask, softmax and its quantizers run on the
    rescaled scores (floating point). Same :meth:`attend` and forward as the layer it replaces."""

    def __init__(
        self, layer: QuantScaledDotProductAttention, name: str, spec: FixedPointSpec, integer_softmax: bool = False
    ) -> None:
        super().__init__()
        self.layer_name = getattr(layer, "layer_name", name)
        self.name = name
        roles = {}
        for role in ("q_scaled_quant", "k_transposed_quant", "v_quant", "attn_output_weights_quant"):
            proxy = getattr(layer, role)
            if proxy is None:
                raise BackendError(
                    f"{name}: {role} is None; the integer attention needs Q, Kᵀ, V and the "
                    "attention probabilities quantized"
                )
            roles[role] = activation_grid(proxy, f"{name}.{role}")
        for role, grid in roles.items():
            if grid.scale.numel() != 1:
                raise BackendError(f"{name}: {role} needs a per-tensor scale for the integer attention")
        self.q, self.k, self.v, self.p = (roles[r] for r in roles)
        self.quantize_q = self.q.quantize(f"{name}.q")
        self.quantize_k = self.k.quantize(f"{name}.k")
        self.quantize_v = self.v.quantize(f"{name}.v")
        self.quantize_p = self.p.quantize(f"{name}.probs")
        self.scores = IntMatMul("matmul", None, spec.accumulator_bits, spec.overflow, name=f"{name}.scores")
        self.context = IntMatMul("matmul", None, spec.accumulator_bits, spec.overflow, name=f"{name}.context")
        self.integer_softmax = integer_softmax
        if integer_softmax and (self.p.signed or self.p.zero_point.abs().max() > 0):
            raise BackendError(f"{name}: the integer softmax needs unsigned attention probabilities without zero point")
        if integer_softmax and layer.softmax_input_quant is not None:
            raise BackendError(f"{name}: the integer softmax takes the score accumulator; drop softmax_input_quant")
        probability_scale = torch.full((), 2.0**-self.p.bit_width) if integer_softmax else self.p.scale
        self.register_buffer("scores_scale", (self.q.scale * self.k.scale).reshape(()))
        self.scores_rescale = _scalar_rescale(self.q.scale * self.k.scale, spec, f"{name}.scores")
        self.context_rescale = _scalar_rescale(probability_scale * self.v.scale, spec, f"{name}.context")
        self.softmax_input = (
            None
            if layer.softmax_input_quant is None
            else _GridRound(
                activation_grid(layer.softmax_input_quant, f"{name}.softmax_input_quant"), f"{name}.softmax_input"
            )
        )
        self.output = (
            None
            if layer.sdpa_output_quant is None
            else _GridRound(activation_grid(layer.sdpa_output_quant, f"{name}.sdpa_output_quant"), f"{name}.output")
        )

    def attend(
        self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout_p: float, scale: float | None
    ) -> tuple[Tensor, Tensor]:
        scale_factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        q = self.quantize_q(query * scale_factor) - self.q.zero_point
        k_t = self.quantize_k(key.transpose(-2, -1)) - self.k.zero_point
        if self.integer_softmax:
            probabilities, weights = self._integer_softmax(self.scores(q, k_t), mask)
        else:
            scores = self.scores_rescale(self.scores(q, k_t))
            if mask is not None:
                scores = scores + mask.to(scores.dtype)
            if self.softmax_input is not None:
                scores = self.softmax_input(scores)
            probabilities = self.quantize_p(torch.softmax(scores, dim=-1)) - self.p.zero_point
            weights = probabilities * self.p.scale
        v = self.quantize_v(value) - self.v.zero_point
        output = self.context_rescale(self.context(probabilities, v))
        return (output if self.output is None else self.output(output)), weights

    def _integer_softmax(self, accumulator: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """I-BERT softmax of the score accumulator (the mask added in accumulator steps; a
        blocked position far below every score gives exactly 0): probability codes and values."""
        codes = accumulator.round().to(torch.int64)
        if mask is not None:
            steps = (mask.double() / self.scores_scale).clamp(min=-(2.0**40), max=2.0**40).round().to(torch.int64)
            codes = codes + steps
        probabilities, scale = int_softmax(codes, float(self.scores_scale), dim=-1, output_bits=self.p.bit_width)
        probabilities = probabilities.double()
        return probabilities, probabilities * scale

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> Tensor:
        return sdpa_forward(self, query, key, value, attn_mask, dropout_p, is_causal, scale)


def _scalar_rescale(multiplier: Tensor, spec: FixedPointSpec, name: str) -> MulShift:
    """A MulShift by one multiplier, no bias."""
    return MulShift(*fixed_rescale(multiplier.reshape(1), None, spec, name), -1, name)


@register_integer_handler(QuantScaledDotProductAttention)
def _attention(layer: QuantScaledDotProductAttention, name: str, context: _Context) -> nn.Module:
    return IntegerAttention(layer, name, context.spec(name), context.config.integer_softmax)


# -- layers whose integer form is their float twin on grid values -----------------------------------


def _as_torch(layer: nn.Module, torch_class: type[nn.Module]) -> nn.Module:
    """``layer``'s ``torch.nn`` twin with the same configuration (a pass-through quant layer
    adds nothing once values are real numbers on their grid)."""
    twin = torch_class.__new__(torch_class)
    twin.__dict__.update({k: v for k, v in layer.__dict__.items() if k != "_modules"})
    twin._modules = {}
    return twin


@register_integer_handler(QuantMaxPool1d, QuantMaxPool2d, QuantUpsample)
def _pass_through(layer: nn.Module, name: str, context: _Context) -> nn.Module:
    """Max pooling and nearest upsampling keep values on their grid."""
    torch_class = next(c for c in type(layer).__mro__ if c.__module__.startswith("torch.nn"))
    return _as_torch(layer, torch_class)


class _ThenGrid(nn.Sequential):
    """A float operation whose result a quantizer puts on its grid."""


@register_integer_handler(QuantAvgPool2d, QuantAdaptiveAvgPool2d)
def _average_pool(layer: nn.Module, name: str, context: _Context) -> nn.Module:
    torch_class = nn.AdaptiveAvgPool2d if isinstance(layer, QuantAdaptiveAvgPool2d) else nn.AvgPool2d
    pool = _as_torch(layer, torch_class)
    if layer.output_quant is None:
        return pool
    return _ThenGrid(pool, _GridRound(activation_grid(layer.output_quant, f"{name}.output_quant"), name))


class IntegerEmbedding(nn.Module):
    """An embedding table as integer codes and its scale: rows looked up as codes, returned as
    real numbers (``scale * (code - zero_point)``, per row when the scale is)."""

    def __init__(self, layer: QuantEmbedding, name: str) -> None:
        super().__init__()
        if layer.weight_quant is None:
            raise BackendError(f"{name}: an embedding without a weight quantizer has no integer table")
        if layer.max_norm is not None:
            raise BackendError(f"{name}: max_norm renormalises the float table; not supported on integers")
        with torch.no_grad():
            table = layer.quant_weight()
        self.register_buffer("codes", table.int(float_datatype=True).double() - table.zero_point.double())
        scale = table.scale.detach().double()
        self.register_buffer("scale", scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))
        self.padding_idx = layer.padding_idx

    def forward(self, indices: Tensor) -> Tensor:
        rows = nn.functional.embedding(indices, self.codes)
        if self.scale.dim() == 0:
            return rows * self.scale
        return rows * nn.functional.embedding(indices, self.scale)


@register_integer_handler(QuantEmbedding)
def _embedding(layer: QuantEmbedding, name: str, context: _Context) -> nn.Module:
    return IntegerEmbedding(layer, name)


@register_integer_handler(QuantLayerNorm)
def _layer_norm(layer: QuantLayerNorm, name: str, context: _Context) -> nn.Module:
    """LayerNorm stays a floating-point operation (with its quantized affine weight); the
    integer-only LayerNorm is :mod:`quantwire.backend.nonlinear`'s."""
    norm = nn.LayerNorm(layer.normalized_shape, layer.eps, elementwise_affine=layer.weight is not None)
    norm.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
    if layer.weight is not None:
        with torch.no_grad():
            weight = layer.weight if layer.weight_quant is None else layer.weight_quant.fake_quant(layer.weight)
        norm.weight = nn.Parameter(weight.detach().clone())
    parts: list[nn.Module] = []
    if layer.input_quant is not None:
        parts.append(_GridRound(activation_grid(layer.input_quant, f"{name}.input_quant"), f"{name}.input"))
    parts.append(norm)
    if layer.output_quant is not None:
        parts.append(_GridRound(activation_grid(layer.output_quant, f"{name}.output_quant"), f"{name}.output"))
    return norm if len(parts) == 1 else _ThenGrid(*parts)


# -- integer GELU and LayerNorm ----------------------------------------------------------------------


class IntegerNonlinearity(nn.Module):
    """A GELU or LayerNorm run in integers: its real input onto a static signed grid
    (:class:`Quantize`, the scale calibrated by :func:`to_integer`), the I-BERT kernel on the
    codes, the result as a real number."""

    def __init__(self, kernel: nn.Module, scale: float, bits: int, name: str) -> None:
        super().__init__()
        self.quantize = Quantize(
            torch.tensor(scale), torch.zeros(()), -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1, name
        )
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        codes, scale = self.kernel.forward_codes(self.quantize(x))
        return codes.double() * scale


def _is_gelu(module: nn.Module) -> bool:
    return isinstance(module, nn.GELU) or type(module).__name__ == "GELUActivation"


def _integer_nonlinearities(model: nn.Module, config: IntegerConfig, example_input: Any) -> None:
    """Replace the GELUs and LayerNorms the config asks for by :class:`IntegerNonlinearity`,
    each input grid sized to the largest input seen on ``example_input``."""
    targets = {
        name: module
        for name, module in model.named_modules()
        if (config.integer_gelu and _is_gelu(module))
        or (config.integer_layer_norm and isinstance(module, nn.LayerNorm))
    }
    if not targets:
        return
    if example_input is None:
        raise BackendError("integer GELU / LayerNorm calibrate their input grids: pass example_input to to_integer")
    largest = dict.fromkeys(targets, 0.0)

    def observe(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            largest[name] = max(largest[name], float(args[0].detach().abs().max()))

        return hook

    handles = [module.register_forward_pre_hook(observe(name)) for name, module in targets.items()]
    try:
        with torch.no_grad():
            run_example(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    bits = config.nonlinear_input_bits
    for name, module in targets.items():
        scale = max(largest[name], 1e-12) / (2 ** (bits - 1) - 1)
        if isinstance(module, nn.LayerNorm):
            kernel: nn.Module = IntLayerNorm(module.normalized_shape, module.weight, module.bias, module.eps, scale)
        else:
            if getattr(module, "approximate", "none") != "none":
                raise BackendError(f"{name}: integer GELU implements the erf GELU, not approximate='tanh'")
            kernel = IntGELU(scale)
        model.set_submodule(name, IntegerNonlinearity(kernel, scale, bits, f"{name}.quantize"))


def run_example(model: nn.Module, example_input: Any) -> Any:
    """``model`` called on ``example_input``: a tensor, a tuple of positional arguments or a
    dict of keyword arguments."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple | list):
        return model(*example_input)
    return model(example_input)
