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
from quantwire.quant.gradient import *  # noqa: F403
from quantwire.quant.gradient import __all__ as _gradient_all
from quantwire.quant.observers import *  # noqa: F403
from quantwire.quant.observers import __all__ as _observers_all
from quantwire.quant.per_group import *  # noqa: F403
from quantwire.quant.per_group import __all__ as _per_group
from quantwire.quant.per_token import *  # noqa: F403
from quantwire.quant.per_token import __all__ as _per_token
from quantwire.quant.pruning import *  # noqa: F403
from quantwire.quant.pruning import __all__ as _pruning
from quantwire.quant.ptq import *  # noqa: F403
from quantwire.quant.ptq import __all__ as _ptq
from quantwire.quant.qat import *  # noqa: F403
from quantwire.quant.qat import __all__ as _qat
from quantwire.quant.scaled_int import *  # noqa: F403
from quantwire.quant.scaled_int import __all__ as _scaled_int
from quantwire.quant.shifted_scaled_int import *  # noqa: F403
from quantwire.quant.shifted_scaled_int import __all__ as _shifted_scaled_int
from quantwire.quant.ternary import *  # noqa: F403
from quantwire.quant.ternary import __all__ as _ternary

# Layer quantizers only: observer mixins and gradient formats stay in their modules.
_observers = [name for name in _observers_all if not name.endswith("Observer")]
_gradient = [name for name in _gradient_all if not name.endswith("GradPerTensorFloat")]

__all__ = sorted(
    {
        *_binary,
        *_fixed_point,
        *_float,
        *_gradient,
        *_observers,
        *_per_group,
        *_per_token,
        *_ptq,
        *_pruning,
        *_qat,
        *_scaled_int,
        *_shifted_scaled_int,
        *_ternary,
    }
)
