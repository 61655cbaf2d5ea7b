"""Conversion handlers, one module per library: ``torch_nn`` is always loaded; ``torchvision``,
``timm`` and ``transformers`` load the first time a model holds one of their classes."""
