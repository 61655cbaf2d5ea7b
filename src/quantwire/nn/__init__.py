"""Quant layers: drop-in replacements for their ``torch.nn`` twins with quantizers attached."""

from quantwire.nn.activation import QuantActivation, QuantHardTanh, QuantIdentity, QuantReLU, QuantSigmoid, QuantTanh
from quantwire.nn.attention import QuantMultiheadAttention, QuantScaledDotProductAttention
from quantwire.nn.base import QuantActLayer, QuantLayer, QuantWBIOL
from quantwire.nn.conv import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
)
from quantwire.nn.embedding import QuantEmbedding
from quantwire.nn.fused import QuantConvBn1d, QuantConvBn2d
from quantwire.nn.linear import QuantLinear
from quantwire.nn.merge import QuantCat, QuantEltwiseAdd
from quantwire.nn.normalization import QuantLayerNorm
from quantwire.nn.pool import (
    QuantAdaptiveAvgPool2d,
    QuantAvgPool2d,
    QuantMaxPool1d,
    QuantMaxPool2d,
    QuantUpsample,
)

__all__ = [
    "QuantActLayer",
    "QuantActivation",
    "QuantAdaptiveAvgPool2d",
    "QuantAvgPool2d",
    "QuantCat",
    "QuantEltwiseAdd",
    "QuantEmbedding",
    "QuantLayerNorm",
    "QuantMaxPool1d",
    "QuantMaxPool2d",
    "QuantMultiheadAttention",
    "QuantScaledDotProductAttention",
    "QuantUpsample",
    "QuantConv1d",
    "QuantConvBn1d",
    "QuantConvBn2d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantHardTanh",
    "QuantIdentity",
    "QuantLayer",
    "QuantLinear",
    "QuantReLU",
    "QuantSigmoid",
    "QuantTanh",
    "QuantWBIOL",
]
