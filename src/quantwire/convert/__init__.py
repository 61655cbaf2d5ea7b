"""Model conversion: float ``torch.nn`` / torchvision / timm / transformers models to quantwire
layers, driven by a per-layer :class:`QuantConfig`; fake-quant checkpoints saved and reloaded."""

from quantwire.convert import handlers as _handlers  # noqa: F401
from quantwire.convert.checkpoint import CheckpointError, load_quantized, read_checkpoint, save_quantized
from quantwire.convert.config import PRESETS, Override, QuantConfig, TensorQuant, preset
from quantwire.convert.handlers import torch_nn as _torch_nn  # noqa: F401
from quantwire.convert.quantize import ConvertedModule, as_config, quantize_model
from quantwire.convert.registry import Conversion, find_handler, register_handler, registered_types

__all__ = [
    "PRESETS",
    "CheckpointError",
    "load_quantized",
    "read_checkpoint",
    "save_quantized",
    "Conversion",
    "ConvertedModule",
    "Override",
    "QuantConfig",
    "TensorQuant",
    "as_config",
    "find_handler",
    "preset",
    "quantize_model",
    "register_handler",
    "registered_types",
]
