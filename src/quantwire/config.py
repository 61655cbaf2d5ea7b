"""Process-wide switches, each also settable from the environment before quantwire is imported.

``PROGRESS`` (env ``QUANTWIRE_PROGRESS=0`` turns it off): tqdm progress bars of long loops.

``IGNORE_MISSING_KEYS`` (env ``QUANTWIRE_IGNORE_MISSING_KEYS=1``): loading a ``state_dict``
that lacks a quantizer's parameters (a float checkpoint) is accepted instead of raising; the
quantizers keep the values they were rebuilt with from the loaded weights.
"""

from __future__ import annotations

import os


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes")


IGNORE_MISSING_KEYS: bool = _env_flag("QUANTWIRE_IGNORE_MISSING_KEYS")

PROGRESS: bool = os.environ.get("QUANTWIRE_PROGRESS", "1").strip().lower() not in ("0", "false", "no")
"""Progress bars of long loops (calibration, reconstruction, QAT, export); env
``QUANTWIRE_PROGRESS=0`` turns every one of them off. Each loop also takes ``progress=False``."""
