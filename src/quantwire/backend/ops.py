"""The integer backend's operators: exact integer products and fixed-point rescaling.

Integer tensors hold integers in floating-point dtypes, and every operator computes them
exactly. A float32 sum of integer products is exact while the sum of the products' magnitudes
stays below ``2**24`` (every partial sum is then an integer float32 represents, in any order of
summation); float64 likewise below ``2**53``. :class:`IntMatMul` proves the float32 case when
it is built, from the largest input code and the weight codes (a static bound), and then runs
the product in float32 (oneDNN's direct convolution, MKL's matrix product, at full float32
precision); past ``2**24`` it splits the input codes into a high and a low part whose float32
products each fit, and past that it sums in float64 (refused past ``2**53``). Rescaling happens
in float64 when its bound proves ``acc * M + B`` exact there, in int64 otherwise.

- :class:`IntMatMul`: matrix product / linear / convolution of integer codes; tracks the largest
  accumulator and detects overflow of the configured accumulator width (int32 by default).
- :class:`MulShift`: ``(acc * M + B) * 2**-sfl``: rescale and bias, output kept at high precision.
- :class:`MulQuant`: ``clamp(round_half_even((acc * M + B) / 2**sfl) + zero_point)``: rescale,
  bias, round and clamp onto the next quantizer's grid (its codes).
- :class:`Quantize`: a real tensor onto a quantizer's grid (the model's input, and after a
  nonlinearity kept in floating point).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantwire.backend.fixed_point import BackendError, FixedPoint, rounding_right_shift

__all__ = ["AccumulatorOverflowError", "IntMatMul", "MulQuant", "MulShift", "Quantize", "integer_range"]

_EXACT_FLOAT64 = 2**53
_EXACT_FLOAT32 = 2**24
# float64 exponents: a dyadic value k * 2**e is exact while |k| < 2**53 and e stays in range
_SMALLEST_EXPONENT = -1022
_LARGEST_EXPONENT = 1023

_PRODUCTS = {
    "matmul": lambda x, w, kw: torch.matmul(x, w),
    "linear": lambda x, w, kw: F.linear(x, w),
    "conv1d": lambda x, w, kw: F.conv1d(x, w, **kw),
    "conv2d": lambda x, w, kw: F.conv2d(x, w, **kw),
    "conv3d": lambda x, w, kw: F.conv3d(x, w, **kw),
    "conv_transpose1d": lambda x, w, kw: F.conv_transpose1d(x, w, **kw),
    "conv_transpose2d": lambda x, w, kw: F.conv_transpose2d(x, w, **kw),
}


class AccumulatorOverflowError(BackendError):
    """An integer product's sums do not fit the configured accumulator width."""


@contextlib.contextmanager
def full_precision_float32() -> Iterator[None]:
    """Inside, PyTorch's CPU float32 convolutions and matrix products multiply and add in
    float32 (IEEE), as the exactness argument for integer codes needs: oneDNN's reduced
    precision modes (``torch.backends.mkldnn.{conv,matmul}.fp32_precision`` ``"bf16"`` /
    ``"tf32"``, also set by ``torch.set_float32_matmul_precision("medium")``) are pinned to
    ``"ieee"`` and NNPACK (Winograd and FFT convolutions, which do not sum products exactly) is
    switched off. The settings found are restored on leaving; nothing changes when they
    already are full precision, except NNPACK's switch, which is global state (as in
    ``torch.backends.nnpack.flags``)."""
    pinned = []
    for kind in (torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul):
        precision = kind.fp32_precision
        if precision not in ("ieee", "none"):
            kind.fp32_precision = "ieee"
            pinned.append((kind, precision))
    (nnpack,) = torch.backends.nnpack.set_flags(False)
    try:
        yield
    finally:
        torch.backends.nnpack.set_flags(nnpack)
        for kind, precision in pinned:
            kind.fp32_precision = precision


def output_l1_norms(op: str, weight: Tensor, groups: int = 1) -> Tensor:
    """For each output channel of the product ``op`` with ``weight`` as second operand, the sum
    of the magnitudes of the weight codes that output sums over (a 1-D float64 tensor; for a
    transposed convolution an upper bound: every kernel position counted). Times the largest
    input magnitude, the largest accumulator magnitude the product can produce."""
    magnitude = weight.detach().double().abs()
    if op == "linear":
        return magnitude.reshape(-1, magnitude.shape[-1]).sum(1) if magnitude.dim() > 1 else magnitude.sum(0, True)
    if op == "matmul":
        return magnitude.sum(-2).reshape(-1) if magnitude.dim() > 1 else magnitude.sum(0, True)
    if op.startswith("conv_transpose"):
        in_channels, per_group = magnitude.shape[0], magnitude.shape[1]
        grouped = magnitude.reshape(groups, in_channels // groups, per_group, -1)
        return grouped.sum(dim=(1, 3)).reshape(-1)
    return magnitude.flatten(1).sum(1)


@dataclass(frozen=True)
class ProductPlan:
    """How :class:`IntMatMul` computes one product exactly, given ``bound``, the largest sum of
    product magnitudes: ``"float32"`` (below ``2**24``), ``"split"`` (input codes ``x = 2**shift
    * high + low`` with ``0 <= low < 2**shift``, two float32 products each below ``2**24``,
    combined in float64) or ``"float64"``."""

    kind: str
    bound: float
    shift: int = 0


def plan_product(max_abs_input: float, max_l1_weight: float) -> ProductPlan:
    """The cheapest exact way to sum products of input codes up to ``max_abs_input`` in
    magnitude with weights whose per-output magnitudes sum to at most ``max_l1_weight``."""
    bound = max_abs_input * max_l1_weight
    if bound < _EXACT_FLOAT32:
        return ProductPlan("float32", bound)
    if bound < _EXACT_FLOAT64:
        # the widest low part whose products fit (low codes are below 2**shift)
        shift = math.floor(math.log2(_EXACT_FLOAT32 / max_l1_weight + 1))
        while shift > 0 and (2**shift - 1) * max_l1_weight >= _EXACT_FLOAT32:
            shift -= 1
        if shift > 0 and math.ceil(max_abs_input / 2**shift) * max_l1_weight < _EXACT_FLOAT32:
            return ProductPlan("split", bound, shift)
    return ProductPlan("float64", bound)


@dataclass
class _WeightOperand:
    """The weight buffer as the products use it, rebuilt whenever the buffer is replaced or
    written to (``load_state_dict``, ``.to()``): float32 codes, per-output L1 norms, the plan."""

    source: Tensor
    version: int
    float32: Tensor
    l1: Tensor
    plan: ProductPlan | None

    def current(self, weight: Tensor) -> bool:
        return self.source is weight and self.version == weight._version


class IntMatMul(nn.Module):
    """The integer product ``op`` (``matmul``, ``linear``, ``conv2d``, ...) of two integer-valued
    tensors, computed exactly; ``weight`` (a buffer) is the second operand when given.

    ``input_bound``: the largest ``|input code|`` the caller will pass (an
    :class:`~quantwire.backend.layers.IntegerWBIOL` passes its input grid's, which its
    :class:`Quantize` clamps to). With it and the weight buffer, the product's largest
    accumulator is known when it is built (:attr:`accumulator_bound`): the product runs in
    float32 when that bound is below ``2**24``, as two float32 products of the input's high and
    low parts when each fits, in float64 otherwise (see :func:`plan_product`). Without a static
    bound (a product of two activations), float32 codes get the same choice on each call from
    the operands' largest magnitudes, and float64 codes are summed in float64. The accumulator
    is float32 when the codes were float32 and the product ran in float32, float64 otherwise;
    it holds the exact integers either way.

    ``accumulator_bits``: the width of the hardware accumulator (signed); a sum outside it is
    an overflow, handled as ``overflow`` says: ``"raise"`` (:class:`AccumulatorOverflowError`),
    ``"wrap"`` (two's-complement wrap-around, as the hardware would) or ``"ignore"``; with a
    static bound below ``2**(accumulator_bits - 1)`` none can occur. The largest magnitude seen
    is kept in :attr:`max_abs_accumulator` on every call (one reduction over the accumulator,
    which overflow is detected from).
    """

    def __init__(
        self,
        op: str,
        weight: Tensor | None = None,
        accumulator_bits: int = 32,
        overflow: str = "raise",
        name: str = "",
        input_bound: float | None = None,
        **op_kwargs: Any,
    ) -> None:
        super().__init__()
        if op not in _PRODUCTS:
            raise BackendError(f"IntMatMul {name}: unknown op {op!r} (one of {', '.join(_PRODUCTS)})")
        if overflow not in ("raise", "wrap", "ignore"):
            raise BackendError(f"IntMatMul {name}: overflow must be 'raise', 'wrap' or 'ignore', got {overflow!r}")
        if input_bound is not None and not (math.isfinite(input_bound) and input_bound >= 0):
            raise BackendError(f"IntMatMul {name}: input_bound must be a finite magnitude, got {input_bound!r}")
        self.op = op
        self.op_kwargs = op_kwargs
        self.accumulator_bits = accumulator_bits
        self.overflow = overflow
        self.name = name
        self.input_bound = input_bound
        self.max_abs_accumulator = 0.0
        self.register_buffer("weight", None if weight is None else weight.detach().double())
        self._operand: _WeightOperand | None = None

    def check_exact(self, max_abs_input: float, max_abs_weight: float, terms: int) -> None:
        """Refuse operands whose sums float64 could not hold exactly."""
        if max_abs_input * max_abs_weight * terms >= _EXACT_FLOAT64:
            raise BackendError(
                f"IntMatMul {self.name}: {terms} products of |codes| up to {max_abs_input:g} x {max_abs_weight:g} "
                "exceed 2**53: float64 can not sum them exactly"
            )

    @property
    def accumulator_bound(self) -> float | None:
        """The largest ``|accumulator|`` any input within :attr:`input_bound` can produce with
        the weight buffer (None without both)."""
        operand = self._weight_operand()
        return None if operand is None or operand.plan is None else operand.plan.bound

    def channel_bounds(self) -> Tensor | None:
        """Per output channel, the largest ``|accumulator|`` (float64; None without a static
        bound): what a rescale along the output channels needs to prove its arithmetic exact."""
        operand = self._weight_operand()
        if operand is None or self.input_bound is None:
            return None
        return operand.l1 * self.input_bound

    def forward(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        operand = self._weight_operand() if w is None else None
        weight = self.weight if w is None else w
        if operand is not None and operand.plan is not None:
            plan = operand.plan
        elif x.dtype == torch.float64 or weight.dtype == torch.float64:
            # float64 codes without a static bound: summed in float64, measuring the operands and
            # converting them would cost more than it saves
            plan = ProductPlan("float64", math.inf)
        else:
            plan = self._measured_plan(x, weight, operand)
        accumulator = self._product(x, weight, plan, operand)
        return self._overflow(accumulator)

    def _weight_operand(self) -> _WeightOperand | None:
        """The weight buffer's float32 codes, L1 norms and plan (cached)."""
        weight = self.weight
        if weight is None:
            return None
        if self._operand is None or not self._operand.current(weight):
            l1 = output_l1_norms(self.op, weight, self.op_kwargs.get("groups", 1))
            largest = float(l1.max()) if l1.numel() else 0.0
            plan = None if self.input_bound is None else plan_product(self.input_bound, largest)
            self._operand = _WeightOperand(weight, weight._version, weight.detach().float(), l1, plan)
        return self._operand

    def _measured_plan(self, x: Tensor, weight: Tensor, operand: _WeightOperand | None) -> ProductPlan:
        """The plan from the operands themselves (no static bound): their largest magnitudes."""
        largest_input = _max_abs(x)
        if operand is not None:
            l1 = operand.l1
        else:
            l1 = output_l1_norms(self.op, weight, self.op_kwargs.get("groups", 1))
        return plan_product(largest_input, float(l1.max()) if l1.numel() else 0.0)

    def _product(self, x: Tensor, weight: Tensor, plan: ProductPlan, operand: _WeightOperand | None) -> Tensor:
        """The exact accumulator, computed as ``plan`` says."""
        if plan.kind == "float64":
            return _PRODUCTS[self.op](x.double(), weight.double(), self.op_kwargs)
        weight32 = operand.float32 if operand is not None else weight.float()
        if plan.kind == "float32":
            with full_precision_float32():
                accumulator = _PRODUCTS[self.op](x.float(), weight32, self.op_kwargs)
            float32_operands = x.dtype == torch.float32 and (operand is not None or weight.dtype == torch.float32)
            return accumulator if float32_operands else accumulator.double()
        step = 2.0**plan.shift
        high = torch.floor(x * (1.0 / step))
        low = x - high * step
        with full_precision_float32():
            high_sum = _PRODUCTS[self.op](high.float(), weight32, self.op_kwargs)
            low_sum = _PRODUCTS[self.op](low.float(), weight32, self.op_kwargs)
        # both partial accumulators are integers below 2**24; the total is below 2**53
        return torch.add(low_sum.double(), high_sum, alpha=step)

    def _overflow(self, accumulator: Tensor) -> Tensor:
        if accumulator.numel() == 0:
            return accumulator
        largest = _max_abs(accumulator)
        self.max_abs_accumulator = max(self.max_abs_accumulator, largest)
        limit = 2.0 ** (self.accumulator_bits - 1)
        if largest < limit or self.overflow == "ignore":
            return accumulator
        if self.overflow == "raise":
            raise AccumulatorOverflowError(
                f"IntMatMul {self.name} ({self.op}): a sum reached {largest:.0f}, which does not fit a "
                f"{self.accumulator_bits}-bit accumulator (|sum| < {limit:.0f}); widen accumulator_bits or "
                "use overflow='wrap' to emulate the wrap-around"
            )
        span = 2.0**self.accumulator_bits
        return torch.remainder(accumulator.double() + limit, span) - limit

    def extra_repr(self) -> str:
        operand = self._weight_operand()
        products = "measured" if operand is None or operand.plan is None else operand.plan.kind
        return f"op={self.op}, accumulator_bits={self.accumulator_bits}, overflow={self.overflow}, products={products}"


def _max_abs(tensor: Tensor) -> float:
    """The largest magnitude in ``tensor`` (0 when empty), in one pass; a Python int for an
    integer tensor (exact past 2**53)."""
    if tensor.numel() == 0:
        return 0
    low, high = torch.aminmax(tensor)
    number = float if tensor.is_floating_point() else int
    return max(-number(low), number(high))


def _channel_view(tensor: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """A per-channel (or scalar) tensor shaped to broadcast along ``channel_dim`` of ``like``."""
    if tensor.numel() == 1:
        return tensor.reshape(())
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return tensor.reshape(shape)


def _trailing_zeros(value: int) -> int:
    """How many times 2 divides ``value`` (a large number for 0, which any power divides)."""
    return (value & -value).bit_length() - 1 if value else 10**6


def _fits_float64(value: int) -> bool:
    """Whether float64 represents the integer ``value`` exactly."""
    return value == 0 or abs(value) >> _trailing_zeros(value) < _EXACT_FLOAT64


class _Rescale(nn.Module):
    """``acc * M + B`` with ``M`` and ``B`` fixed-point integers sharing ``sfl``.

    ``accumulator_bound``: the largest ``|acc|`` this rescale will be given, one number or one
    per channel along ``channel_dim`` (:meth:`IntMatMul.channel_bounds`); None: measured on each
    call. When the bound proves ``|acc * M + B|`` a multiple of ``2**t`` below ``2**(53 + t)``
    in every channel (``t``: the trailing zero bits ``M`` and ``B`` share), float64 holds it
    exactly and the rescale runs as one fused float64 multiply-add with ``M * 2**-sfl`` and
    ``B * 2**-sfl`` (exact powers-of-two scalings); otherwise in int64, refused when the
    product could pass ``2**63``."""

    def __init__(
        self,
        multiplier: FixedPoint,
        bias: FixedPoint | None,
        channel_dim: int,
        name: str,
        accumulator_bound: Tensor | float | None = None,
    ) -> None:
        super().__init__()
        if bias is not None and bias.sfl != multiplier.sfl:
            raise BackendError(f"{name}: multiplier and bias must share sfl ({multiplier.sfl} vs {bias.sfl})")
        self.sfl = multiplier.sfl
        self.swl = multiplier.swl
        self.channel_dim = channel_dim
        self.name = name
        self.register_buffer("multiplier", multiplier.value)
        self.register_buffer("bias", None if bias is None else bias.value)
        # The real multiplier and bias the integers approximate: for measuring the rescale's
        # error (:meth:`exact`), not used by forward.
        real_multiplier = multiplier.real() if multiplier.source is None else multiplier.source
        self.register_buffer("real_multiplier", real_multiplier.reshape(-1).clone(), persistent=False)
        real_bias = None if bias is None else (bias.real() if bias.source is None else bias.source)
        self.register_buffer(
            "real_bias", None if real_bias is None else real_bias.reshape(-1).clone(), persistent=False
        )
        self._largest_multiplier = int(multiplier.value.abs().max()) if multiplier.value.numel() else 0
        self._largest_bias = int(bias.value.abs().max()) if bias is not None and bias.value.numel() else 0
        self.accumulator_bound = None if accumulator_bound is None else _bounds_list(accumulator_bound)
        self._largest_output = None if self.accumulator_bound is None else self._float64_range(self.accumulator_bound)

    def _float64_range(self, accumulator_bounds: list[float]) -> float | None:
        """The largest ``|acc * M + B| * 2**-sfl`` when float64 computes every channel's
        ``(acc * M + B) * 2**-sfl`` exactly for ``|acc|`` within the bounds; None otherwise."""
        if abs(self.sfl) > 1000:
            return None
        multipliers = [int(m) for m in self.multiplier.reshape(-1).tolist()]
        biases = [0] if self.bias is None else [int(b) for b in self.bias.reshape(-1).tolist()]
        channels = max(len(multipliers), len(biases), len(accumulator_bounds))
        if len(accumulator_bounds) not in (1, channels):
            accumulator_bounds = [max(accumulator_bounds)]
        if any(len(values) not in (1, channels) for values in (multipliers, biases)):
            return None
        largest = 0
        for channel in range(channels):
            m = multipliers[channel % len(multipliers)]
            b = biases[channel % len(biases)]
            bound = math.ceil(accumulator_bounds[channel % len(accumulator_bounds)])
            if not (_fits_float64(m) and _fits_float64(b)):
                return None
            value = bound * abs(m) + abs(b)
            if value == 0:
                continue
            shared = min(_trailing_zeros(m) if bound else 10**6, _trailing_zeros(b))
            if value >> shared >= _EXACT_FLOAT64 or shared - self.sfl < _SMALLEST_EXPONENT:
                return None
            if max(value.bit_length(), abs(m).bit_length()) - self.sfl > _LARGEST_EXPONENT:
                return None
            largest = max(largest, value)
        return largest * 2.0**-self.sfl

    def _in_float64(self, accumulator: Tensor) -> bool:
        """Whether this call's rescale is exact in float64 (the static bound's verdict, or the
        measured accumulator's when there is no bound)."""
        if self.accumulator_bound is not None:
            return self._largest_output is not None
        return self._float64_range([_max_abs(accumulator)]) is not None

    def _rescaled_float64(self, accumulator: Tensor) -> Tensor:
        """``(acc * M + B) * 2**-sfl`` as one float64 multiply-add (exact when
        :meth:`_in_float64` says so); the accumulator as given (float32 or float64 integers)."""
        scale = 2.0**-self.sfl
        multiplier = self.multiplier.double().reshape(-1) * scale
        # a zero bias is +0.0, so that a zero result is +0.0 as int64 arithmetic would give
        bias = torch.zeros(1, dtype=torch.float64) if self.bias is None else self.bias.double().reshape(-1) * scale
        channels = max(multiplier.numel(), bias.numel())
        # shaped like the accumulator, never 0-dim: a 0-dim float64 operand would leave a
        # float32 accumulator's result in float32
        shape = [1] * accumulator.dim()
        if channels > 1:
            shape[self.channel_dim] = channels
        multiplier, bias = multiplier.expand(channels).reshape(shape), bias.expand(channels).reshape(shape)
        return torch.addcmul(bias, accumulator, multiplier)

    def scaled(self, accumulator: Tensor) -> Tensor:
        """``acc * M + B`` in int64; refused when it could pass ``2**63`` (looked for on the
        accumulator only when the static bound does not rule it out)."""
        acc = accumulator.round().to(torch.int64)
        if acc.numel():
            proven = self.accumulator_bound is not None and self._fits_int64(max(self.accumulator_bound))
            if not proven and not self._fits_int64(_max_abs(acc)):
                raise BackendError(f"{self.name}: accumulator x multiplier overflows int64; lower sfl")
        out = acc * _channel_view(self.multiplier, acc, self.channel_dim)
        if self.bias is not None:
            out = out + _channel_view(self.bias, acc, self.channel_dim)
        return out

    def _fits_int64(self, largest_accumulator: float) -> bool:
        return math.ceil(largest_accumulator) * self._largest_multiplier + self._largest_bias < 2**63

    def _integer_accumulator(self, accumulator: Tensor) -> Tensor:
        """The accumulator as the float64 path takes it: an :class:`IntMatMul`'s (integers) when
        the bound is static, rounded otherwise (as the int64 path rounds it)."""
        return accumulator if self.accumulator_bound is not None else accumulator.round()

    def exact(self, accumulator: Tensor) -> Tensor:
        """``acc * m + b`` with the real multiplier and bias (float64): what the fixed point
        approximates."""
        out = accumulator.double() * _channel_view(self.real_multiplier, accumulator, self.channel_dim)
        if self.real_bias is not None:
            out = out + _channel_view(self.real_bias, accumulator, self.channel_dim)
        return out

    def extra_repr(self) -> str:
        return f"swl={self.swl}, sfl={self.sfl}, rounding=half-to-even"


def _bounds_list(bound: Tensor | float) -> list[float]:
    """An accumulator bound (one number or one per channel) as a list of floats."""
    values = torch.as_tensor(bound, dtype=torch.float64).reshape(-1).tolist()
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise BackendError(f"accumulator_bound must be finite magnitudes, got {bound!r}")
    return values


class MulShift(_Rescale):
    """``(acc * M + B) * 2**-sfl``: the accumulator rescaled and biased, kept at high precision
    (float64: exact while ``|acc * M + B| < 2**53``; beyond, the int64 result rounded once to
    float64)."""

    def forward(self, accumulator: Tensor) -> Tensor:
        if self._in_float64(accumulator):
            return self._rescaled_float64(self._integer_accumulator(accumulator))
        return self.scaled(accumulator).double() * 2.0**-self.sfl


class MulQuant(_Rescale):
    """``clamp(round_half_even((acc * M + B) / 2**sfl) + zero_point, qmin, qmax)``: the next
    quantizer's codes (float64 holding integers), computed exactly: in float64 when the bound
    proves it exact there (rounding an exact float64 quotient half to even is the integer
    rounding right shift), in int64 otherwise."""

    def __init__(
        self,
        multiplier: FixedPoint,
        bias: FixedPoint | None,
        zero_point: Tensor,
        qmin: int,
        qmax: int,
        channel_dim: int,
        name: str,
        accumulator_bound: Tensor | float | None = None,
    ) -> None:
        super().__init__(multiplier, bias, channel_dim, name, accumulator_bound)
        self.register_buffer("zero_point", zero_point.detach().round().to(torch.int64))
        self.qmin, self.qmax = int(qmin), int(qmax)
        if self._largest_output is not None and not self._codes_fit(self._largest_output):
            self._largest_output = None

    def _codes_fit(self, largest_output: float) -> bool:
        """Whether the rounded output plus the zero point stays an exact float64 integer."""
        largest_zero_point = int(self.zero_point.abs().max()) if self.zero_point.numel() else 0
        return largest_output + 1 + largest_zero_point < _EXACT_FLOAT64

    def _in_float64(self, accumulator: Tensor) -> bool:
        if self.accumulator_bound is not None:
            return self._largest_output is not None
        largest = self._float64_range([_max_abs(accumulator)])
        return largest is not None and self._codes_fit(largest)

    def forward(self, accumulator: Tensor) -> Tensor:
        if self._in_float64(accumulator):
            codes = self._rescaled_float64(self._integer_accumulator(accumulator)).round_()
            codes.add_(_channel_view(self.zero_point.double(), codes, self.channel_dim))
            return codes.clamp_(self.qmin, self.qmax)
        codes = rounding_right_shift(self.scaled(accumulator), self.sfl)
        codes = codes + _channel_view(self.zero_point, codes, self.channel_dim)
        return codes.clamp(self.qmin, self.qmax).double()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, range=[{self.qmin}, {self.qmax}]"


class Quantize(nn.Module):
    """A real tensor onto a quantizer's grid: ``round_half_even(clamp(x / scale + zero_point))``
    computed in the input's dtype, exactly as the fake-quantized model computes it (so the
    integer model's first codes are the fake-quantized model's). The codes are returned as
    ``codes_dtype`` (float64 by default; float32 holds every code of a grid within ``2**24``,
    the dtype :class:`IntMatMul` computes in)."""

    def __init__(
        self,
        scale: Tensor,
        zero_point: Tensor,
        qmin: int,
        qmax: int,
        name: str = "",
        codes_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())
        self.qmin, self.qmax = int(qmin), int(qmax)
        if codes_dtype == torch.float32 and max(abs(self.qmin), abs(self.qmax)) > _EXACT_FLOAT32:
            raise BackendError(f"Quantize {name}: float32 can not hold codes in [{self.qmin}, {self.qmax}] exactly")
        self.name = name
        self.codes_dtype = codes_dtype
        self._zero: tuple[Tensor, int, bool] | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = x / self.scale.to(x.dtype)
        # adding a zero point of 0 changes no value: skipped
        if not self._zero_point_is_zero():
            y = y + self.zero_point.to(x.dtype)
        y.clamp_(self.qmin, self.qmax)
        # rounded in the input's dtype first: rounding a float32 conversion could differ
        return y.round_().to(self.codes_dtype)

    def _zero_point_is_zero(self) -> bool:
        """Whether every zero point is 0 (remembered until the buffer changes)."""
        zero_point = self.zero_point
        if self._zero is None or self._zero[0] is not zero_point or self._zero[1] != zero_point._version:
            self._zero = (zero_point, zero_point._version, not bool(zero_point.any()))
        return self._zero[2]

    def extra_repr(self) -> str:
        return f"range=[{self.qmin}, {self.qmax}]"


def integer_range(signed: bool, narrow_range: bool, bit_width: int) -> tuple[int, int]:
    """The codes a quantizer of ``bit_width`` bits uses."""
    if signed:
        return -(2 ** (bit_width - 1)) + int(narrow_range), 2 ** (bit_width - 1) - 1
    return 0, 2**bit_width - 1 - int(narrow_range)


def magnitude_bound(qmin: int, qmax: int, zero_point: float = 0.0) -> float:
    """The largest ``|code - zero_point|``."""
    return max(abs(qmin - zero_point), abs(qmax - zero_point))
