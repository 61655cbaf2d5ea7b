"""Handlers for Hugging Face ``transformers`` models: attention, residual adds, GPT-2's ``Conv1D``
and OPT's positional embedding. Their ``nn.Linear``/``nn.Embedding`` layers are converted by the
``torch.nn`` handlers (each handler here recurses into the module it converts).

**Attention.** Since transformers 4.48 an attention module computes its projections itself and
hands ``Q``, ``K``, ``V`` and the mask to a function it looks up by name,
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``.
Importing this module registers a ``"quantwire"`` attention function (and, under the same name,
the mask function that builds the additive float masks it expects); the attention handler
attaches a :class:`QuantTransformersAttention` to each attention module as ``quant_attention``
and sets the converted model's ``config._attn_implementation = "quantwire"``. The function then
quantizes ``Q`` (pre-scaled), ``Kᵀ``, the attention probabilities and ``V`` of every layer.
Eager and SDPA source models convert alike; the float model keeps its own config (the
conversion works on a deep copy). An attention module that shares the config but holds no
``quant_attention`` (an override skipped it) runs float SDPA.

**Residual adds.** BERT's ``BertSelfOutput``/``BertOutput`` and ViT/DeiT encoder layers become
twins (module-level subclasses, so converted models pickle) whose additions go through a
:class:`~quantwire.nn.QuantEltwiseAdd`. The decoder layers of OPT, GPT-2 and Llama keep float
residual adds: their long forwards change between transformers versions, and a twin
re-implementing one would silently drift from it.

Loaded by the registry the first time a model holds a ``transformers`` class; unpickling a
converted model imports it too (its quant classes live here), which registers ``"quantwire"``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding
from transformers.models.vit.modeling_vit import ViTLayer
from transformers.pytorch_utils import Conv1D

from quantwire import nn as qnn
from quantwire.convert.handlers._twin import residual_sum, swap_in_residual_adds, swap_in_twin, twin_of
from quantwire.convert.quantize import ConvertedModule
from quantwire.convert.registry import Conversion, register_handler
from quantwire.errors import QuantConfigError, QuantUnsupportedError
from quantwire.nn.quantizer_kwargs import QuantSpec
from quantwire.quant.scaled_int import Int8WeightPerTensorFloat

__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "QuantBertOutput",
    "QuantBertSelfOutput",
    "QuantConv1D",
    "QuantDeiTLayer",
    "QuantOPTLearnedPositionalEmbedding",
    "QuantTransformersAttention",
    "QuantViTLayer",
    "quant_attention_forward",
]

ATTENTION_IMPLEMENTATION = "quantwire"
"""The ``config._attn_implementation`` of a converted model (attention and mask interfaces)."""

# Attention modules that dispatch through ALL_ATTENTION_FUNCTIONS, by dotted name (4.x names
# too, where they differ, so that a class absent from the installed version costs nothing).
_ATTENTION_TYPES = (
    "transformers.models.bert.modeling_bert.BertSelfAttention",
    "transformers.models.vit.modeling_vit.ViTAttention",
    "transformers.models.vit.modeling_vit.ViTSelfAttention",
    "transformers.models.deit.modeling_deit.DeiTAttention",
    "transformers.models.deit.modeling_deit.DeiTSelfAttention",
    "transformers.models.opt.modeling_opt.OPTAttention",
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention",
    "transformers.models.llama.modeling_llama.LlamaAttention",
)

# Keyword arguments of the eager attention of some models that change the scores in ways
# QuantScaledDotProductAttention does not implement.
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


# -- attention ------------------------------------------------------------------------------------


class QuantTransformersAttention(qnn.QuantScaledDotProductAttention):
    """The quantized attention a transformers attention module holds as ``quant_attention``;
    :func:`quant_attention_forward` calls its :meth:`attend`. ``layer_name`` (the attention
    module's qualified name) names the layer in errors."""

    layer_name: str = "attention"


def quant_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The ``"quantwire"`` attention function: ``(B, H, L, D)`` query and ``(B, H_kv, S, D)``
    key/value (repeated to ``H`` heads for grouped-query attention, as eager attention does)
    through ``module.quant_attention``; returns ``(output (B, L, H, D), weights (B, H, L, S))``
    like ``eager_attention_forward``. Float SDPA when the module has no ``quant_attention``."""
    quant = getattr(module, "quant_attention", None)
    if quant is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    _refuse_unsupported(quant, kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = _additive_mask(attention_mask, query, key, causal)
    output, weights = quant.attend(query, key, value, mask, dropout if module.training else 0.0, scaling)
    return output.transpose(1, 2).contiguous(), weights


def _refuse_unsupported(quant: QuantTransformersAttention, kwargs: dict[str, Any]) -> None:
    """Raise, naming the layer, when the model asks for a score modification (soft-capping,
    attention sinks, a position bias) that the quantized attention would silently drop."""
    for name in _UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise QuantUnsupportedError(
                f"{quant.layer_name}: the quantized attention does not implement {name!r}; leave this layer's "
                "attention float with an override (attention: null)"
            )


def _repeat_kv(states: Tensor, groups: int) -> Tensor:
    """``(B, H_kv, S, D)`` -> ``(B, H_kv * groups, S, D)``, each key/value head repeated for the
    ``groups`` query heads that share it (transformers' ``repeat_kv``)."""
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _additive_mask(mask: Tensor | None, query: Tensor, key: Tensor, causal: bool) -> Tensor | None:
    """The mask as an additive float mask (0 attend, dtype minimum blocked) cut to the key
    length; a causal one (aligned to the last query) when there is none and the module is
    causal, as SDPA's ``is_causal`` would do."""
    target, source = query.shape[-2], key.shape[-2]
    blocked = torch.finfo(query.dtype).min
    if mask is not None:
        mask = mask[..., :source]
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, blocked)
        return mask.to(query.dtype)
    if not causal or target == 1:
        return None
    allowed = torch.ones(target, source, dtype=torch.bool, device=query.device).tril(source - target)
    return torch.zeros(target, source, dtype=query.dtype, device=query.device).masked_fill(~allowed, blocked)


AttentionInterface.register(ATTENTION_IMPLEMENTATION, quant_attention_forward)
# eager_mask: additive float masks, causal ones always materialised (never left to is_causal).
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)


def _quant_attention(conversion: Conversion) -> QuantTransformersAttention | None:
    """The quantized attention for the module ``conversion`` describes, or None when the config
    quantizes neither the attention operands nor the attention probabilities."""
    operands = conversion.quantizer("attention", "quant_attention")
    probabilities = conversion.quantizer("attention_probs", "quant_attention.probs", signed=False)
    if operands is None and probabilities is None:
        return None
    quant = QuantTransformersAttention(
        q_scaled_quant=operands,
        k_transposed_quant=operands,
        v_quant=operands,
        attn_output_weights_quant=probabilities,
    )
    quant.layer_name = conversion.name or "attention"
    return quant


def _dispatches_attention_interface(cls: type) -> bool:
    """Whether ``cls.forward`` looks its attention up in ``ALL_ATTENTION_FUNCTIONS`` (older
    transformers versions compute some attentions inline, which ``quant_attention`` would not
    reach). True when the source can not be read."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True
    return "ALL_ATTENTION_FUNCTIONS" in source


@register_handler(*_ATTENTION_TYPES, recurse=True)
def convert_attention(module: nn.Module, conversion: Conversion) -> nn.Module | None:
    """Attach a :class:`QuantTransformersAttention` as ``quant_attention`` and switch the
    model's config to the ``"quantwire"`` attention implementation; the projections are
    converted afterwards by the ``nn.Linear`` / ``Conv1D`` handlers."""
    if isinstance(getattr(module, "quant_attention", None), QuantTransformersAttention):
        return None  # converted already
    quant = _quant_attention(conversion)
    if quant is None:
        return None
    described = f"{conversion.name or 'model'} ({type(module).__qualname__})"
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise QuantConfigError(f"{described}: an attention module without a transformers config can not be quantized")
    if not _dispatches_attention_interface(type(module)):
        raise QuantConfigError(
            f"{described}: this transformers version computes this attention inline rather than through "
            "ALL_ATTENTION_FUNCTIONS, so it can not be quantized; leave it float with an override "
            f"(name: {conversion.name!r}, attention: null, attention_probs: null)"
        )
    module.quant_attention = quant
    config._attn_implementation = ATTENTION_IMPLEMENTATION
    return module


# -- residual adds ----------------------------------------------------------------------------------


class _DenseResidualNorm(ConvertedModule):
    """``LayerNorm(dropout(dense(hidden)) + input_tensor)`` with the addition quantized."""

    residual_add: nn.Module | None

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(residual_sum(self.residual_add, hidden_states, input_tensor))


class QuantBertSelfOutput(_DenseResidualNorm, BertSelfOutput):
    """BERT's attention output block with its residual add quantized (``residual_add``)."""


class QuantBertOutput(_DenseResidualNorm, BertOutput):
    """BERT's feed-forward output block with its residual add quantized (``residual_add``)."""


class _PreNormEncoderLayer(ConvertedModule):
    """A pre-norm encoder layer (transformers 5.x ViT/DeiT): ``x + attention(ln(x))`` then
    ``x + mlp(ln(x))``, both additions quantized, each with its own quantizer."""

    attention_residual_add: nn.Module | None
    mlp_residual_add: nn.Module | None

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        attended, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = residual_sum(self.attention_residual_add, self.dropout(attended), hidden_states)
        transformed = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return residual_sum(self.mlp_residual_add, transformed, hidden_states)


class QuantViTLayer(_PreNormEncoderLayer, ViTLayer):
    """ViT's encoder layer with both residual adds quantized."""


class QuantDeiTLayer(_PreNormEncoderLayer, DeiTLayer):
    """DeiT's encoder layer with both residual adds quantized."""


_DENSE_RESIDUAL_TWINS = {BertSelfOutput: QuantBertSelfOutput, BertOutput: QuantBertOutput}
_ENCODER_LAYER_TWINS = {ViTLayer: QuantViTLayer, DeiTLayer: QuantDeiTLayer}
# The children the 5.x encoder layer forward uses (4.x layers have intermediate/output instead).
_ENCODER_LAYER_CHILDREN = ("attention", "layernorm_before", "layernorm_after", "mlp", "dropout")


@register_handler(*_DENSE_RESIDUAL_TWINS, recurse=True)
def convert_dense_residual(module: nn.Module, conversion: Conversion) -> nn.Module | None:
    """BERT output blocks: the residual add through a ``QuantEltwiseAdd``."""
    return swap_in_residual_adds(module, _DENSE_RESIDUAL_TWINS, conversion)


@register_handler(*_ENCODER_LAYER_TWINS, recurse=True)
def convert_encoder_layer(module: nn.Module, conversion: Conversion) -> nn.Module | None:
    """ViT/DeiT encoder layers: both residual adds through their own ``QuantEltwiseAdd``."""
    missing = [name for name in _ENCODER_LAYER_CHILDREN if not hasattr(module, name)]
    if missing:
        warnings.warn(
            f"{conversion.name}: {type(module).__qualname__} has no {', '.join(missing)} (another transformers "
            "version); its residual adds stay float (its inner layers are still converted)",
            stacklevel=2,
        )
        return None
    return swap_in_residual_adds(
        module, _ENCODER_LAYER_TWINS, conversion, adds=("attention_residual_add", "mlp_residual_add")
    )


# -- GPT-2's Conv1D ---------------------------------------------------------------------------------


class QuantConv1D(qnn.QuantWBIOL, Conv1D):
    """transformers' ``Conv1D`` (a linear layer whose weight is stored ``(in, out)``) with weight,
    bias, input and output quantizers. Parameter names and shapes are ``Conv1D``'s, so float
    checkpoints load; per-channel weight scales are per output feature (weight dim 1)."""

    output_channel_dim = 1
    input_channel_dim = 0
    output_feature_dim = -1

    def __init__(
        self,
        nf: int,
        nx: int,
        device: Any = None,
        dtype: Any = None,
        weight_quant: QuantSpec = Int8WeightPerTensorFloat,
        bias_quant: QuantSpec = None,
        input_quant: QuantSpec = None,
        output_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        Conv1D.__init__(self, nf, nx)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
        self._init_quant(weight_quant, bias_quant, input_quant, output_quant, return_quant_tensor, kwargs)

    __repr__ = nn.Module.__repr__  # Conv1D's own repr would hide the quantizers

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"

    def inner_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight.t(), bias)

    @staticmethod
    def float_constructor_kwargs(float_layer: Conv1D) -> dict[str, Any]:
        return {
            "nf": float_layer.nf,
            "nx": float_layer.nx,
            "device": float_layer.weight.device,
            "dtype": float_layer.weight.dtype,
        }


@register_handler(Conv1D)
def convert_conv1d(module: Conv1D, conversion: Conversion) -> nn.Module | None:
    """GPT-2's ``Conv1D``: weight, input, output and bias quantizers from the config."""
    if type(module).forward is not Conv1D.forward:
        return None  # a subclass with its own forward: QuantConv1D would replace it
    kwargs = conversion.wbiol_quantizers()
    if all(quant is None for quant in kwargs.values()):
        return None
    return QuantConv1D.from_float(module, **kwargs)


# -- OPT's positional embedding ---------------------------------------------------------------------


class QuantOPTLearnedPositionalEmbedding(ConvertedModule, OPTLearnedPositionalEmbedding, qnn.QuantEmbedding):
    """OPT's positional embedding (positions from the attention mask, offset by 2) looking its
    rows up in the quantized table: OPT's forward, then :class:`~quantwire.nn.QuantEmbedding`'s."""


_POSITION_TWINS = {OPTLearnedPositionalEmbedding: QuantOPTLearnedPositionalEmbedding}


@register_handler(OPTLearnedPositionalEmbedding)
def convert_opt_positions(module: OPTLearnedPositionalEmbedding, conversion: Conversion) -> nn.Module | None:
    """The table quantized by the ``embedding`` quantizer; the ``nn.Embedding`` handler would
    replace OPT's forward (which takes the attention mask, not positions)."""
    weight_quant = conversion.quantizer("embedding", "weight")
    twin = twin_of(module, _POSITION_TWINS, conversion)
    if weight_quant is None or twin is None:
        return None
    layer = qnn.QuantEmbedding.from_float(module, weight_quant=weight_quant)
    return swap_in_twin(layer, twin, offset=module.offset)
