"""Handlers for timm models: ViT ``Attention`` and ``Block``, Swin ``WindowAttention`` and
``SwinTransformerBlock``, and the ResNet ``BasicBlock``/``Bottleneck`` residual adds. ``Mlp``
needs nothing of its own (its ``Linear`` layers and activation are converted by the
``torch.nn`` handlers).

Each block becomes its quantized twin: a subclass whose forward is timm's (as of timm 1.0),
with residual adds through :class:`~quantwire.nn.QuantEltwiseAdd` and attention through
:meth:`QuantScaledDotProductAttention.attend <quantwire.nn.QuantScaledDotProductAttention.attend>`
(``Q``·scale, ``Kᵀ``, ``V`` and the softmax output quantized). timm's ``fused_attn`` flag is
ignored: quantized attention is always written out. Loaded by the registry the first time a
model holds a timm class.
"""

from __future__ import annotations

from timm.layers import norm as timm_norm
from timm.layers.attention import Attention, resolve_self_attn_mask
from timm.models import resnet, swin_transformer, vision_transformer
from torch import Tensor, nn

from quantwire.convert.handlers._twin import residual_sum, swap_in_residual_adds, swap_in_twin, twin_of
from quantwire.convert.handlers.torch_nn import convert_layer_norm
from quantwire.convert.quantize import ConvertedModule
from quantwire.convert.registry import Conversion, register_handler
from quantwire.nn import QuantScaledDotProductAttention

__all__ = [
    "QuantAttention",
    "QuantBasicBlock",
    "QuantBlock",
    "QuantBottleneck",
    "QuantSwinTransformerBlock",
    "QuantWindowAttention",
]


# -- attention ------------------------------------------------------------------------------------


def _attention_dropout(module: nn.Module) -> float:
    """The attention-weights dropout probability of ``module`` in its current mode."""
    return module.attn_drop.p if module.training else 0.0


class QuantAttention(ConvertedModule, Attention):
    """timm ``Attention`` (ViT & co.) with quantized ``Q``·scale, ``Kᵀ``, ``V`` and attention
    weights (``quant_attention``); ``q_norm``/``k_norm``, the output gate, ``norm`` and the
    projections are timm's (their layers converted by their own handlers)."""

    quant_attention: QuantScaledDotProductAttention

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = resolve_self_attn_mask(tokens, q, attn_mask, is_causal)
        x, _ = self.quant_attention.attend(q, k, v, mask, _attention_dropout(self), self.scale)
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(ConvertedModule, swin_transformer.WindowAttention):
    """Swin ``WindowAttention`` with quantized ``Q``·scale, ``Kᵀ``, ``V`` and attention weights
    (``quant_attention``). The relative position bias and the shifted-window mask are added
    to the scores before the softmax, as the additive mask of ``attend``."""

    quant_attention: QuantScaledDotProductAttention

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        windows, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._get_rel_pos_bias()  # (1, heads, N, N)
        if mask is not None:
            # (B * nW, heads, N, D) -> (B, nW, heads, N, D), so that the (nW, N, N) window mask broadcasts.
            windows_per_image = mask.shape[0]
            q, k, v = (t.reshape(-1, windows_per_image, *t.shape[1:]) for t in (q, k, v))
            bias = bias + mask.unsqueeze(1)  # (nW, heads, N, N)
        x, _ = self.quant_attention.attend(q, k, v, bias, _attention_dropout(self), self.scale)
        x = x.reshape(windows, self.num_heads, tokens, -1).transpose(1, 2).reshape(windows, tokens, -1)
        return self.proj_drop(self.proj(x))


_ATTENTION_TWINS: dict[type, type] = {
    Attention: QuantAttention,
    swin_transformer.WindowAttention: QuantWindowAttention,
}


def _quant_attention(conversion: Conversion) -> QuantScaledDotProductAttention | None:
    """The attention operands' quantizers from the ``attention`` (``Q``, ``K``, ``V``) and
    ``attention_probs`` kinds; None when the config quantizes none of them."""
    quantizers = {
        "q_scaled_quant": conversion.quantizer("attention", "q"),
        "k_transposed_quant": conversion.quantizer("attention", "k"),
        "v_quant": conversion.quantizer("attention", "v"),
        "attn_output_weights_quant": conversion.quantizer("attention_probs", "attention_probs", signed=False),
    }
    if all(quant is None for quant in quantizers.values()):
        return None
    return QuantScaledDotProductAttention(softmax_input_quant=None, sdpa_output_quant=None, **quantizers)


@register_handler(*_ATTENTION_TWINS, recurse=True)
def convert_attention(module: nn.Module, conversion: Conversion) -> nn.Module | None:
    """Self-attention with its matrix-product operands quantized; the ``qkv``/``proj`` linears
    are converted afterwards by the ``nn.Linear`` handler."""
    twin = twin_of(module, _ATTENTION_TWINS, conversion)
    quant_attention = None if twin is None else _quant_attention(conversion)
    if quant_attention is None:
        return None
    return swap_in_twin(module, twin, quant_attention=quant_attention)


# -- residual blocks ------------------------------------------------------------------------------


class QuantBlock(ConvertedModule, vision_transformer.Block):
    """ViT ``Block`` (pre-norm) with both residual adds quantized: ``attn_residual_add`` and
    ``mlp_residual_add`` (each add has its own grid)."""

    attn_residual_add: nn.Module | None
    mlp_residual_add: nn.Module | None

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        attn = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = residual_sum(self.attn_residual_add, x, self.drop_path1(self.ls1(attn)))
        return residual_sum(self.mlp_residual_add, x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class QuantSwinTransformerBlock(ConvertedModule, swin_transformer.SwinTransformerBlock):
    """Swin block with both residual adds quantized: ``attn_residual_add`` and ``mlp_residual_add``."""

    attn_residual_add: nn.Module | None
    mlp_residual_add: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        x = residual_sum(self.attn_residual_add, x, self.drop_path1(self._attn(self.norm1(x))))
        x = x.reshape(batch, -1, channels)
        x = residual_sum(self.mlp_residual_add, x, self.drop_path2(self.mlp(self.norm2(x))))
        return x.reshape(batch, height, width, channels)


def _resnet_shortcut(block: nn.Module, shortcut: Tensor) -> Tensor:
    """The identity branch of a timm ResNet block: ``shortcut``, downsampled if the block does."""
    return shortcut if block.downsample is None else block.downsample(shortcut)


def _resnet_tail(block: nn.Module, x: Tensor) -> Tensor:
    """Squeeze-excitation and drop path of a timm ResNet block's residual branch, when it has them."""
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    return x


class QuantBasicBlock(ConvertedModule, resnet.BasicBlock):
    """timm ResNet ``BasicBlock`` whose residual add is quantized (``residual_add``)."""

    residual_add: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        out = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        out = _resnet_tail(self, self.bn2(self.conv2(out)))
        return self.act2(residual_sum(self.residual_add, out, _resnet_shortcut(self, x)))


class QuantBottleneck(ConvertedModule, resnet.Bottleneck):
    """timm ResNet ``Bottleneck`` whose residual add is quantized (``residual_add``)."""

    residual_add: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(out)))))
        out = _resnet_tail(self, self.bn3(self.conv3(out)))
        return self.act3(residual_sum(self.residual_add, out, _resnet_shortcut(self, x)))


_TRANSFORMER_BLOCK_TWINS: dict[type, type] = {
    vision_transformer.Block: QuantBlock,
    swin_transformer.SwinTransformerBlock: QuantSwinTransformerBlock,
}
_RESNET_TWINS: dict[type, type] = {
    resnet.BasicBlock: QuantBasicBlock,
    resnet.Bottleneck: QuantBottleneck,
}


@register_handler(*_TRANSFORMER_BLOCK_TWINS, recurse=True)
def convert_transformer_block(block: nn.Module, conversion: Conversion) -> nn.Module | None:
    """A transformer block with its two residual adds (after attention, after the MLP) quantized."""
    return swap_in_residual_adds(
        block, _TRANSFORMER_BLOCK_TWINS, conversion, adds=("attn_residual_add", "mlp_residual_add")
    )


@register_handler(*_RESNET_TWINS, recurse=True)
def convert_resnet_block(block: nn.Module, conversion: Conversion) -> nn.Module | None:
    """A timm ResNet block with its residual add quantized."""
    return swap_in_residual_adds(block, _RESNET_TWINS, conversion)


# timm's LayerNorm overrides forward only to reach its fused kernels: it computes nn.LayerNorm.
register_handler(timm_norm.LayerNorm)(convert_layer_norm)
