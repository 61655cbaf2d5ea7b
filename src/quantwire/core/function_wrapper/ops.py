"""Rounding and clamping modules: one straight-through estimator each."""

from torch import Tensor

from quantwire.function import ste
from quantwire.jit import ScriptModule, script_method


class Identity(ScriptModule):
    """Returns its input (a scriptable stand-in wherever an ``*_impl`` does nothing)."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return x


class RoundSte(ScriptModule):
    """Round half to even, gradient 1."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return ste.round_ste(x)


class FloorSte(ScriptModule):
    """Floor, gradient 1."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return ste.floor_ste(x)


class CeilSte(ScriptModule):
    """Ceil, gradient 1."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return ste.ceil_ste(x)


class RoundToZeroSte(ScriptModule):
    """Truncate towards zero, gradient 1."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return ste.round_to_zero_ste(x)


class StochasticRoundSte(ScriptModule):
    """Unbiased stochastic rounding in training, gradient 1.

    With ``deterministic_inference=True`` (the default) it rounds to nearest in eval mode, so
    that a deployed model is reproducible.
    """

    def __init__(self, deterministic_inference: bool = True) -> None:
        super().__init__()
        self.deterministic_inference = deterministic_inference

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        if self.deterministic_inference and not self.training:
            return ste.round_ste(x)
        return ste.stochastic_round_ste(x)


class BinarySignSte(ScriptModule):
    """``±1`` (zero maps to ``+1``), gradient 1."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return ste.binary_sign_ste(x)


class TernarySignSte(ScriptModule):
    """``-1, 0, +1``, gradient 1."""

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return ste.ternary_sign_ste(x)


class TensorClamp(ScriptModule):
    """Clamp to tensor bounds; gradient 0 outside them (what clipping-aware training wants)."""

    @script_method
    def forward(self, x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
        return ste.tensor_clamp(x, min_val, max_val)


class TensorClampSte(ScriptModule):
    """Clamp to tensor bounds; gradient 1 everywhere."""

    @script_method
    def forward(self, x: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
        return ste.tensor_clamp_ste(x, min_val, max_val)


class ScalarClampMinSte(ScriptModule):
    """Clamp from below to a fixed ``min_val``; gradient 1 everywhere."""

    def __init__(self, min_val: float) -> None:
        super().__init__()
        self.min_val = float(min_val)

    @script_method
    def forward(self, x: Tensor) -> Tensor:
        return ste.scalar_clamp_min_ste(x, self.min_val)
