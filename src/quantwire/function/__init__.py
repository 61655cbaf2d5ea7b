"""Pure tensor functions quantizers are made of: straight-through estimators, integer ranges and
minifloat helpers. Everything here is TorchScript-compatible and free of module state."""

from quantwire.function.int_range import int_scaling_divisor, max_int, min_int
from quantwire.function.minifloat import (
    minifloat_max_value,
    minifloat_min_normal_exponent,
    minifloat_saturate,
    minifloat_step,
)
from quantwire.function.ste import (
    abs_binary_sign_grad,
    binary_sign,
    binary_sign_ste,
    ceil_ste,
    floor_ste,
    round_ste,
    round_to_zero_ste,
    scalar_clamp_min_ste,
    scalar_clamp_ste,
    stochastic_round_ste,
    tensor_clamp,
    tensor_clamp_ste,
    ternary_sign_ste,
)

__all__ = [
    "abs_binary_sign_grad",
    "binary_sign",
    "binary_sign_ste",
    "ceil_ste",
    "floor_ste",
    "int_scaling_divisor",
    "max_int",
    "min_int",
    "minifloat_max_value",
    "minifloat_min_normal_exponent",
    "minifloat_saturate",
    "minifloat_step",
    "round_ste",
    "round_to_zero_ste",
    "scalar_clamp_min_ste",
    "scalar_clamp_ste",
    "stochastic_round_ste",
    "tensor_clamp",
    "tensor_clamp_ste",
    "ternary_sign_ste",
]
