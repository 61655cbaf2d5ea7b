"""Binary quantizers: ``±scale``."""

from quantwire.core.quant import BinaryQuant
from quantwire.quant.base import ActQuantSolver, ConstUnitScaling, WeightQuantSolver

__all__ = ["SignedBinaryActPerTensorConst", "SignedBinaryWeightPerTensorConst"]


class SignedBinaryWeightPerTensorConst(ConstUnitScaling, WeightQuantSolver):
    """Weights to ``±1`` (``scaling_init`` overrides the constant)."""

    tensor_quant = BinaryQuant
    signed = True


class SignedBinaryActPerTensorConst(ConstUnitScaling, ActQuantSolver):
    """Activations to ``±1``."""

    tensor_quant = BinaryQuant
    signed = True
