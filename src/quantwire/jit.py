"""TorchScript switch for the core modules.

Core modules derive from :data:`ScriptModule` and mark their compiled methods with
:func:`script_method`. By default (eager) these are ``torch.nn.Module`` and the identity, so
core modules are plain modules that ``torch.jit.script`` and ``torch.compile`` both accept.
With the environment variable ``QUANTWIRE_JIT=1`` set before quantwire is imported they are
``torch.jit.ScriptModule`` and ``torch.jit.script_method``: every core module is compiled by
TorchScript when it is built, with the same outputs as in eager mode.
"""

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["JIT_ENABLED", "ScriptModule", "script_method"]

JIT_ENABLED: bool = os.environ.get("QUANTWIRE_JIT", "0").strip().lower() in ("1", "true", "yes")


def _eager_script_method(function: Callable[..., Any]) -> Callable[..., Any]:
    return function


if JIT_ENABLED:
    # TorchScript is in maintenance in recent PyTorch and warns on every use; a user who set
    # QUANTWIRE_JIT=1 asked for it, so the warning would only be noise.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
    ScriptModule: type[nn.Module] = torch.jit.ScriptModule
    script_method = torch.jit.script_method
else:
    ScriptModule = nn.Module
    script_method = _eager_script_method
