"""Calibration and post-training quantization algorithms, built on quantwire's quantizers.

Every algorithm works on any model made of quantwire layers, in place, and shows a tqdm
progress bar that ``progress=False`` (or ``quantwire.config.PROGRESS = False``, env
``QUANTWIRE_PROGRESS=0``) turns off. QAT algorithms are quantizers (``quantwire.quant.qat``:
LSQ, LSQ+, PACT) trained by an ordinary training loop.
"""

from quantwire.algorithms.calibration import calibrate, calibration_mode, reset_calibration
from quantwire.algorithms.reconstruction import (
    ReconstructionResult,
    adaround,
    brecq,
    find_blocks,
    mark_block,
    qdrop,
    reconstruct,
    register_block_type,
    use_learned_rounding,
)

__all__ = [
    "ReconstructionResult",
    "adaround",
    "brecq",
    "calibrate",
    "calibration_mode",
    "find_blocks",
    "mark_block",
    "qdrop",
    "reconstruct",
    "register_block_type",
    "reset_calibration",
    "use_learned_rounding",
]
