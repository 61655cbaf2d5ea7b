"""Quantized attention: scaled dot-product attention and ``torch.nn.MultiheadAttention``.

Attention is written out (not ``F.scaled_dot_product_attention``) so that every operand of
the two matrix products is quantized: ``Q`` (already multiplied by the softmax scale, so that
``Q·Kᵀ`` is a pure integer product), ``Kᵀ``, the softmax output and ``V``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantwire.errors import QuantConfigError
from quantwire.nn.base import QuantLayer, copy_float_state
from quantwire.nn.linear import QuantLinear
from quantwire.nn.quantizer_kwargs import QuantSpec, build_proxy, configured_injector, route_quant_kwargs
from quantwire.proxy import WeightQuantProxyFromInjector
from quantwire.proxy.base import plain_value
from quantwire.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

_SDPA_QUANTIZERS = (
    "q_scaled_quant",
    "k_transposed_quant",
    "v_quant",
    "softmax_input_quant",
    "attn_output_weights_quant",
    "sdpa_output_quant",
)


def _fake(proxy: Any, x: Tensor) -> Tensor:
    return x if proxy is None else proxy.fake_quant(x)


class QuantScaledDotProductAttention(QuantLayer):
    """``F.scaled_dot_product_attention`` with quantized ``Q`` (pre-scaled), ``Kᵀ``, ``V``,
    softmax input and output, and attention output. Keyword arguments reach each quantizer by
    its name without ``quant`` (``q_scaled_bit_width=4``, ``attn_output_weights_signed=False``)."""

    def __init__(
        self,
        q_scaled_quant: QuantSpec = Int8ActPerTensorFloat,
        k_transposed_quant: QuantSpec = Int8ActPerTensorFloat,
        v_quant: QuantSpec = Int8ActPerTensorFloat,
        softmax_input_quant: QuantSpec = None,
        attn_output_weights_quant: QuantSpec = Uint8ActPerTensorFloat,
        sdpa_output_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.return_quant_tensor = return_quant_tensor
        given = locals()
        self._attach_quantizers({role[: -len("quant")]: (role, given[role]) for role in _SDPA_QUANTIZERS}, kwargs)

    def attend(
        self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout_p: float, scale: float | None
    ) -> tuple[Tensor, Tensor]:
        """Attention output and attention weights for ``(..., L, E)`` operands and an additive
        float mask broadcastable to ``(..., L, S)``."""
        scale_factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        q = _fake(self.q_scaled_quant, query * scale_factor)
        k_t = _fake(self.k_transposed_quant, key.transpose(-2, -1))
        scores = q @ k_t
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(_fake(self.softmax_input_quant, scores), dim=-1)
        weights = _fake(self.attn_output_weights_quant, weights)
        if dropout_p > 0.0:
            weights = F.dropout(weights, dropout_p)
        output = weights @ _fake(self.v_quant, value)
        return _fake(self.sdpa_output_quant, output), weights

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


def sdpa_forward(
    attention: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
) -> Tensor:
    """``F.scaled_dot_product_attention``'s signature on top of ``attention.attend``: the masks
    made one additive mask, the attention weights dropped (for the quantized layer and its
    integer twin)."""
    query, key, value = plain_value(query), plain_value(key), plain_value(value)
    mask = additive_mask(attn_mask, query.shape[-2], key.shape[-2], is_causal, query.dtype, query.device)
    output, _ = attention.attend(query, key, value, mask, dropout_p, scale)
    return output


def additive_mask(
    attn_mask: Tensor | None, target_length: int, source_length: int, is_causal: bool, dtype: Any, device: Any
) -> Tensor | None:
    """A boolean (True = attend) or additive mask, plus causality, as one additive float mask."""
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, float("-inf"))
        else:
            mask = attn_mask.to(dtype)
    if is_causal:
        causal = torch.ones(target_length, source_length, dtype=torch.bool, device=device).tril()
        causal_mask = torch.zeros(target_length, source_length, dtype=dtype, device=device)
        causal_mask = causal_mask.masked_fill(~causal, float("-inf"))
        mask = causal_mask if mask is None else mask + causal_mask
    return mask


def _blocking_mask(mask: Tensor | None, dtype: Any) -> Tensor | None:
    """An ``nn.MultiheadAttention`` mask (boolean: True blocks; float: added) as an additive mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class QuantMultiheadAttention(QuantLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with quantized input projection, attention and output projection.

    Quantizers: ``in_proj_input_quant``, ``in_proj_weight_quant``, ``in_proj_bias_quant`` (the
    packed Q/K/V projection), the :class:`QuantScaledDotProductAttention` quantizers, and
    ``out_proj_input_quant``, ``out_proj_weight_quant``, ``out_proj_bias_quant``,
    ``out_proj_output_quant`` (``out_proj`` is a :class:`QuantLinear`). Parameter names and
    the forward signature are those of ``nn.MultiheadAttention``, so its state dicts load.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
        in_proj_input_quant: QuantSpec = None,
        in_proj_weight_quant: QuantSpec = Int8WeightPerTensorFloat,
        in_proj_bias_quant: QuantSpec = None,
        q_scaled_quant: QuantSpec = Int8ActPerTensorFloat,
        k_transposed_quant: QuantSpec = Int8ActPerTensorFloat,
        v_quant: QuantSpec = Int8ActPerTensorFloat,
        softmax_input_quant: QuantSpec = None,
        attn_output_weights_quant: QuantSpec = Uint8ActPerTensorFloat,
        out_proj_input_quant: QuantSpec = None,
        out_proj_weight_quant: QuantSpec = Int8WeightPerTensorFloat,
        out_proj_bias_quant: QuantSpec = None,
        out_proj_output_quant: QuantSpec = None,
        return_quant_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        nn.MultiheadAttention.__init__(
            self,
            embed_dim,
            num_heads,
            dropout,
            bias,
            add_bias_kv,
            add_zero_attn,
            kdim,
            vdim,
            batch_first,
            device,
            dtype,
        )
        if return_quant_tensor:
            raise QuantConfigError("QuantMultiheadAttention returns float tensors; quantize its output downstream")
        self.return_quant_tensor = False
        given = locals()
        attention_roles = {role[: -len("quant")]: (role, given[role]) for role in _SDPA_QUANTIZERS[:-1]}
        out_proj_roles = {
            "out_proj_input_": ("input_quant", out_proj_input_quant),
            "out_proj_weight_": ("weight_quant", out_proj_weight_quant),
            "out_proj_bias_": ("bias_quant", out_proj_bias_quant),
            "out_proj_output_": ("output_quant", out_proj_output_quant),
        }
        in_proj_roles = {
            "in_proj_input_": ("in_proj_input_quant", in_proj_input_quant),
            "in_proj_weight_": ("in_proj_weight_quant", in_proj_weight_quant),
            "in_proj_bias_": ("in_proj_bias_quant", in_proj_bias_quant),
        }
        routed = route_quant_kwargs(type(self).__name__, {**attention_roles, **out_proj_roles, **in_proj_roles}, kwargs)
        self.attention = QuantScaledDotProductAttention(
            **{role: quant for role, quant in attention_roles.values()},
            sdpa_output_quant=None,
            **{prefix + name: v for prefix in attention_roles for name, v in routed[prefix].items()},
        )
        out_proj = QuantLinear(
            embed_dim,
            embed_dim,
            bias=bias,
            device=device,
            dtype=dtype,
            **{role: quant for role, quant in out_proj_roles.values()},
            **{prefix[len("out_proj_") :] + name: v for prefix in out_proj_roles for name, v in routed[prefix].items()},
        )
        with torch.no_grad():
            out_proj.weight.copy_(self.out_proj.weight)
            if bias:
                out_proj.bias.copy_(self.out_proj.bias)
        self.out_proj = out_proj
        self.out_proj.init_quantizers()
        self._attach_in_proj(in_proj_roles, routed)

    def _attach_in_proj(self, roles: dict[str, tuple[str, QuantSpec]], routed: dict[str, dict[str, Any]]) -> None:
        """Input-projection quantizers: one weight proxy per projection weight this layer has."""
        weight_names = (
            ["in_proj_weight"] if self._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        )
        self.in_proj_weight_quants = nn.ModuleDict()
        weight_quant = roles["in_proj_weight_"][1]
        for name in weight_names:
            if weight_quant is None:
                continue
            # One proxy per projection weight: a proxy of another layer can not be shared here.
            injector = configured_injector(
                self, "in_proj_weight_quant", weight_quant, routed["in_proj_weight_"], shareable=False
            )
            if not issubclass(injector.proxy_class, WeightQuantProxyFromInjector):
                raise QuantConfigError("QuantMultiheadAttention: in_proj_weight_quant must be a weight quantizer")
            self.in_proj_weight_quants[name] = injector.proxy_class(
                self, injector, role=name + "_quant", weight_name=name
            )
        self.in_proj_input_quant = build_proxy(
            self, "in_proj_input_quant", roles["in_proj_input_"][1], routed["in_proj_input_"]
        )
        self.in_proj_bias_quant = build_proxy(
            self, "in_proj_bias_quant", roles["in_proj_bias_"][1], routed["in_proj_bias_"]
        )

    def _projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        def weight(name: str) -> Tensor:
            tensor = getattr(self, name)
            proxy = self.in_proj_weight_quants[name] if name in self.in_proj_weight_quants else None
            return _fake(proxy, tensor)

        if self._qkv_same_embed_dim:
            return tuple(weight("in_proj_weight").chunk(3))  # type: ignore[return-value]
        return weight("q_proj_weight"), weight("k_proj_weight"), weight("v_proj_weight")

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        query, key, value = plain_value(query), plain_value(key), plain_value(value)
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        target_length, batch, _ = query.shape
        query, key, value = (_fake(self.in_proj_input_quant, t) for t in (query, key, value))
        w_q, w_k, w_v = self._projection_weights()
        bias = self.in_proj_bias
        if bias is not None and self.in_proj_bias_quant is not None:
            bias = self.in_proj_bias_quant.fake_quant(bias)
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        # nn.MultiheadAttention masks: True means "do not attend"; is_causal is only a hint
        # that attn_mask is causal, so the mask itself is what counts.
        mask = _blocking_mask(attn_mask, q.dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, batch, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, batch, 1)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        heads, head_dim = self.num_heads, self.head_dim
        q = q.reshape(target_length, batch * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], batch * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], batch * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch * heads, 1, head_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(batch * heads, 1, head_dim)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        source_length = k.shape[1]
        mask = self._merge_masks(mask, key_padding_mask, batch, target_length, source_length, q.dtype)
        dropout = self.dropout if self.training else 0.0
        output, weights = self.attention.attend(
            q.reshape(batch, heads, target_length, head_dim),
            k.reshape(batch, heads, source_length, head_dim),
            v.reshape(batch, heads, source_length, head_dim),
            mask,
            dropout,
            None,
        )
        output = output.permute(2, 0, 1, 3).reshape(target_length, batch, self.embed_dim)
        output = self.out_proj(output)
        if self.batch_first and batched:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(1)
            weights = weights.squeeze(0)
        if not need_weights:
            return output, None
        return output, weights.mean(dim=-3) if average_attn_weights else weights

    def _merge_masks(
        self,
        mask: Tensor | None,
        key_padding_mask: Tensor | None,
        batch: int,
        target_length: int,
        source_length: int,
        dtype: Any,
    ) -> Tensor | None:
        """``attn_mask`` ((L, S) or (N*H, L, S)) and ``key_padding_mask`` ((N, S)) as one additive
        mask of shape broadcastable to (N, H, L, S)."""
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(batch, self.num_heads, target_length, source_length)
        padding = _blocking_mask(key_padding_mask, dtype)
        if padding is not None:
            padding = padding.reshape(batch, 1, 1, source_length)
            mask = padding if mask is None else mask + padding
        return mask

    @classmethod
    def from_float(cls, float_layer: nn.MultiheadAttention, **quant_kwargs: Any) -> QuantMultiheadAttention:
        reference = float_layer.out_proj.weight
        layer = cls(
            float_layer.embed_dim,
            float_layer.num_heads,
            float_layer.dropout,
            float_layer.in_proj_bias is not None,
            float_layer.bias_k is not None,
            float_layer.add_zero_attn,
            float_layer.kdim,
            float_layer.vdim,
            float_layer.batch_first,
            device=reference.device,
            dtype=reference.dtype,
            **quant_kwargs,
        )
        copy_float_state(float_layer, layer)
        with torch.no_grad():
            layer.out_proj.weight.copy_(float_layer.out_proj.weight)
            if float_layer.out_proj.bias is not None:
                layer.out_proj.bias.copy_(float_layer.out_proj.bias)
        layer.out_proj.init_quantizers()
        return layer
