"""Process-wide switches, each also settable from the environment before quantwire is imported.

``PROGRESS`` (env ``QUANTWIRE_PROGRESS=0`` turns it off): tqdm progress bars of long loops.

``IGNORE_MISSING_KEYS`` (env ``QUANTWIRE_IGNORE_MISSING_KEYS=1``): loading a ``state_dict``
that lacks a quantizer's parameters (a float checkpoint) is accepted instead of raising; the
quantizers keep the values they were rebuilt with from the loaded weights.

``FUSED_FAKE_QUANT`` (env ``QUANTWIRE_FUSED_FAKE_QUANT=0`` turns it off): eager integer
quantizers run as one autograd node (:mod:`quantwire.function.fake_quant`); off, they run the
composition of straight-through pieces that TorchScript and ``torch.compile`` trace, with the
same forward values and gradients that differ by float rounding only.
"""

from __future__ import annotations

import os


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes")


IGNORE_MISSING_KEYS: bool = _env_flag("QUANTWIRE_IGNORE_MISSING_KEYS")

PROGRESS: bool = os.environ.get("QUANTWIRE_PROGRESS", "1").strip().lower() not in ("0", "false", "no")
"""Progress bars of long loops (calibration, reconstruction, QAT, export); env
``QUANTWIRE_PROGRESS=0`` turns every one of them off. Each loop also takes ``progress=False``."""

FUSED_FAKE_QUANT: bool = os.environ.get("QUANTWIRE_FUSED_FAKE_QUANT", "1").strip().lower() not in ("0", "false", "no")
"""Eager integer fake quantization as one autograd node (see the module docstring)."""
