"""The exceptions quantwire raises on bad input, in one small hierarchy.

Every error quantwire raises on purpose derives from :class:`QuantwireError`, so user code can
catch them all at once; each also derives from the built-in exception a Python user would
expect (``ValueError`` for a bad value, ``AttributeError`` for an attribute an injector cannot
resolve), so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = ["ExportError", "QuantwireError", "QuantConfigError", "QuantInputError", "QuantUnsupportedError"]


class QuantwireError(Exception):
    """Base class of every error quantwire raises on purpose."""


class QuantConfigError(QuantwireError, ValueError):
    """A quantizer or layer was configured with a value it cannot use (bit width 0, a negative
    scale, a shape that cannot broadcast, an unknown keyword argument)."""


class QuantUnsupportedError(QuantwireError, NotImplementedError):
    """A model asks a quantized layer for something it does not compute (an attention score
    modification such as soft-capping); the message names the layer and the way around it."""


class QuantInputError(QuantwireError, ValueError):
    """A tensor handed to a quantizer at run time cannot be quantized (NaN/Inf, wrong shape)."""


class ExportError(QuantwireError, ValueError):
    """A model can not be exported as asked (ONNX or integer test vectors): a quantizer or
    operator with no exportable form (named), a model in training mode, an output folder that
    exists or can not be written, or an export whose check against PyTorch fails."""
