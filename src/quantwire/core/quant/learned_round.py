"""Learned rounding (AdaRound, Nagel et al., 2020): round up or down, per element, as learned."""

import torch
from torch import Tensor, nn

from quantwire.core.utils import check_shape
from quantwire.errors import QuantConfigError
from quantwire.function.ste import floor_ste
from quantwire.jit import ScriptModule, script_method


class AdaRoundRounding(ScriptModule):
    """A ``float_to_int_impl`` that returns ``floor(y) + h(V)`` with one learned ``V`` per element.

    ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, the rectified sigmoid, is the
    soft decision, used while ``soft`` is set (what reconstruction does while it optimises
    ``V``); otherwise, in training and eval alike, the decision is hard, ``h = 1 if V >= 0 else
    0``, so the result is an integer and the quantized weight lies on the grid. ``V`` (the
    parameter ``value``, of ``learned_round_shape``: the weight's) is initialised on the first
    call from the fractional part of ``y`` (``h(V) = y - floor(y)``, at least 1e-5), which makes the hard
    decision round to nearest (ties up) until ``V`` is learned; the ``initialized`` buffer
    records that this happened, so a loaded ``V`` is kept.

    Pair it with :class:`~quantwire.core.quant.LearnedRoundIntQuant`, which clamps after rounding.
    """

    def __init__(
        self,
        learned_round_shape: tuple[int, ...],
        learned_round_zeta: float = 1.1,
        learned_round_gamma: float = -0.1,
    ) -> None:
        super().__init__()
        zeta, gamma = float(learned_round_zeta), float(learned_round_gamma)
        if not (gamma < 0.0 and zeta > 1.0):
            raise QuantConfigError(
                f"AdaRound's stretch needs learned_round_gamma < 0 < 1 < learned_round_zeta, got "
                f"gamma={learned_round_gamma!r}, zeta={learned_round_zeta!r}"
            )
        self.zeta = zeta
        self.gamma = gamma
        self.soft = False
        self.value = nn.Parameter(torch.zeros(check_shape(tuple(learned_round_shape), "learned_round_shape")))
        self.register_buffer("initialized", torch.tensor(False))

    @script_method
    def soft_decision(self) -> Tensor:
        """``h(V)`` in ``[0, 1]``."""
        return torch.clamp(torch.sigmoid(self.value) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    @script_method
    def hard_decision(self) -> Tensor:
        """1 where ``V >= 0`` (round up), 0 elsewhere."""
        return (self.value >= 0).to(self.value.dtype)

    @script_method
    def init_from(self, y: Tensor) -> None:
        """Set ``V`` so that ``h(V)`` is the fractional part of ``y``."""
        # A whole y (fraction 0) starts a hair above h = 0, inside the clamp: its gradient is then
        # the sigmoid's, not a tie at the clamp's edge that fused TorchScript graphs break
        # differently from eager mode. The hard decision (round down) is the same.
        rest = (y - torch.floor(y)).detach().reshape(self.value.shape).clamp_min(1e-5)
        ratio = (self.zeta - self.gamma) / (rest - self.gamma) - 1.0
        self.value.detach().copy_(-torch.log(ratio))
        self.initialized.fill_(True)

    @script_method
    def forward(self, y: Tensor) -> Tensor:
        if not bool(self.initialized):
            self.init_from(y)
        decision = self.soft_decision() if self.soft else self.hard_decision()
        return floor_ste(y) + decision.reshape(y.shape)

    def regularization(self, beta: float) -> Tensor:
        """AdaRound's rounding regulariser ``sum(1 - |2 h(V) - 1| ** beta)``: zero once every
        decision is hard; a large ``beta`` leaves soft decisions free, a small one pushes them
        to 0 or 1."""
        return torch.sum(1.0 - torch.abs(2.0 * self.soft_decision() - 1.0) ** float(beta))
