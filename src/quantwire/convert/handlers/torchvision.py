"""Handlers for torchvision models: the residual adds of ResNet, MobileNetV2/V3 and EfficientNet
blocks. Their convolutions, linears and activations are converted by the ``torch.nn`` handlers
(each handler here recurses into the block); VGG, AlexNet & co. need nothing more.

Each block becomes its quantized twin (a subclass whose forward is torchvision's, with
``out += identity`` replaced by a :class:`~quantwire.nn.QuantEltwiseAdd` whose one quantizer
is shared by both operands). Loaded by the registry the first time a model holds a
torchvision class.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import efficientnet, mobilenetv2, mobilenetv3, resnet

from quantwire.convert.handlers._twin import residual_sum, swap_in_residual_adds
from quantwire.convert.quantize import ConvertedModule
from quantwire.convert.registry import Conversion, register_handler

__all__ = [
    "QuantBasicBlock",
    "QuantBottleneck",
    "QuantFusedMBConv",
    "QuantInvertedResidualV2",
    "QuantInvertedResidualV3",
    "QuantMBConv",
]


class QuantBasicBlock(ConvertedModule, resnet.BasicBlock):
    """ResNet ``BasicBlock`` whose residual add is quantized (``residual_add``)."""

    residual_add: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(residual_sum(self.residual_add, out, identity))


class QuantBottleneck(ConvertedModule, resnet.Bottleneck):
    """ResNet ``Bottleneck`` whose residual add is quantized (``residual_add``)."""

    residual_add: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(residual_sum(self.residual_add, out, identity))


class QuantInvertedResidualV2(ConvertedModule, mobilenetv2.InvertedResidual):
    """MobileNetV2 ``InvertedResidual`` (with ``use_res_connect``) whose add is quantized."""

    residual_add: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        return residual_sum(self.residual_add, x, self.conv(x))


class QuantInvertedResidualV3(ConvertedModule, mobilenetv3.InvertedResidual):
    """MobileNetV3 ``InvertedResidual`` (with ``use_res_connect``) whose add is quantized."""

    residual_add: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        return residual_sum(self.residual_add, self.block(x), x)


class QuantMBConv(ConvertedModule, efficientnet.MBConv):
    """EfficientNet ``MBConv`` (with ``use_res_connect``): stochastic depth, then the quantized add."""

    residual_add: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        return residual_sum(self.residual_add, self.stochastic_depth(self.block(x)), x)


class QuantFusedMBConv(ConvertedModule, efficientnet.FusedMBConv):
    """EfficientNetV2 ``FusedMBConv`` (with ``use_res_connect``): stochastic depth, then the quantized add."""

    residual_add: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        return residual_sum(self.residual_add, self.stochastic_depth(self.block(x)), x)


_TWINS: dict[type, type] = {
    resnet.BasicBlock: QuantBasicBlock,
    resnet.Bottleneck: QuantBottleneck,
    mobilenetv2.InvertedResidual: QuantInvertedResidualV2,
    mobilenetv3.InvertedResidual: QuantInvertedResidualV3,
    efficientnet.MBConv: QuantMBConv,
    efficientnet.FusedMBConv: QuantFusedMBConv,
}


@register_handler(*_TWINS, recurse=True)
def convert_residual_block(block: nn.Module, conversion: Conversion) -> nn.Module | None:
    """A residual block with its add quantized; blocks without a skip connection
    (``use_res_connect`` False: stride 2 or a change of width) stay as they are."""
    if not getattr(block, "use_res_connect", True):
        return None
    return swap_in_residual_adds(block, _TWINS, conversion)
