"""Handlers for ``torch.nn`` modules: layers with weights, activations, attention, embeddings,
normalisation and pooling."""

from __future__ import annotations

from torch import nn

from quantwire import nn as qnn
from quantwire.convert.registry import Conversion, register_handler
from quantwire.errors import QuantConfigError

_WBIOL = {
    nn.Linear: qnn.QuantLinear,
    nn.Conv1d: qnn.QuantConv1d,
    nn.Conv2d: qnn.QuantConv2d,
    nn.Conv3d: qnn.QuantConv3d,
    nn.ConvTranspose1d: qnn.QuantConvTranspose1d,
    nn.ConvTranspose2d: qnn.QuantConvTranspose2d,
}


@register_handler(*_WBIOL)
def convert_weight_layer(module: nn.Module, conversion: Conversion) -> nn.Module | None:
    """Linear and convolutions: weight, input, output and bias quantizers from the config."""
    quant_cls = _WBIOL[_nearest(type(module), _WBIOL)]
    _check_group_size(module, quant_cls, conversion)
    kwargs = conversion.wbiol_quantizers()
    if all(quant is None for quant in kwargs.values()):
        return None
    return quant_cls.from_float(module, **kwargs)


def _check_group_size(module: nn.Module, quant_cls: type, conversion: Conversion) -> None:
    """Per-group weights need ``group_size`` to divide the input channels: say so at conversion
    time, naming the layer, instead of failing in the first forward."""
    settings = conversion.settings.weight
    if settings is None or settings.granularity != "group":
        return
    group_size = settings.group_size or settings.options.get("group_size") or 32
    channels = module.weight.shape[quant_cls.input_channel_dim]
    if channels % group_size:
        raise QuantConfigError(
            f"{conversion.name}: {type(module).__name__} has {channels} input channels, which groups of "
            f"group_size={group_size} do not divide; override it, e.g. "
            f"{{name: {conversion.name}, weight: {{granularity: channel}}}}"
        )


def _nearest(cls: type, table: dict[type, type]) -> type:
    return next(base for base in cls.__mro__ if base in table)


# Activations whose output is never negative: their quantizer defaults to an unsigned grid.
_NON_NEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softplus)


@register_handler(
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Softplus,
)
def convert_activation(module: nn.Module, conversion: Conversion) -> nn.Module | None:
    """An activation followed by the ``activation`` quantizer (unsigned after ReLU-like ones)."""
    defaults = {"signed": False} if isinstance(module, _NON_NEGATIVE) else {}
    if conversion.settings.activation is not None and conversion.settings.activation.symmetric is False:
        defaults = {}
    act_quant = conversion.quantizer("activation", "output", **defaults)
    if act_quant is None:
        return None
    return qnn.QuantActivation(act_impl=module, act_quant=act_quant)


@register_handler(nn.MultiheadAttention)
def convert_multihead_attention(module: nn.MultiheadAttention, conversion: Conversion) -> nn.Module:
    """Packed Q/K/V projection, the attention's operands and the output projection."""
    attention = conversion.quantizer("attention", "attention")
    return qnn.QuantMultiheadAttention.from_float(
        module,
        in_proj_input_quant=conversion.quantizer("input", "in_proj.input"),
        in_proj_weight_quant=conversion.quantizer("weight", "in_proj_weight"),
        in_proj_bias_quant=None,
        q_scaled_quant=attention,
        k_transposed_quant=attention,
        v_quant=attention,
        attn_output_weights_quant=conversion.quantizer("attention_probs", "attention_probs", signed=False),
        out_proj_input_quant=conversion.quantizer("input", "out_proj.input"),
        out_proj_weight_quant=conversion.quantizer("weight", "out_proj.weight"),
        out_proj_output_quant=conversion.quantizer("output", "out_proj.output"),
    )


@register_handler(nn.Embedding)
def convert_embedding(module: nn.Embedding, conversion: Conversion) -> nn.Module | None:
    weight_quant = conversion.quantizer("embedding", "weight")
    return None if weight_quant is None else qnn.QuantEmbedding.from_float(module, weight_quant=weight_quant)


@register_handler(nn.LayerNorm)
def convert_layer_norm(module: nn.LayerNorm, conversion: Conversion) -> nn.Module | None:
    """Only when the config quantizes ``norm`` (the affine weight); the output is quantized by
    whatever consumes it."""
    weight_quant = conversion.quantizer("norm", "weight")
    if weight_quant is None or module.weight is None:
        return None
    return qnn.QuantLayerNorm.from_float(module, weight_quant=weight_quant)


@register_handler(nn.MaxPool1d, nn.MaxPool2d)
def convert_max_pool(module: nn.Module, conversion: Conversion) -> nn.Module:
    """Max pooling keeps values on their grid: a pass-through twin that keeps QuantTensors."""
    quant_cls = qnn.QuantMaxPool2d if isinstance(module, nn.MaxPool2d) else qnn.QuantMaxPool1d
    return quant_cls(
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.return_indices,
        module.ceil_mode,
    )


@register_handler(nn.AvgPool2d, nn.AdaptiveAvgPool2d)
def convert_avg_pool(module: nn.Module, conversion: Conversion) -> nn.Module | None:
    """Average pooling, re-quantized by the ``activation`` quantizer when the config sets one."""
    output_quant = conversion.quantizer("activation", "output")
    if output_quant is None:
        return None
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return qnn.QuantAdaptiveAvgPool2d(module.output_size, output_quant=output_quant)
    return qnn.QuantAvgPool2d(
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        ceil_mode=module.ceil_mode,
        count_include_pad=module.count_include_pad,
        divisor_override=module.divisor_override,
        output_quant=output_quant,
    )
