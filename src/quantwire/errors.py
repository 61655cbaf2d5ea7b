"""The exceptions quantwire raises on bad input, in one small hierarchy.

Every error quantwire raises on purpose derives from :class:`QuantwireError`, so user code can
catch them all at once; each also derives from the built-in exception a Python user would
expect (``ValueError`` for a bad value, ``AttributeError`` for an attribute an injector cannot
resolve), so existing ``except ValueError`` code keeps working.

Three more live next to the code that raises them and derive from this hierarchy too:
``quantwire.inject.DependencyError`` (an injector attribute that can not be resolved),
``quantwire.backend.fixed_point.BackendError`` (a model the integer backend can not build or run,
with its subclass ``quantwire.backend.ops.AccumulatorOverflowError``) and
``quantwire.cli_support.models.CliError`` (a command-line argument). ``docs/errors.md`` lists them all.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ExportError",
    "QuantwireError",
    "QuantConfigError",
    "QuantInputError",
    "QuantUnsupportedError",
]


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


class CheckpointError(QuantwireError, ValueError, RuntimeError):
    """A checkpoint or ``state_dict`` that does not fit the model it is loaded into (another
    architecture; missing, unexpected or mis-shaped keys, named), or a file that is not a
    quantwire checkpoint. Raised before anything is loaded: the model keeps its tensors.

    Also a ``RuntimeError``: what ``torch.nn.Module.load_state_dict`` raises for a state dict
    that does not fit, so code written against PyTorch keeps catching it."""
