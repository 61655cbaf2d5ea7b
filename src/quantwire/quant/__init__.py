"""The catalogue of ready quantizers: declarations only.

Pass them to quant layers (``QuantLinear(..., weight_quant=Int8WeightPerChannelFloat)``) and
override any attribute through the layer's keyword arguments (``weight_bit_width=4``).
"""

from quantwire.quant.binary import *  # noqa: F403
from quantwire.quant.binary import __all__ as _binary
from quantwire.quant.fixed_point import *  # noqa: F403
from quantwire.quant.fixed_point import __all__ as _fixed_point
from quantwire.quant.float import *  # noqa: F403
from quantwire.quant.float import __all__ as _float
from quantwire.quant.per_group import *  # noqa: F403
from quantwire.quant.per_group import __all__ as _per_group
from quantwire.quant.per_token import *  # noqa: F403
from quantwire.quant.per_token import __all__ as _per_token
from quantwire.quant.scaled_int import *  # noqa: F403
from quantwire.quant.scaled_int import __all__ as _scaled_int
from quantwire.quant.shifted_scaled_int import *  # noqa: F403
from quantwire.quant.shifted_scaled_int import __all__ as _shifted_scaled_int
from quantwire.quant.ternary import *  # noqa: F403
from quantwire.quant.ternary import __all__ as _ternary

__all__ = sorted(
    {
        *_binary,
        *_fixed_point,
        *_float,
        *_per_group,
        *_per_token,
        *_scaled_int,
        *_shifted_scaled_int,
        *_ternary,
    }
)
