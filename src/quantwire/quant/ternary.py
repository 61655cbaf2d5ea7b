"""Ternary quantizers: ``{-scale, 0, +scale}``."""

from quantwire.core.quant import TernaryQuant
from quantwire.quant.base import ActQuantSolver, ConstUnitScaling, WeightQuantSolver

__all__ = ["SignedTernaryActPerTensorConst", "SignedTernaryWeightPerTensorConst"]


class SignedTernaryWeightPerTensorConst(ConstUnitScaling, WeightQuantSolver):
    """Weights to ``{-1, 0, 1}``; values under ``threshold`` (0.5) times the scale go to 0."""

    tensor_quant = TernaryQuant
    threshold = 0.5
    signed = True


class SignedTernaryActPerTensorConst(ConstUnitScaling, ActQuantSolver):
    """Activations to ``{-1, 0, 1}``."""

    tensor_quant = TernaryQuant
    threshold = 0.5
    signed = True
