"""Integer-only softmax, GELU and LayerNorm for the integer backend (I-BERT).

The integer backend keeps a transformer's nonlinearities in floating point by default; the
functions here are the integer-only option of I-BERT (Kim et al. 2021, "I-BERT: Integer-only
BERT Quantization"), written from the paper's equations:

- :func:`int_exp`: ``exp(x)`` for ``x <= 0`` by range reduction ``x = p - z ln2`` (``p`` in
  ``(-ln2, 0]``), the second-order polynomial ``exp(p) ~ 0.3585 (p + 1.353)**2 + 0.344`` and a
  right shift by ``z``;
- :func:`int_softmax`: the maximum subtracted, :func:`int_exp`, one integer reciprocal of the row
  sum and a multiply-shift onto ``output_bits`` unsigned bits;
- :func:`int_gelu`: ``x/2 (1 + erf(x/sqrt 2))`` with the i-erf polynomial
  ``erf(u) ~ sgn(u) [-0.2888 (min(|u|, 1.769) - 1.769)**2 + 1]``;
- :func:`int_layer_norm`: mean and variance from integer sums, the standard deviation from
  :func:`int_sqrt` (Newton's method, exact floor square root of any int64), the normalised value
  by a rounded integer division, then the affine part in fixed point.

Conventions. A tensor of integer codes ``q`` with a real ``scale`` stands for ``q * scale``
(``scale`` one positive real number per tensor). Codes may come as an integer tensor or a float64
tensor holding integers (the backend's carrier); the kernels compute in int64 and return
``(q_out, scale_out)`` with int64 codes and a Python float scale. Every per-element operation is
integer arithmetic (add, multiply, shift, floor division, comparison); floating point is used
only on scalar constants derived from the scales and parameters, as I-BERT does at "compile"
time. Rounding is to the nearest integer, ties to even (the backend's
:data:`~quantwire.backend.fixed_point.ROUNDING`), unless a docstring says otherwise.

Internal precision. The polynomials are evaluated on a *working grid* finer than (or as fine
as) the constants they use need: the input codes are shifted left by ``k`` bits (exact), or right
with rounding when the input grid is already finer than needed. ``k`` depends only on the scale.

Accuracy against float64 on the same grid inputs (bounds checked by
``tests/backend/test_nonlinear.py``): the polynomials dominate. ``exp`` is within -0.31 % /
+0.25 % relative; ``erf`` within 0.0962 absolute (its jump at 0), hence GELU within 0.0183
absolute (0.0188 with the working grid); softmax probabilities within
``2**-output_bits + 0.0056 p (1 - p) + 2e-5`` (at most 0.0053 with 8-bit outputs); LayerNorm
within half an output step plus ``|weight| (2**-21 + 2**-22 sqrt(n))``.

nn.Module wrappers (:class:`IntSoftmax`, :class:`IntGELU`, :class:`IntLayerNorm`) take real
(float64) inputs that lie on the grid of a known ``input_scale``, run the integer kernel and
return real float64 outputs; their ``forward_codes`` runs on codes for integer-only pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quantwire.backend.fixed_point import BackendError, fixed_point, fractional_bits_for

__all__ = [
    "ERF_POLYNOMIAL",
    "EXP_POLYNOMIAL",
    "EXP_ZERO_BELOW_HALVINGS",
    "LAYER_NORM_DEFAULT_OUTPUT_SCALE",
    "IntGELU",
    "IntLayerNorm",
    "IntSoftmax",
    "int_exp",
    "int_gelu",
    "int_layer_norm",
    "int_softmax",
    "int_sqrt",
]

EXP_POLYNOMIAL = (0.3585, 1.353, 0.344)
"""``(a, b, c)`` of ``exp(p) ~ a (p + b)**2 + c`` on ``p`` in ``[-ln2, 0]`` (I-BERT, eq. 10)."""

ERF_POLYNOMIAL = (-0.2888, -1.769)
"""``(a, b)`` of ``erf(u) ~ sgn(u) [a (min(|u|, -b) + b)**2 + 1]`` (I-BERT, eq. 8)."""

EXP_ZERO_BELOW_HALVINGS = 36
""":func:`int_exp` returns exactly 0 for inputs at or below ``-36 ln2`` (about -24.95): the
polynomial's value there, shifted right 36 times, rounds to 0 on the output grid."""

LAYER_NORM_DEFAULT_OUTPUT_SCALE = 2.0**-16
"""The output grid of :func:`int_layer_norm` when no ``output_scale`` is given."""

_LN2 = math.log(2.0)
_CODE_LIMIT = 2**62  # |codes| accepted: differences and sums of two codes stay in int64
_EXP_LN2_STEPS_BITS = 16  # the working grid puts between 2**15 and 2**16 steps in ln2
_EXP_SUM_LIMIT_BITS = 62  # the softmax reciprocal is floor(2**62 / row sum)
_ERF_CLIP_STEPS_BITS = 13  # the working grid puts between 2**12 and 2**13 steps in the erf clip 1.769
_GELU_CODE_LIMIT = 2**34  # |q| * (erf + 1) codes (< 2**28.2) must stay below 2**63
_SQRT_NEWTON_STEPS = 5  # proven sufficient for int64 from the power-of-two start (see int_sqrt)
_LAYER_NORM_STATS_BITS = 30  # rows are reduced so that n * max|q| <= 2**30: sums of squares fit
_LAYER_NORM_SQRT_BITS = 61  # the variance is shifted up to [2**59, 2**61) before its square root
_LAYER_NORM_Y_BITS = 20  # fractional bits of the normalised value (x - mean) / std
_LAYER_NORM_MULTIPLIER_BITS = 24  # signed bits of the fixed-point weight / output_scale
_LAYER_NORM_BIAS_BITS = 61  # |y * multiplier| < 2**54 and |bias_code| < 2**60: the sum fits int64
_LAYER_NORM_MAX_FEATURES = 2**22
_SCALE_RANGE = (2.0**-40, 2.0**40)  # input scales int_exp / int_gelu accept
_GRID_ABS_TOLERANCE = 1e-6  # steps: how far a real input may sit from its grid point
_GRID_REL_TOLERANCE = 2.0**-20  # relative to the code: covers inputs computed in float32


# --------------------------------------------------------------------------------------------
# validation helpers


def _scale_value(scale: float | Tensor, what: str) -> float:
    """``scale`` as a Python float; :class:`BackendError` unless it is one finite positive number."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            shape = tuple(scale.shape)
            raise BackendError(f"{what}: the scale must be a single number (per-tensor), got shape {shape}")
        scale = float(scale.detach().reshape(()))
    value = float(scale)
    if not math.isfinite(value) or value <= 0.0:
        raise BackendError(f"{what}: the scale must be finite and positive, got {value!r}")
    return value


def _codes(q: Tensor, what: str, limit: int = _CODE_LIMIT) -> Tensor:
    """``q`` as int64 codes; :class:`BackendError` naming the first bad value when a float code is
    not a finite integer, or when a code's magnitude exceeds ``limit``."""
    if not isinstance(q, Tensor):
        raise BackendError(f"{what}: codes must be a tensor, got {type(q).__name__}")
    if q.dtype == torch.bool or q.is_complex():
        raise BackendError(f"{what}: codes must be integers, got dtype {q.dtype}")
    if q.is_floating_point():
        q = q.double()
        bad = (q != torch.round(q)) | (q.abs() > limit)  # NaN fails the first test, inf the second
        if bool(bad.any()):
            value = float(q[bad][0])
            if not math.isfinite(value) or value != round(value):
                raise BackendError(f"{what}: codes must be finite integers, got {value!r}")
            raise BackendError(f"{what}: code {value:.17g} exceeds the magnitude limit {limit}")
        return q.to(torch.int64)
    q = q.to(torch.int64)
    too_big = (q > limit) | (q < -limit)
    if bool(too_big.any()):
        raise BackendError(f"{what}: code {int(q[too_big][0])} exceeds the magnitude limit {limit}")
    return q


def _real_to_codes(x: Tensor, scale: float, what: str, check_grid: bool, masked_below: int | None = None) -> Tensor:
    """``round(x / scale)`` as int64 for real ``x`` on the grid of ``scale``.

    With ``check_grid``, a :class:`BackendError` names the first input farther than
    ``1e-6 + 2**-20 |x / scale|`` steps from its grid point; otherwise off-grid inputs are
    rounded (half to even). With ``masked_below`` (softmax masks), ``-inf`` and codes below it
    become ``masked_below``; any other non-finite input is an error."""
    x = x.detach().double()
    steps = x / scale
    if masked_below is not None:
        steps = torch.where(steps < masked_below, torch.full_like(steps, float(masked_below)), steps)
    bad = ~torch.isfinite(steps)
    if bool(bad.any()):
        raise BackendError(f"{what}: input {float(x[bad][0])!r} is not finite")
    too_big = steps.abs() > _CODE_LIMIT
    if bool(too_big.any()):
        value = float(x[too_big][0])
        raise BackendError(f"{what}: input {value:.6g} is {value / scale:.6g} steps of {scale:.6g}, beyond 2**62")
    codes = torch.round(steps)
    if check_grid:
        off = (steps - codes).abs() > _GRID_ABS_TOLERANCE + _GRID_REL_TOLERANCE * codes.abs()
        if bool(off.any()):
            value = float(x[off][0])
            raise BackendError(
                f"{what}: input {value:.9g} is not on the grid of scale {scale:.9g} "
                f"({value / scale:.9g} steps); pass check_grid=False to round it"
            )
    return codes.to(torch.int64)


# --------------------------------------------------------------------------------------------
# integer building blocks


def _bit_length(x: Tensor) -> Tensor:
    """The number of bits of each non-negative int64 in ``x`` (0 for 0), by binary search."""
    length = torch.zeros_like(x)
    rest = x
    for step in (32, 16, 8, 4, 2, 1):
        high = rest >> step
        has_high = high > 0
        rest = torch.where(has_high, high, rest)
        length = length + has_high.to(torch.int64) * step
    return length + (rest > 0).to(torch.int64)


def _round_shift(x: Tensor, shift: int | Tensor) -> Tensor:
    """``x / 2**shift`` rounded half to even (as :func:`~quantwire.backend.fixed_point.rounding_right_shift`),
    for int64 ``|x| <= 2**62`` and shifts in ``[0, 62]``, one per element when ``shift`` is a tensor.

    ``(x + 2**(s-1) - 1 + odd) >> s``, ``odd`` the lowest bit kept: a remainder below half stays
    down, above half goes up, exactly half goes up only from an odd floor (5 integer ops)."""
    if isinstance(shift, int):
        if shift == 0:
            return x
        offset = (x >> shift).bitwise_and_(1).add_((1 << (shift - 1)) - 1)
        return offset.add_(x).bitwise_right_shift_(shift)
    half = (torch.ones_like(shift) << shift).bitwise_right_shift_(1)
    offset = half.sub_(1).add_((x >> shift).bitwise_and_(1)).clamp_(min=0)  # 0 when shift == 0
    return offset.add_(x).bitwise_right_shift_(shift)


def _rounding_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` rounded half to even, for int64 tensors with ``denominator > 0``
    (and ``2 * denominator`` within int64)."""
    floor = torch.div(numerator, denominator, rounding_mode="floor")
    twice_remainder = (numerator - floor * denominator) * 2
    round_up = (twice_remainder > denominator) | ((twice_remainder == denominator) & ((floor & 1) == 1))
    return floor + round_up.to(torch.int64)


def _shift_to_working_grid(q: Tensor, shift: int) -> Tensor:
    """Codes on a grid ``2**shift`` times finer: exact for ``shift >= 0``, rounded otherwise."""
    return q << shift if shift >= 0 else _round_shift(q, -shift)


def _working_shift(span: float, scale: float, steps_bits: int, what: str) -> int:
    """The shift ``k`` that puts between ``2**(steps_bits-1)`` and ``2**steps_bits`` steps of the
    working grid ``scale / 2**k`` in the real length ``span``; :class:`BackendError` when the
    scale is so coarse or so fine (beyond ``2**+-40``) that the shift would leave int64."""
    if not _SCALE_RANGE[0] <= scale <= _SCALE_RANGE[1]:
        raise BackendError(f"{what}: the scale {scale:.6g} is outside [2**-40, 2**40]")
    _, exponent = math.frexp(span / scale)  # span / scale in [2**(exponent-1), 2**exponent)
    return steps_bits - exponent


def int_sqrt(n: Tensor) -> Tensor:
    """The exact floor square root of non-negative integers ``n`` (int64 out), by Newton's method.

    The start ``x0 = 2**ceil(b/2)`` (``b`` the bit length of ``n``) lies in ``[sqrt n, 2 sqrt n]``,
    and each step ``x <- floor((x + floor(n / x)) / 2)`` never goes below ``floor(sqrt n)`` nor
    above the real Newton iterate, whose relative error obeys ``e' = e**2 / (2 (1 + e))``: from
    ``e0 <= 1`` it is below ``1.1e-15`` after 5 steps, i.e. below one unit for any
    ``sqrt n < 2**31.5``. So 5 steps (keeping the smaller iterate) leave ``floor(sqrt n)`` or one
    more, and a last comparison ``x > n // x`` (no product, hence no overflow) settles it.
    Raises :class:`BackendError` naming a negative input."""
    n = _codes(n, "int_sqrt", limit=2**63 - 1)
    negative = n < 0
    if bool(negative.any()):
        raise BackendError(f"int_sqrt: the input must be non-negative, got {int(n[negative][0])}")
    positive = torch.clamp(n, min=1)
    x = torch.ones_like(positive) << ((_bit_length(positive) + 1) >> 1)
    for _ in range(_SQRT_NEWTON_STEPS):
        x = torch.minimum(x, (x + positive // x) >> 1)
    x = x - (x > positive // x).to(torch.int64)
    return torch.where(n == 0, torch.zeros_like(x), x)


# --------------------------------------------------------------------------------------------
# exp and softmax


def int_exp(q: Tensor, scale: float | Tensor) -> tuple[Tensor, float]:
    """``exp(q * scale)`` for non-positive codes ``q``: ``(codes, scale_out)``, int64 codes.

    The input moves to a working grid ``s = scale / 2**k`` holding between 2**15 and 2**16 steps
    per ``ln2`` (``q << k``, exact; or rounded when ``scale`` is finer than that), the constant
    ``ln2 / s`` rounded to the nearest integer ``L``. Then ``z = floor(-q / L)`` and
    ``p = q + z L`` in ``(-L, 0]``; the polynomial ``(p + B)**2 + C`` (``B = round(b / s)``,
    ``C = round(c / (a s**2))``) is ``exp(p * s)`` on the grid ``a s**2``, and its right shift by
    ``z`` (rounded half to even) is ``exp(q * scale)``.

    Output grid: ``scale_out = a s**2`` (about ``2**-32`` to ``2**-34.5``); codes in
    ``[0, 2**35)``; exactly 0 at or below ``-36 ln2`` (:data:`EXP_ZERO_BELOW_HALVINGS`).
    Error: the polynomial's 0.31 % relative, plus ``2**-16`` relative per halving from ``L``
    and one output step. Raises :class:`BackendError` on a positive code or a bad scale."""
    scale = _scale_value(scale, "int_exp")
    q = _codes(q, "int_exp")
    positive = q > 0
    if bool(positive.any()):
        raise BackendError(f"int_exp: inputs must be <= 0 (subtract the maximum first), got code {int(q[positive][0])}")
    a, b, c = EXP_POLYNOMIAL
    shift = _working_shift(_LN2, scale, _EXP_LN2_STEPS_BITS, "int_exp")
    working_scale = scale * 2.0**-shift
    ln2_steps = round(_LN2 / working_scale)
    b_steps = round(b / working_scale)
    c_steps = round(c / (a * working_scale**2))
    # inputs below (cutoff + 1) ln2 all give 0: clamp them first so the shift can not overflow
    cutoff = EXP_ZERO_BELOW_HALVINGS + 1
    q = torch.clamp(q, min=-min(math.ceil(cutoff * _LN2 / scale) + 1, _CODE_LIMIT))
    working = _shift_to_working_grid(q, shift).clamp_(min=-cutoff * ln2_steps)
    halvings = torch.div(working, -ln2_steps, rounding_mode="floor")  # z = floor(-working / L)
    remainder = working.add_(halvings * ln2_steps)  # in (-L, 0], in place
    polynomial = remainder.add_(b_steps).square_().add_(c_steps)
    return _round_shift(polynomial, halvings), a * working_scale**2


def int_softmax(q: Tensor, scale: float | Tensor, dim: int = -1, output_bits: int = 8) -> tuple[Tensor, float]:
    """Softmax of ``q * scale`` along ``dim``: ``(codes, 2**-output_bits)``, int64 codes in
    ``[0, 2**output_bits - 1]`` (unsigned ``output_bits`` bits).

    The row maximum is subtracted (so masked positions, codes far below it, get exactly 0), the
    exponentials come from :func:`int_exp`, and each row's sum ``T`` gives one integer
    reciprocal ``R = floor(2**62 / T)``; a probability is ``e * R`` shifted right by
    ``62 - output_bits`` (rounded half to even, ``e * R <= 2**62``), clamped to the top code
    (a probability of 1 becomes ``1 - 2**-output_bits``).

    Error against a float softmax of the same input: at most ``2**-(output_bits+1)`` from the
    rounding (``2**-output_bits`` at the clamp), plus ``0.0056 p (1 - p)`` from the exp
    polynomial (its relative error spans 0.56 %, and a common factor cancels in the ratio),
    plus ``2**-27`` from the reciprocal. Rows may hold up to ``2**27`` elements."""
    scale = _scale_value(scale, "int_softmax")
    if not 1 <= output_bits <= 32:
        raise BackendError(f"int_softmax: output_bits must be in [1, 32], got {output_bits}")
    q = _codes(q, "int_softmax")
    if q.numel() == 0:
        return q, 2.0**-output_bits
    if q.shape[dim] > 2**27:
        raise BackendError(f"int_softmax: rows of {q.shape[dim]} elements exceed 2**27 (the row sums overflow)")
    shifted = (q - q.amax(dim=dim, keepdim=True)).clamp_(min=-_CODE_LIMIT)  # masked codes may reach -2**63
    exponentials, _ = int_exp(shifted, scale)
    row_sum = exponentials.sum(dim=dim, keepdim=True)  # >= exp(0)'s code > 0
    reciprocal = torch.div(torch.full_like(row_sum, 2**_EXP_SUM_LIMIT_BITS), row_sum, rounding_mode="floor")
    probabilities = _round_shift(exponentials * reciprocal, _EXP_SUM_LIMIT_BITS - output_bits)
    return torch.clamp(probabilities, max=2**output_bits - 1), 2.0**-output_bits


# --------------------------------------------------------------------------------------------
# GELU


def _int_erf(q: Tensor, scale: float) -> tuple[Tensor, int, float]:
    """I-BERT's erf of ``q * scale``: ``(codes, one, scale_out)``, ``one`` the code of 1.0.

    Working grid ``s = scale / 2**k`` with 2**12 to 2**13 steps in the clip point ``-b``; codes
    ``sgn(q) (one - (min(|q|, -B) + B)**2)`` with ``B = round(b / s)`` and
    ``one = round(1 / (|a| s**2))``, on the grid ``|a| s**2`` (a positive scale: the polynomial's
    negative ``a`` is folded into the sign). ``|codes| <= one < 2**28.2``."""
    a, b = ERF_POLYNOMIAL
    shift = _working_shift(-b, scale, _ERF_CLIP_STEPS_BITS, "int_gelu")
    working_scale = scale * 2.0**-shift
    b_steps = round(b / working_scale)
    one = round(1.0 / (-a * working_scale**2))
    # |q| beyond the clip point gives the same value: clamp before shifting (no overflow)
    magnitude = torch.clamp(q.abs(), max=min(math.ceil(-b / scale) + 1, _CODE_LIMIT))
    clipped = torch.clamp(_shift_to_working_grid(magnitude, shift), max=-b_steps)
    erf_magnitude = one - (clipped + b_steps) ** 2
    return torch.sign(q) * erf_magnitude, one, -a * working_scale**2


def int_gelu(q: Tensor, scale: float | Tensor) -> tuple[Tensor, float]:
    """GELU of ``q * scale``: ``(codes, scale_out)``, int64 codes.

    ``GELU(x) = x (1 + erf(x / sqrt 2)) / 2`` with the i-erf polynomial (:func:`_int_erf` on the
    codes ``q`` with scale ``scale / sqrt 2``): codes ``q (erf + one)``, computed exactly, on the
    grid ``scale_out = scale * s_erf / 2`` (``s_erf`` the erf grid, about ``2**-26`` to ``2**-28``
    of one). No rounding after the erf: the error is the polynomial's (at most 0.0183 absolute,
    near ``x = 2.35``; up to ``0.048 |x|`` for ``|x| < 0.1`` from the erf jump at 0) plus about
    ``4e-4`` from the working grid. Raises :class:`BackendError` for ``|q| > 2**34``."""
    scale = _scale_value(scale, "int_gelu")
    q = _codes(q, "int_gelu", limit=_GELU_CODE_LIMIT)
    erf, one, erf_scale = _int_erf(q, scale / math.sqrt(2.0))
    return q * (erf + one), scale * erf_scale / 2.0


# --------------------------------------------------------------------------------------------
# LayerNorm


def _normalized_dims(q: Tensor, normalized_shape: Sequence[int], what: str) -> tuple[int, ...]:
    """The trailing dimensions LayerNorm normalises over; :class:`BackendError` on a mismatch."""
    shape = tuple(normalized_shape)
    if not shape or tuple(q.shape[q.dim() - len(shape) :]) != shape:
        raise BackendError(f"{what}: input shape {tuple(q.shape)} does not end with normalized_shape {shape}")
    features = math.prod(shape)
    if features > _LAYER_NORM_MAX_FEATURES:
        raise BackendError(f"{what}: {features} features exceed 2**22")
    return tuple(range(q.dim() - len(shape), q.dim()))


def _normalize_codes(q: Tensor, scale: float, dims: tuple[int, ...], eps: float, what: str) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` as int64 with ``2**20`` steps per unit.

    With ``n`` features, ``d = n q - sum q`` (``n`` times the centred codes) and
    ``V = n sum q**2 - (sum q)**2`` (``n**2`` times the variance in steps squared) are exact; the
    result is ``d / sqrt(V + E)``, ``E = round(eps n**2 / scale**2)`` — independent of ``scale``
    apart from ``E``. The square root is :func:`int_sqrt` of ``V + E`` shifted up by ``2m`` bits
    into ``[2**59, 2**61)`` (per row), so the root carries 30 significant bits; the quotient
    ``(d << (m + 20)) / root`` is rounded half to even. Rows whose ``n max|q|`` exceeds ``2**30``
    are first shifted right (rounded) by the bits in excess, so the sums stay within int64."""
    features = math.prod(q.shape[d] for d in dims)
    largest = int(q.abs().max()) if q.numel() else 0
    excess = max(0, (largest * features).bit_length() - _LAYER_NORM_STATS_BITS)
    if excess:
        q = _round_shift(q, excess)
        scale = scale * 2.0**excess
    total = q.sum(dim=dims, keepdim=True)
    centred = features * q - total
    variance = features * (q * q).sum(dim=dims, keepdim=True) - total * total
    eps_steps = round(eps * features**2 / scale**2)
    if eps_steps > 2**60:
        raise BackendError(f"{what}: eps={eps!r} is {eps_steps:.3g} squared steps of scale {scale:.6g} (> 2**60)")
    variance = torch.clamp(variance + eps_steps, min=1)
    up = torch.clamp((_LAYER_NORM_SQRT_BITS - _bit_length(variance)) >> 1, min=0)
    root = int_sqrt(variance << (2 * up))
    return _rounding_divide(centred << (up + _LAYER_NORM_Y_BITS), root)


def _layer_norm_affine(
    weight: Tensor | None, bias: Tensor | None, shape: tuple[int, ...], output_scale: float, what: str
) -> tuple[Tensor, Tensor, int]:
    """LayerNorm's ``y * weight + bias`` onto the grid ``output_scale`` as integers:
    ``(multiplier, bias_code, shift)`` with ``codes = round((y_fixed * multiplier + bias_code) >> shift)``
    for ``y_fixed`` from :func:`_normalize_codes` (``2**20`` steps per unit). ``multiplier`` is
    ``weight / output_scale`` in 24 signed bits (fewer fractional bits when the bias needs the
    room), ``bias_code`` is ``bias / output_scale`` with ``shift`` fractional bits (61 signed bits)."""
    weight = torch.ones(shape, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
    bias = torch.zeros(shape, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    for name, value in (("weight", weight), ("bias", bias)):
        if tuple(value.shape) != shape:
            raise BackendError(f"{what}: {name} has shape {tuple(value.shape)}, expected {shape}")
        if not bool(torch.isfinite(value).all()):
            raise BackendError(f"{what}: {name} holds non-finite values")
    multiplier_real, bias_real = weight / output_scale, bias / output_scale
    # as many fractional bits as the multiplier's 24 bits allow, fewer if the bias needs them
    shift = min(
        _LAYER_NORM_Y_BITS + fractional_bits_for(multiplier_real, _LAYER_NORM_MULTIPLIER_BITS),
        fractional_bits_for(bias_real, _LAYER_NORM_BIAS_BITS),
        62,
    )
    if shift < 1:
        largest = max(float(multiplier_real.abs().max()), float(bias_real.abs().max()))
        raise BackendError(f"{what}: weight or bias / output_scale reaches {largest:.6g} output steps, too many")
    multiplier = fixed_point(multiplier_real, _LAYER_NORM_MULTIPLIER_BITS, shift - _LAYER_NORM_Y_BITS, f"{what} weight")
    bias_code = fixed_point(bias_real, _LAYER_NORM_BIAS_BITS, shift, f"{what} bias")
    return multiplier.value, bias_code.value, shift


def _check_output_bits(output_bits: int | None, what: str) -> None:
    if output_bits is not None and not 2 <= output_bits <= 62:
        raise BackendError(f"{what}: output_bits must be in [2, 62] or None, got {output_bits}")


def _apply_affine(
    normalized: Tensor, multiplier: Tensor, bias_code: Tensor, shift: int, output_bits: int | None
) -> Tensor:
    """The affine part in fixed point, rounded half to even, clamped to ``output_bits`` signed bits."""
    codes = _round_shift(normalized * multiplier.to(normalized.device) + bias_code.to(normalized.device), shift)
    if output_bits is not None:
        codes = torch.clamp(codes, -(2 ** (output_bits - 1)), 2 ** (output_bits - 1) - 1)
    return codes


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)


def int_layer_norm(
    q: Tensor,
    scale: float | Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    output_scale: float | Tensor | None = None,
    output_bits: int | None = None,
) -> tuple[Tensor, float]:
    """LayerNorm of ``q * scale`` over the trailing ``normalized_shape``: ``(codes, output_scale)``.

    Mean and variance come from exact integer sums, the standard deviation from :func:`int_sqrt`
    and the normalised value by a rounded integer division (see :func:`_normalize_codes`); then
    ``y * weight + bias`` in fixed point (24-bit ``weight / output_scale``), rounded half to even
    onto the grid ``output_scale`` (default :data:`LAYER_NORM_DEFAULT_OUTPUT_SCALE`), clamped to
    ``output_bits`` signed bits when given.

    Error against a float64 LayerNorm of the same input: half an output step, plus at most
    ``2**-21 |weight|`` from the normalised value, ``2**-23 |y weight|`` from the multiplier and
    ``2**-29.5 |y weight|`` from the square root. When ``n max|q| > 2**30`` (e.g. 32-bit codes),
    the codes are first shifted right by the ``e`` excess bits (rounded), which moves the
    normalised value by at most about ``(2 + |y|) 2**(e-1) scale / std``."""
    what = "int_layer_norm"
    scale = _scale_value(scale, what)
    output_scale = LAYER_NORM_DEFAULT_OUTPUT_SCALE if output_scale is None else _scale_value(output_scale, what)
    _check_output_bits(output_bits, what)
    if not (math.isfinite(eps) and eps >= 0):
        raise BackendError(f"{what}: eps must be finite and non-negative, got {eps!r}")
    shape = _as_shape(normalized_shape)
    q = _codes(q, what)
    dims = _normalized_dims(q, shape, what)
    multiplier, bias_code, shift = _layer_norm_affine(weight, bias, shape, output_scale, what)
    normalized = _normalize_codes(q, scale, dims, eps, what)
    return _apply_affine(normalized, multiplier, bias_code, shift, output_bits), output_scale


# --------------------------------------------------------------------------------------------
# modules


class _IntegerNonlinearity(nn.Module):
    """Shared plumbing: the input grid, real inputs to codes, codes to real outputs."""

    masked_below: int | None = None

    def __init__(self, input_scale: float | Tensor, check_grid: bool) -> None:
        super().__init__()
        self.input_scale = _scale_value(input_scale, type(self).__name__)
        self.check_grid = check_grid

    def forward_codes(self, q: Tensor) -> tuple[Tensor, float]:
        """The integer kernel on codes of the input grid: ``(int64 codes, output scale)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """The nonlinearity of real ``x`` (on the grid of ``input_scale``), as real float64."""
        codes = _real_to_codes(x, self.input_scale, type(self).__name__, self.check_grid, self.masked_below)
        q_out, scale_out = self.forward_codes(codes)
        return q_out.double() * scale_out

    def extra_repr(self) -> str:
        return f"input_scale={self.input_scale:.6g}, check_grid={self.check_grid}"


class IntSoftmax(_IntegerNonlinearity):
    """Integer-only softmax (:func:`int_softmax`) of real inputs on the grid ``input_scale``.

    Outputs lie on the grid ``2**-output_bits``. Masked scores (``-inf`` or anything below
    ``-2**62`` steps, e.g. ``finfo.min`` masks) are clamped to ``-2**62`` steps and get 0."""

    masked_below = -_CODE_LIMIT

    def __init__(
        self, input_scale: float | Tensor, output_bits: int = 8, dim: int = -1, check_grid: bool = True
    ) -> None:
        super().__init__(input_scale, check_grid)
        if not 1 <= output_bits <= 32:
            raise BackendError(f"IntSoftmax: output_bits must be in [1, 32], got {output_bits}")
        self.output_bits = output_bits
        self.dim = dim

    def forward_codes(self, q: Tensor) -> tuple[Tensor, float]:
        """Softmax probabilities as codes in ``[0, 2**output_bits - 1]`` and ``2**-output_bits``."""
        return int_softmax(q, self.input_scale, self.dim, self.output_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_bits={self.output_bits}, dim={self.dim}"


class IntGELU(_IntegerNonlinearity):
    """Integer-only GELU (:func:`int_gelu`, I-BERT's i-erf) of real inputs on the grid ``input_scale``."""

    def __init__(self, input_scale: float | Tensor, check_grid: bool = True) -> None:
        super().__init__(input_scale, check_grid)

    def forward_codes(self, q: Tensor) -> tuple[Tensor, float]:
        """GELU codes (exact products, no rounding) and their fine output scale."""
        return int_gelu(q, self.input_scale)


class IntLayerNorm(_IntegerNonlinearity):
    """Integer-only LayerNorm (:func:`int_layer_norm`) of real inputs on the grid ``input_scale``.

    ``weight / output_scale`` and ``bias / output_scale`` become fixed-point integers once, here
    (buffers ``multiplier`` and ``bias_code``, with ``shift`` fractional bits); outputs lie on the
    grid ``output_scale`` (default ``2**-16``), clamped to ``output_bits`` signed bits when given."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        eps: float = 1e-5,
        input_scale: float | Tensor = 1.0,
        output_scale: float | Tensor | None = None,
        output_bits: int | None = None,
        check_grid: bool = True,
    ) -> None:
        super().__init__(input_scale, check_grid)
        what = "IntLayerNorm"
        if not (math.isfinite(eps) and eps >= 0):
            raise BackendError(f"{what}: eps must be finite and non-negative, got {eps!r}")
        _check_output_bits(output_bits, what)
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = float(eps)
        if output_scale is None:
            output_scale = LAYER_NORM_DEFAULT_OUTPUT_SCALE
        self.output_scale = _scale_value(output_scale, what)
        self.output_bits = output_bits
        multiplier, bias_code, shift = _layer_norm_affine(weight, bias, self.normalized_shape, self.output_scale, what)
        self.register_buffer("multiplier", multiplier)
        self.register_buffer("bias_code", bias_code)
        self.shift = shift

    def forward_codes(self, q: Tensor) -> tuple[Tensor, float]:
        """LayerNorm codes on the grid ``output_scale`` and that scale."""
        what = "IntLayerNorm"
        q = _codes(q, what)
        dims = _normalized_dims(q, self.normalized_shape, what)
        normalized = _normalize_codes(q, self.input_scale, dims, self.eps, what)
        codes = _apply_affine(normalized, self.multiplier, self.bias_code, self.shift, self.output_bits)
        return codes, self.output_scale

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, {super().extra_repr()}, "
            f"output_scale={self.output_scale:.6g}, output_bits={self.output_bits}"
        )
