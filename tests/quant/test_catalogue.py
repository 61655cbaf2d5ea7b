"""Every quantizer of the catalogue (``quantwire.quant.__all__``) on every layer it applies to.

Weight quantizers go on every layer with a weight, activation quantizers on every activation
layer and as the input/output quantizer of Linear and Conv2d, bias quantizers on Linear and
Conv2d with a quantized input. Each returned QuantTensor must be valid and carry the declared
format, signedness and scale shape; the keyword overrides the catalogue advertises must take
effect.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import quantwire.quant as catalogue
from quantwire.errors import QuantConfigError
from quantwire.nn import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantHardTanh,
    QuantIdentity,
    QuantLayerNorm,
    QuantLinear,
    QuantReLU,
    QuantSigmoid,
    QuantTanh,
)
from quantwire.proxy import ActQuantProxyFromInjector, BiasQuantProxyFromInjector, WeightQuantProxyFromInjector
from quantwire.quant_tensor import FloatQuantTensor, IntQuantTensor, QuantTensor


def _names_with_proxy(proxy_class: type) -> list[str]:
    return [name for name in catalogue.__all__ if getattr(catalogue, name).proxy_class is proxy_class]


WEIGHT_QUANTIZERS = _names_with_proxy(WeightQuantProxyFromInjector)
ALL_ACT_QUANTIZERS = _names_with_proxy(ActQuantProxyFromInjector)
# Token-position quantizers need a fixed (batch, tokens, features) input: tested on their own below.
TOKEN_POSITION = {name for name in ALL_ACT_QUANTIZERS if "PerTokenLsq" in name}
ACT_QUANTIZERS = [name for name in ALL_ACT_QUANTIZERS if name not in TOKEN_POSITION]
BIAS_QUANTIZERS = _names_with_proxy(BiasQuantProxyFromInjector)

# Minifloat formats: (exponent bits, mantissa bits, largest finite value).
FP8_FORMATS = {"Fp8e4m3": (4, 3, 448.0), "Fp8e5m2": (5, 2, 57344.0), "Fp8e3m4": (3, 4, 15.5)}
FIXED_POINT = {name for name in catalogue.__all__ if "FixedPoint" in name}
# Binary and ternary quantizers: a constant scale (``scaling_init``), no bit width to choose.
CONST_SCALED = {name for name in catalogue.__all__ if "Binary" in name or "Ternary" in name}


def quantizer(name: str) -> type:
    return getattr(catalogue, name)


def fp8_format(name: str) -> tuple[int, int, float] | None:
    return next((fmt for prefix, fmt in FP8_FORMATS.items() if name.startswith(prefix)), None)


def declared_bit_width(name: str) -> int:
    if "Binary" in name:
        return 1
    if "Ternary" in name:
        return 2
    return int(quantizer(name).bit_width)


def declared_signed(name: str) -> bool:
    return bool(quantizer(name).signed)


def check_format(qt: QuantTensor, name: str, bit_width: int | None = None) -> None:
    """``qt`` is valid and has the format and signedness quantizer ``name`` declares."""
    assert qt.is_valid, f"{name}: invalid {qt!r}"
    assert qt.signed == declared_signed(name)
    fmt = fp8_format(name)
    if fmt is not None:
        assert isinstance(qt, FloatQuantTensor)
        assert qt.exponent_bit_width.item() == fmt[0] and qt.mantissa_bit_width.item() == fmt[1]
    else:
        assert isinstance(qt, IntQuantTensor)
        assert qt.bit_width.item() == (declared_bit_width(name) if bit_width is None else bit_width)


def is_power_of_two(t: Tensor) -> bool:
    log = torch.log2(t.double())
    return bool((log == log.round()).all())


def test_the_catalogue_is_partitioned_by_proxy() -> None:
    assert sorted(WEIGHT_QUANTIZERS + ALL_ACT_QUANTIZERS + BIAS_QUANTIZERS) == sorted(catalogue.__all__)
    assert set(BIAS_QUANTIZERS) == {"Int8Bias", "Int16Bias", "Int32Bias"}
    assert len(WEIGHT_QUANTIZERS) >= 10 and len(ACT_QUANTIZERS) >= 10


# -- weight quantizers ----------------------------------------------------------------------------

# Every weight has 64 elements along dim 1 so that per-group quantizers (group_size 32 along
# dim 1) divide it; ConvTranspose weights are (in, out / groups, k...), so they get 64 outputs.
WEIGHT_LAYERS: dict[str, tuple[Callable[..., nn.Module], Callable[[], Tensor]]] = {
    "QuantLinear": (lambda **kw: QuantLinear(64, 8, **kw), lambda: torch.randn(3, 64)),
    "QuantConv1d": (lambda **kw: QuantConv1d(64, 8, 3, **kw), lambda: torch.randn(2, 64, 7)),
    "QuantConv2d": (lambda **kw: QuantConv2d(64, 8, 3, **kw), lambda: torch.randn(2, 64, 5, 5)),
    "QuantConv3d": (lambda **kw: QuantConv3d(64, 8, 2, **kw), lambda: torch.randn(1, 64, 3, 3, 3)),
    "QuantConvTranspose1d": (lambda **kw: QuantConvTranspose1d(64, 8, 3, **kw), lambda: torch.randn(2, 64, 5)),
    "QuantConvTranspose2d": (lambda **kw: QuantConvTranspose2d(64, 8, 3, **kw), lambda: torch.randn(2, 64, 4, 4)),
    "QuantEmbedding": (lambda **kw: QuantEmbedding(10, 64, **kw), lambda: torch.tensor([[0, 3, 9], [3, 3, 1]])),
    "QuantLayerNorm": (lambda **kw: QuantLayerNorm(64, **kw), lambda: torch.randn(3, 64)),
}


def weight_combinations() -> list[Any]:
    combos = []
    for name in WEIGHT_QUANTIZERS:
        for layer in WEIGHT_LAYERS:
            marks = []
            if "PerGroup" in name and layer == "QuantLayerNorm":
                # A LayerNorm weight is 1-D: there is no dim 1 (input channels) to group along.
                marks.append(pytest.mark.skip(reason="per-group needs a weight with a dim 1"))
            if ("Pruned" in name or "2of4" in name) and layer == "QuantLayerNorm":
                # Pruning a normalisation's gains is not a use case; N:M needs a dim 1 too.
                marks.append(pytest.mark.skip(reason="pruning quantizers are for matrix weights"))
            combos.append(pytest.param(name, layer, id=f"{name}-{layer}", marks=marks))
    return combos


def output_channel_dim(layer: nn.Module) -> int:
    return getattr(layer, "output_channel_dim", 0)


def per_channel_shape(layer: nn.Module) -> tuple[int, ...]:
    shape = [1] * layer.weight.dim()
    dim = output_channel_dim(layer)
    shape[dim] = layer.weight.shape[dim]
    return tuple(shape)


def expected_scale_shape(name: str, layer: nn.Module, overrides: dict[str, Any]) -> tuple[int, ...]:
    if "PerGroup" in name:
        return tuple(layer.weight.shape)
    if "PerChannel" in name or overrides.get("weight_scaling_per_output_channel"):
        return per_channel_shape(layer)
    return ()


def channel_rows(t: Tensor, layer: nn.Module) -> Tensor:
    """``t`` (weight-shaped) as one row per output channel."""
    dim = output_channel_dim(layer)
    return torch.movedim(t, dim, 0).reshape(t.shape[dim], -1)


def layer_output_with(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """What the layer computes with ``weight`` as its (already quantized) weight."""
    if isinstance(layer, QuantEmbedding):
        return F.embedding(x, weight, layer.padding_idx)
    return layer.inner_forward(x, weight, layer.bias)


def check_weight_quant(name: str, layer_name: str, **overrides: Any) -> tuple[nn.Module, QuantTensor]:
    make_layer, make_input = WEIGHT_LAYERS[layer_name]
    torch.manual_seed(0)
    layer = make_layer(weight_quant=quantizer(name), **overrides)
    quant = layer.quant_weight()
    check_format(quant, name, overrides.get("weight_bit_width"))
    assert tuple(quant.scale.shape) == expected_scale_shape(name, layer, overrides)
    assert torch.equal(quant.value, layer.weight_quant.fake_quant(layer.weight))
    x = make_input()
    assert torch.allclose(layer(x), layer_output_with(layer, x, quant.value), atol=1e-6)
    return layer, quant


@pytest.mark.parametrize(("name", "layer_name"), weight_combinations())
def test_weight_quantizer_on_layer(name: str, layer_name: str) -> None:
    layer, quant = check_weight_quant(name, layer_name)
    weight = layer.weight.detach()
    if name in FIXED_POINT:
        assert is_power_of_two(quant.scale)
    if isinstance(quant, IntQuantTensor) and name not in CONST_SCALED and "MSE" not in name and quant.signed:
        # Symmetric abs-max quantizers put each channel's (group's) abs-max on the top code.
        codes = quant.int().double().abs()
        top = 2 ** (declared_bit_width(name) - 1) - 1
        if "PerGroup" in name:
            groups = torch.movedim(codes, layer.input_channel_dim, -1).reshape(-1, 32)
            assert bool((groups.amax(dim=1) == top).all())
        elif name in FIXED_POINT:
            # The power-of-two scale covers the abs-max: it lands in the upper half of the codes.
            assert codes.max() <= top and codes.max() > top // 2
        elif tuple(quant.scale.shape) == ():
            assert codes.max() == top
        else:
            assert bool((channel_rows(codes, layer).amax(dim=1) == top).all())
    fmt = fp8_format(name)
    if fmt is not None:
        absmax = weight.abs().amax() if quant.scale.dim() == 0 else channel_rows(weight.abs(), layer).amax(dim=1)
        assert torch.allclose(quant.scale.flatten(), (absmax / fmt[2]).flatten())
    if "Shifted" in name:
        assert bool((quant.int() >= 0).all()) and bool((quant.int() <= 255).all())
        low = min(weight.min().item(), 0.0)
        assert quant.zero_point.item() == round(-low / quant.scale.item())


INT_WEIGHT_QUANTIZERS = [n for n in WEIGHT_QUANTIZERS if n not in CONST_SCALED and fp8_format(n) is None]
NO_BIT_WIDTH_WEIGHT_QUANTIZERS = [n for n in WEIGHT_QUANTIZERS if n not in INT_WEIGHT_QUANTIZERS]


@pytest.mark.parametrize("name", INT_WEIGHT_QUANTIZERS)
@pytest.mark.parametrize("layer_name", ["QuantLinear", "QuantConv2d", "QuantConvTranspose2d", "QuantEmbedding"])
def test_weight_bit_width_override(name: str, layer_name: str) -> None:
    _, quant = check_weight_quant(name, layer_name, weight_bit_width=4)
    codes = quant.int()
    if quant.signed:
        assert int(codes.abs().max()) <= 7
        if name not in FIXED_POINT and "MSE" not in name:
            assert int(codes.abs().max()) == 7
    else:
        assert int(codes.max()) <= 15 and int(codes.min()) >= 0


@pytest.mark.parametrize("name", NO_BIT_WIDTH_WEIGHT_QUANTIZERS)
def test_weight_bit_width_override_is_refused_where_the_format_fixes_it(name: str) -> None:
    with pytest.raises(QuantConfigError, match="weight_bit_width"):
        QuantLinear(64, 8, weight_quant=quantizer(name), weight_bit_width=4)


SIGNED_ABSMAX_INT_WEIGHT_QUANTIZERS = [
    n for n in INT_WEIGHT_QUANTIZERS if "Shifted" not in n and "MSE" not in n and n not in FIXED_POINT
]


@pytest.mark.parametrize("name", SIGNED_ABSMAX_INT_WEIGHT_QUANTIZERS)
def test_weight_narrow_range_override(name: str) -> None:
    bits = declared_bit_width(name)
    for narrow_range, lowest in ((True, -(2 ** (bits - 1)) + 1), (False, -(2 ** (bits - 1)))):
        torch.manual_seed(0)
        layer = QuantLinear(64, 8, weight_quant=quantizer(name), weight_narrow_range=narrow_range)
        with torch.no_grad():
            layer.weight.copy_(-layer.weight.abs())  # the abs-max of every channel/group is negative
        quant = layer.quant_weight()
        assert quant.is_valid
        assert int(quant.int().min()) == lowest
        # Every channel (group) reaches the lowest code: each has its own abs-max scale.
        rows = quant.int().reshape(-1, 32) if "PerGroup" in name else quant.int()
        if "PerTensor" not in name:
            assert bool((rows.amin(dim=1) == lowest).all())


PER_TENSOR_WEIGHT_QUANTIZERS = [n for n in WEIGHT_QUANTIZERS if "PerTensor" in n and n not in CONST_SCALED]


@pytest.mark.parametrize("name", PER_TENSOR_WEIGHT_QUANTIZERS)
@pytest.mark.parametrize("layer_name", ["QuantLinear", "QuantConv2d", "QuantConvTranspose1d", "QuantEmbedding"])
def test_weight_per_channel_override(name: str, layer_name: str) -> None:
    layer, quant = check_weight_quant(name, layer_name, weight_scaling_per_output_channel=True)
    assert tuple(quant.scale.shape) == per_channel_shape(layer)
    with torch.no_grad():  # channels whose abs-max are powers of two apart get scales apart
        shape = per_channel_shape(layer)
        abs_max = channel_rows(layer.weight.abs(), layer).amax(dim=1).reshape(shape)
        magnitudes = 0.75 * 2.0 ** torch.arange(abs_max.numel(), dtype=torch.float32).reshape(shape)
        layer.weight.div_(abs_max).mul_(magnitudes)
    quant = layer.quant_weight()
    assert quant.is_valid
    assert quant.scale.unique().numel() == quant.scale.numel()


@pytest.mark.parametrize("name", sorted(CONST_SCALED & set(WEIGHT_QUANTIZERS)))
def test_const_weight_quantizers_refuse_per_channel(name: str) -> None:
    with pytest.raises(QuantConfigError, match="weight_scaling_per_output_channel"):
        QuantLinear(64, 8, weight_quant=quantizer(name), weight_scaling_per_output_channel=True)


@pytest.mark.parametrize("name", sorted(set(WEIGHT_QUANTIZERS) - CONST_SCALED))
def test_weight_scaling_min_val_override(name: str) -> None:
    layer = QuantLinear(64, 8, weight_quant=quantizer(name), weight_scaling_min_val=1e-3)
    with torch.no_grad():
        layer.weight.zero_()
    layer.init_quantizers()  # a learned (LSQ) scale starts from the weight it is built with
    quant = layer.quant_weight()
    assert quant.is_valid
    assert bool((quant.scale > 0).all())
    assert bool((quant.value == 0).all())
    fmt = fp8_format(name)
    if fmt is not None:
        expected = 1e-3 / fmt[2]
    elif name in FIXED_POINT:
        expected = 2.0 ** math.ceil(math.log2(1e-3)) / 2 ** (declared_bit_width(name) - 1)
    elif "Shifted" in name:
        expected = 1e-3 / (2 ** declared_bit_width(name) - 1)
    else:
        expected = 1e-3 / (2 ** (declared_bit_width(name) - 1) - 1)
    assert torch.allclose(quant.scale, torch.full_like(quant.scale, expected))


@pytest.mark.parametrize("name", sorted(CONST_SCALED & set(WEIGHT_QUANTIZERS)))
def test_const_weight_quantizers_scale_is_scaling_init(name: str) -> None:
    quant = QuantLinear(64, 8, weight_quant=quantizer(name), weight_scaling_init=0.25).quant_weight()
    assert quant.is_valid and quant.scale.item() == 0.25
    assert set(quant.value.unique().tolist()) <= {-0.25, 0.0, 0.25}


# -- activation quantizers ------------------------------------------------------------------------

ACT_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "QuantIdentity": QuantIdentity,
    "QuantReLU": QuantReLU,
    "QuantSigmoid": QuantSigmoid,
    "QuantTanh": QuantTanh,
    "QuantHardTanh": QuantHardTanh,
}
# (factory, prefix of its quantizer's keyword arguments, the proxy's attribute, input)
ACT_SITES: dict[str, tuple[Callable[..., nn.Module], str, str, Callable[[], Tensor]]] = {
    **{
        name: (lambda q, cls=cls, **kw: cls(act_quant=q, **kw), "", "act_quant", lambda: torch.randn(4, 16) * 2)
        for name, cls in ACT_LAYERS.items()
    },
    "QuantLinear.input_quant": (
        lambda q, **kw: QuantLinear(16, 8, input_quant=q, **kw),
        "input_",
        "input_quant",
        lambda: torch.randn(4, 16),
    ),
    "QuantLinear.output_quant": (
        lambda q, **kw: QuantLinear(16, 8, output_quant=q, **kw),
        "output_",
        "output_quant",
        lambda: torch.randn(4, 16),
    ),
    "QuantConv2d.input_quant": (
        lambda q, **kw: QuantConv2d(4, 6, 3, input_quant=q, **kw),
        "input_",
        "input_quant",
        lambda: torch.randn(2, 4, 6, 6),
    ),
    "QuantConv2d.output_quant": (
        lambda q, **kw: QuantConv2d(4, 6, 3, output_quant=q, **kw),
        "output_",
        "output_quant",
        lambda: torch.randn(2, 4, 6, 6),
    ),
}

RUNTIME_STATS_ACT_QUANTIZERS = [
    n
    for n in ACT_QUANTIZERS
    if "collect_stats_steps" in quantizer(n) and "high_percentile_q" in quantizer(n) and "DynamicPerToken" not in n
]


def build_act_site(name: str, site: str, **overrides: Any) -> tuple[nn.Module, Any, Tensor]:
    make, prefix, role, make_input = ACT_SITES[site]
    kwargs = {prefix + key: value for key, value in overrides.items()}
    if "MinMaxInit" in name and site != "QuantHardTanh":
        # The min/max-init quantizer reads the range a hard-tanh declares; elsewhere, pass it.
        kwargs.setdefault(prefix + "min_val", -2.0)
        kwargs.setdefault(prefix + "max_val", 2.0)
    if "QDrop" in name:
        # Dropped elements stay in float in training mode (what QDrop is for): off here, tested
        # in tests/algorithms/test_reconstruction.py.
        kwargs.setdefault(prefix + "quant_drop_prob", 0.0)
    torch.manual_seed(0)
    layer = make(quantizer(name), return_quant_tensor=True, **kwargs)
    return layer, getattr(layer, role), make_input()


def quantized_activation(layer: nn.Module, proxy: Any, site: str, x: Tensor) -> QuantTensor:
    """The QuantTensor the proxy produced for ``x`` (the layer's output where it is one)."""
    output = layer(x)
    if site.endswith("input_quant"):
        quant = proxy(x)
        assert torch.equal(quant.value, proxy.fake_quant(x))
        return quant
    assert isinstance(output, QuantTensor)
    return output


def expected_act_scale_shape(name: str, quant: QuantTensor) -> tuple[int, ...]:
    if "PerToken" in name:
        return (*quant.shape[:-1], 1)
    return ()


@pytest.mark.parametrize("site", list(ACT_SITES))
@pytest.mark.parametrize("name", ACT_QUANTIZERS)
def test_act_quantizer_at_site(name: str, site: str) -> None:
    layer, proxy, x = build_act_site(name, site, collect_stats_steps=2)
    layer.train()
    for step in range(3):
        quant = quantized_activation(layer, proxy, site, x * (step + 1))
        check_format(quant, name)
        assert tuple(quant.scale.shape) == expected_act_scale_shape(name, quant)
        if name in FIXED_POINT:
            assert is_power_of_two(quant.scale)
    layer.eval()
    with torch.no_grad():
        quant = quantized_activation(layer, proxy, site, x)
        check_format(quant, name)
        if name in FIXED_POINT:
            assert is_power_of_two(quant.scale)
        assert torch.equal(proxy.scale(), quant.scale)
    # The fast path (no QuantTensor) computes the same values.
    with torch.no_grad():
        output = layer(x)
        layer.return_quant_tensor = False
        fast = layer(x)
    assert isinstance(fast, Tensor)
    assert torch.equal(fast, output.value if isinstance(output, QuantTensor) else output)


INT_ACT_QUANTIZERS = [n for n in ACT_QUANTIZERS if n not in CONST_SCALED and fp8_format(n) is None]


@pytest.mark.parametrize("site", ["QuantIdentity", "QuantReLU", "QuantHardTanh", "QuantConv2d.output_quant"])
@pytest.mark.parametrize("name", INT_ACT_QUANTIZERS)
def test_act_bit_width_override(name: str, site: str) -> None:
    layer, proxy, x = build_act_site(name, site, bit_width=4)
    quant = quantized_activation(layer, proxy, site, x)
    check_format(quant, name, bit_width=4)
    low, high = (-8, 7) if quant.signed else (0, 15)
    codes = quant.int()
    assert int(codes.min()) >= low and int(codes.max()) <= high


@pytest.mark.parametrize("name", sorted(set(ACT_QUANTIZERS) - set(INT_ACT_QUANTIZERS)))
def test_act_bit_width_override_is_refused_where_the_format_fixes_it(name: str) -> None:
    with pytest.raises(QuantConfigError, match="bit_width"):
        QuantIdentity(act_quant=quantizer(name), bit_width=4)


def divisor(name: str) -> float:
    """What the collected threshold is divided by to give the scale."""
    fmt = fp8_format(name)
    if fmt is not None:
        return fmt[2]
    bits = declared_bit_width(name)
    if name in FIXED_POINT:  # max_int + 1: a power of two
        return 2.0 ** (bits - 1) if declared_signed(name) else 2.0**bits
    return 2.0 ** (bits - 1) if declared_signed(name) else 2.0**bits - 1


def is_asymmetric(name: str) -> bool:
    """Zero-point activation quantizers: the range is ``[min(x, 0), max(x, 0)]``."""
    return "Shifted" in name or "LsqPlus" in name


def is_observer(name: str) -> bool:
    """A cross-batch observer (quantwire.quant.observers): the running value is its last answer."""
    return getattr(quantizer(name), "scaling_stats_momentum", None) == 1.0


@pytest.mark.parametrize("name", RUNTIME_STATS_ACT_QUANTIZERS)
def test_runtime_stats_become_a_learned_scale(name: str) -> None:
    steps = 3
    overrides: dict[str, Any] = {"collect_stats_steps": steps, "high_percentile_q": 100.0}
    if is_asymmetric(name):
        overrides["low_percentile_q"] = 0.0
    layer, proxy, _ = build_act_site(name, "QuantIdentity", **overrides)
    stats = proxy.tensor_quant.scaling_impl.stats
    torch.manual_seed(1)
    batches = [torch.randn(8, 16) * (i + 1) + 0.5 for i in range(steps)]
    layer.train()
    for batch in batches[:-1]:
        layer(batch)
        assert stats.is_collecting()
    layer.eval()
    layer(batches[0] * 100)  # eval calls do not count as collection steps
    layer.train()
    layer(batches[-1])
    assert not stats.is_collecting()
    assert isinstance(stats.value, nn.Parameter) and stats.value.requires_grad
    if is_observer(name):
        observer = quantizer(name).let(**overrides).scaling_stats_impl
        thresholds = [observer(b.reshape(1, -1)).reshape(()) for b in batches][-1:]
    elif is_asymmetric(name):
        thresholds = [b.clamp_min(0).max() - b.clamp_max(0).min() for b in batches]
    elif "MSE" in name:
        thresholds = [stats.runtime_stats.stats(b).reshape(()) for b in batches]
    else:
        thresholds = [b.abs().max() for b in batches]
    collected = torch.stack(thresholds).mean()
    restrict = stats.restrict_value_impl
    assert torch.allclose(stats.value.detach(), restrict.restrict_init_tensor(collected))
    quant = layer(batches[0])
    expected = collected / divisor(name)
    if name in FIXED_POINT:
        expected = 2.0 ** torch.ceil(torch.log2(collected)) / divisor(name)
    assert torch.allclose(quant.scale, expected)
    # Learned: the scale gets a gradient, and an optimizer step moves it. (Inputs beyond the
    # range: PACT's clipping level learns only from those.)
    layer(batches[0] * 4).value.pow(2).sum().backward()
    assert stats.value.grad is not None and bool(stats.value.grad.abs().sum() > 0)
    before = stats.value.detach().clone()
    torch.optim.SGD([stats.value], lr=0.1).step()
    assert not torch.equal(stats.value.detach(), before)
    if name not in FIXED_POINT:  # (a power-of-two scale moves only when the exponent crosses an integer)
        assert not torch.equal(layer(batches[0]).scale, quant.scale)


@pytest.mark.parametrize("name", RUNTIME_STATS_ACT_QUANTIZERS)
def test_high_percentile_q_override(name: str) -> None:
    x = torch.arange(1, 1001, dtype=torch.float32)  # |x| percentiles are exact ranks
    scales = {}
    for q in (100.0, 50.0):
        overrides: dict[str, Any] = {"high_percentile_q": q, "collect_stats_steps": 1}
        if is_asymmetric(name):
            overrides["low_percentile_q"] = 0.0
        layer, proxy, _ = build_act_site(name, "QuantIdentity", **overrides)
        scales[q] = layer(x).scale.detach()
    if "MSE" in name or is_observer(name):
        # The MSE search and the observers ignore the percentile.
        return
    ratio = (scales[100.0] / scales[50.0]).item()
    if name in FIXED_POINT:
        assert ratio == 2.0  # 1000 vs 500: the power-of-two ceilings are 1024 and 512
    else:
        assert ratio == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize("name", sorted(set(ACT_QUANTIZERS) - CONST_SCALED - {"Int8ActPerTensorFloatMinMaxInit"}))
def test_act_scaling_min_val_override(name: str) -> None:
    layer, proxy, _ = build_act_site(name, "QuantIdentity", scaling_min_val=1e-3)
    quant = layer(torch.zeros(3, 16))
    assert quant.is_valid and bool((quant.value == 0).all())
    expected = 1e-3 / divisor(name)
    if name in FIXED_POINT:
        expected = 2.0 ** math.ceil(math.log2(1e-3)) / divisor(name)
    assert torch.allclose(quant.scale, torch.full_like(quant.scale, expected))


def test_min_max_init_follows_the_hard_tanh_range() -> None:
    layer = QuantHardTanh(-0.5, 3.0, act_quant=catalogue.Int8ActPerTensorFloatMinMaxInit, return_quant_tensor=True)
    quant = layer(torch.randn(5, 5) * 4)
    assert quant.is_valid and quant.scale.item() == pytest.approx(3.0 / 128)
    assert isinstance(layer.act_quant.tensor_quant.scaling_impl.value, nn.Parameter)


@pytest.mark.parametrize("name", sorted(TOKEN_POSITION))
@pytest.mark.parametrize("site", ["QuantIdentity", "QuantLinear.input_quant"])
def test_token_position_quantizer_at_site(name: str, site: str) -> None:
    """One scale per token position of a (batch, tokens, features) activation, collected over the
    first steps and then learned; 2-D (tokens, features) inputs broadcast the same way."""
    make, prefix, role, _ = ACT_SITES[site]
    layer = make(
        quantizer(name), return_quant_tensor=True, **{f"{prefix}num_tokens": 5, f"{prefix}collect_stats_steps": 2}
    )
    proxy = getattr(layer, role)
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16).expand(3, 5, 16) * torch.arange(1, 6).reshape(1, 5, 1)
    layer.train()
    for step in range(3):
        quant = proxy(x * (step + 1))
        check_format(quant, name)
        assert quant.scale.numel() == 5 and quant.shape == x.shape
    layer.eval()
    with torch.no_grad():
        quant = proxy(x)
        assert quant.scale.shape == (5, 1)
        scales = quant.scale.flatten()
        assert bool((scales[1:] > scales[:-1]).all())  # token t's values grow with t
        assert proxy(x[0]).shape == (5, 16)


def test_per_token_scales_are_each_rows_abs_max() -> None:
    x = torch.randn(2, 3, 16)
    quant = QuantIdentity(act_quant=catalogue.Int8ActDynamicPerTokenFloat, return_quant_tensor=True)(x)
    assert quant.is_valid and quant.scale.shape == (2, 3, 1)
    assert torch.allclose(quant.scale, x.abs().amax(dim=-1, keepdim=True) / 128)


# -- bias quantizers ------------------------------------------------------------------------------

BIAS_LAYERS: dict[str, tuple[Callable[..., nn.Module], Callable[[], Tensor], int]] = {
    "QuantLinear": (lambda **kw: QuantLinear(16, 8, **kw), lambda: torch.randn(4, 16), -1),
    "QuantConv2d": (lambda **kw: QuantConv2d(4, 6, 3, **kw), lambda: torch.randn(2, 4, 6, 6), 1),
}


@pytest.mark.parametrize("weight_quant", ["Int8WeightPerTensorFloat", "Int8WeightPerChannelFloat"])
@pytest.mark.parametrize("layer_name", list(BIAS_LAYERS))
@pytest.mark.parametrize("name", BIAS_QUANTIZERS)
def test_bias_quantizer_on_layer(name: str, layer_name: str, weight_quant: str) -> None:
    make, make_input, feature_dim = BIAS_LAYERS[layer_name]
    torch.manual_seed(0)
    layer = make(
        weight_quant=quantizer(weight_quant),
        input_quant=catalogue.Int8ActPerTensorFloat,
        bias_quant=quantizer(name),
        return_quant_tensor=True,
    )
    x = make_input()
    output = layer(x)
    quant_input, quant_weight = layer.input_quant(x), layer.quant_weight()
    quant_bias = layer.bias_quant(layer.bias, quant_input.scale, quant_weight.scale)
    check_format(quant_bias, name)
    expected_scale = (quant_input.scale * quant_weight.scale).reshape(-1)
    assert torch.allclose(quant_bias.scale.reshape(-1), expected_scale)
    assert quant_bias.scale.numel() in (1, layer.bias.numel())
    assert isinstance(output, IntQuantTensor) and output.is_valid
    assert output.signed
    channels = output.scale.reshape(-1).numel()
    assert channels in (1, output.shape[feature_dim])


@pytest.mark.parametrize("name", BIAS_QUANTIZERS)
def test_bias_bit_width_override(name: str) -> None:
    layer = QuantLinear(
        16,
        8,
        input_quant=catalogue.Int8ActPerTensorFloat,
        bias_quant=quantizer(name),
        bias_bit_width=12,
        return_quant_tensor=True,
    )
    x = torch.randn(4, 16)
    quant_input, quant_weight = layer.input_quant(x), layer.quant_weight()
    quant_bias = layer.bias_quant(layer.bias, quant_input.scale, quant_weight.scale)
    assert quant_bias.bit_width.item() == 12 and quant_bias.is_valid
