"""Calibration and post-training quantization algorithms, built on quantwire's quantizers.

Every algorithm works on any model made of quantwire layers, in place, and shows a tqdm
progress bar that ``progress=False`` (or ``quantwire.config.PROGRESS = False``, env
``QUANTWIRE_PROGRESS=0``) turns off. QAT algorithms are quantizers (``quantwire.quant.qat``:
LSQ, LSQ+, PACT) trained by an ordinary training loop.
"""

from quantwire.algorithms.bias_correction import bias_correction
from quantwire.algorithms.calibration import calibrate, calibration_mode, reset_calibration
from quantwire.algorithms.equalize import equalize, find_equalization_pairs, find_smooth_quant_groups, smooth_quant
from quantwire.algorithms.finite_check import checking_finite
from quantwire.algorithms.freeze import freeze_weight_quantizer, quantize_weight_tensors
from quantwire.algorithms.gptq import gptq
from quantwire.algorithms.pruning import LayerSparsity, SparsityReport, prune, sparsity
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
    "LayerSparsity",
    "SparsityReport",
    "ReconstructionResult",
    "adaround",
    "bias_correction",
    "brecq",
    "calibrate",
    "calibration_mode",
    "checking_finite",
    "equalize",
    "find_blocks",
    "find_equalization_pairs",
    "find_smooth_quant_groups",
    "freeze_weight_quantizer",
    "gptq",
    "mark_block",
    "prune",
    "qdrop",
    "reconstruct",
    "register_block_type",
    "quantize_weight_tensors",
    "reset_calibration",
    "smooth_quant",
    "sparsity",
    "use_learned_rounding",
]
