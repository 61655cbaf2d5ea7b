"""The integer range of a bit width: ``min_int`` and ``max_int``.

Signed ``b``-bit integers span ``[-2^(b-1), 2^(b-1) - 1]``, unsigned ones ``[0, 2^b - 1]``.
Narrow range drops one code so that the range is symmetric for signed integers
(``[-127, 127]`` at 8 bits) and ends one lower for unsigned ones (``[0, 254]``).
"""

from torch import Tensor


def max_int(signed: bool, narrow_range: bool, bit_width: Tensor) -> Tensor:
    """The largest integer of the range, as a tensor like ``bit_width``."""
    if signed:
        return 2.0 ** (bit_width - 1) - 1
    if narrow_range:
        return 2.0**bit_width - 2
    return 2.0**bit_width - 1


def min_int(signed: bool, narrow_range: bool, bit_width: Tensor) -> Tensor:
    """The smallest integer of the range, as a tensor like ``bit_width``."""
    if not signed:
        return bit_width * 0.0
    if narrow_range:
        return -(2.0 ** (bit_width - 1)) + 1
    return -(2.0 ** (bit_width - 1))


def int_scaling_divisor(signed: bool, narrow_range: bool, bit_width: Tensor) -> Tensor:
    """What a quantizer's threshold is divided by to get its scale: the magnitude of the
    range's far end (``2^(b-1)`` signed, ``2^(b-1) - 1`` signed narrow, ``max_int`` unsigned),
    so that the threshold is the largest magnitude the integer range reaches."""
    if signed:
        return -min_int(signed, narrow_range, bit_width)
    return max_int(signed, narrow_range, bit_width)
