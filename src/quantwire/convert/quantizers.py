"""From :class:`~quantwire.convert.config.TensorQuant` settings to a quantizer declaration.

The settings choose a catalogue quantizer and compose the mixins the fields ask for (an
observer, an algorithm, power-of-two scales, a zero point) with
:func:`quantwire.inject.compose`, then apply bit width and options with ``.let``: the result is
an ordinary, picklable quantizer class, exactly what a user would have declared by hand.
"""

from __future__ import annotations

import importlib
from typing import Any

from quantwire.convert.config import TensorQuant, resolve_class
from quantwire.errors import QuantConfigError
from quantwire.inject import ExtendedInjector, compose, wireable_names
from quantwire.quant import base as mixins
from quantwire.quant import float as fp
from quantwire.quant import observers
from quantwire.quant import scaled_int as si
from quantwire.quant import shifted_scaled_int as shifted

__all__ = ["WEIGHT_KINDS", "quantizer_for"]

WEIGHT_KINDS = ("weight", "embedding", "norm")
"""Kinds whose tensors are parameters of the layer (quantized by a weight proxy)."""

_ACT_OBSERVERS = {
    "minmax": observers.MinMaxObserver,
    "ema": observers.EmaMinMaxObserver,
    "percentile": observers.PercentileObserver,
    "mse": observers.MSEObserver,
    "entropy": observers.EntropyObserver,
    "histogram": observers.HistogramObserver,
}


def quantizer_for(kind: str, settings: TensorQuant | None, where: str) -> type[ExtendedInjector] | None:
    """The quantizer declaration for a tensor of ``kind`` quantized as ``settings`` (None when
    not quantized). ``where`` (``"layer1.0.conv1.weight"``) names the tensor in errors."""
    if settings is None:
        return None
    where = f"{where} ({kind})"
    if settings.quantizer is not None:
        quantizer = _named_quantizer(settings.quantizer, where)
        return _let(quantizer, _plain_overrides(settings), where)
    if kind == "bias":
        quantizer = _bias_quantizer(settings, where)
    elif kind in WEIGHT_KINDS:
        quantizer = _weight_quantizer(settings, where)
    else:
        quantizer = _act_quantizer(settings, where)
    return _let(quantizer, _plain_overrides(settings), where)


def _plain_overrides(settings: TensorQuant) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if settings.bit_width is not None:
        overrides["bit_width"] = settings.bit_width
    if settings.group_size is not None and settings.granularity == "group":
        overrides["group_size"] = settings.group_size
    overrides.update(settings.options)
    return overrides


def _let(quantizer: type[ExtendedInjector], overrides: dict[str, Any], where: str) -> type[ExtendedInjector]:
    names = wireable_names(quantizer)
    unknown = sorted(key for key in overrides if key not in names and key not in quantizer.__dependencies__)
    if unknown:
        raise QuantConfigError(
            f"{where}: {quantizer.__name__} has no attribute {unknown[0]!r} to set "
            f"(settable: {', '.join(sorted(names))})"
        )
    return quantizer.let(**overrides) if overrides else quantizer


def _named_quantizer(spec: Any, where: str) -> type[ExtendedInjector]:
    if isinstance(spec, str) and ":" not in spec and "." not in spec:
        catalogue = importlib.import_module("quantwire.quant")
        quantizer = getattr(catalogue, spec, None)
        if quantizer is None:
            raise QuantConfigError(f"{where}: quantizer {spec!r} is not in quantwire.quant (or give 'module:Name')")
    else:
        quantizer = resolve_class(spec, f"{where}: quantizer")
    if not (isinstance(quantizer, type) and issubclass(quantizer, ExtendedInjector)):
        raise QuantConfigError(f"{where}: quantizer {spec!r} is not a quantizer class (an ExtendedInjector)")
    return quantizer


def _refuse(where: str, settings: TensorQuant, field: str, allowed: str) -> QuantConfigError:
    return QuantConfigError(f"{where}: {field}={getattr(settings, field)!r} is not available here ({allowed})")


def _weight_quantizer(settings: TensorQuant, where: str) -> type[ExtendedInjector]:
    fmt = settings.format or "int"
    granularity = settings.granularity or "tensor"
    method = settings.method or "rtn"
    if settings.dynamic:
        raise _refuse(where, settings, "dynamic", "weights are quantized from the weight itself")
    if settings.signed is not None:
        raise _refuse(where, settings, "signed", "weights are signed; set symmetric=False for a zero point")
    if granularity == "token":
        raise _refuse(where, settings, "granularity", "weights take tensor, channel or group")
    if method in ("pact", "qdrop", "lsq_plus"):
        raise _refuse(where, settings, "method", "weights take rtn, lsq or adaround")
    parts: list[type] = []
    if fmt != "int":
        if method != "rtn" or settings.symmetric is False or granularity == "group" or settings.scale == "po2":
            raise QuantConfigError(f"{where}: FP8 weights take granularity tensor or channel, symmetric, rtn")
        if granularity == "channel":
            base = fp.Fp8e4m3WeightPerChannelFloat if fmt == "fp8_e4m3" else fp.Fp8e5m2WeightPerChannelFloat
        else:
            base = fp.Fp8e4m3WeightPerTensorFloat if fmt == "fp8_e4m3" else fp.Fp8e5m2WeightPerTensorFloat
    else:
        base = si.Int8WeightPerChannelFloat if granularity == "channel" else si.Int8WeightPerTensorFloat
        if method == "lsq":
            parts += [mixins.LsqGradientScaling, mixins.ParameterFromWeightStatsScaling, mixins.MSEStats]
        elif method == "adaround":
            parts.append(mixins.AdaRoundLearnedRounding)
        if settings.scale == "po2":
            parts.append(mixins.PowerOfTwoScaling)
        if settings.symmetric is False:
            parts.append(mixins.ShiftedWeightZeroPoint)
        if granularity == "group":
            parts.append(mixins.PerGroupScaling)
    observer = settings.observer or "minmax"
    if observer == "mse":
        if mixins.MSEStats not in parts:
            parts.append(mixins.MSEStats)
    elif observer != "minmax":
        raise _refuse(where, settings, "observer", "weights take minmax or mse")
    quantizer = compose(*parts, base) if parts else base
    return quantizer.let(narrow_range=False) if settings.symmetric is False else quantizer


def _act_quantizer(settings: TensorQuant, where: str) -> type[ExtendedInjector]:
    fmt = settings.format or "int"
    granularity = settings.granularity or "tensor"
    method = settings.method or "rtn"
    asymmetric = settings.symmetric is False or method == "lsq_plus"
    if granularity in ("channel", "group"):
        raise _refuse(where, settings, "granularity", "activations take tensor or token")
    if method == "adaround":
        raise _refuse(
            where,
            settings,
            "method",
            "AdaRound learns weight rounding; activations take rtn, lsq, lsq_plus, pact or qdrop",
        )
    parts: list[type] = []
    if fmt != "int":
        if method != "rtn" or asymmetric or granularity != "tensor" or settings.scale == "po2":
            raise QuantConfigError(f"{where}: FP8 activations take granularity tensor, symmetric, rtn")
        base = fp.Fp8e4m3ActPerTensorFloat if fmt == "fp8_e4m3" else fp.Fp8e5m2ActPerTensorFloat
        if settings.dynamic:
            parts.append(mixins.DynamicPerTensorScaling)
        elif settings.observer is not None:
            parts.append(_ACT_OBSERVERS[settings.observer])
        return compose(*parts, base) if parts else base
    if asymmetric:
        if settings.signed:
            raise QuantConfigError(f"{where}: a zero-point (asymmetric) grid is unsigned; drop signed=True")
        base = shifted.ShiftedUint8ActPerTensorFloat
    else:
        base = si.Uint8ActPerTensorFloat if settings.signed is False else si.Int8ActPerTensorFloat
    if method == "pact":
        if settings.signed or asymmetric:
            raise QuantConfigError(f"{where}: PACT clips to [0, alpha]: an unsigned, symmetric grid")
        base = si.Uint8ActPerTensorFloat
        parts.append(mixins.PactClipping)
    elif method in ("lsq", "lsq_plus"):
        parts.append(mixins.LsqGradientScaling)
    elif method == "qdrop":
        parts.append(mixins.QuantDropMixin)
    if settings.scale == "po2":
        parts.append(mixins.PowerOfTwoScaling)
    if granularity == "token":
        if settings.dynamic is False or method in ("lsq", "lsq_plus"):
            if "num_tokens" not in settings.options:
                raise QuantConfigError(
                    f"{where}: static per-token scales (one per token position) need the number of tokens: "
                    "options: {num_tokens: N}; or use dynamic per-token scales (dynamic: true)"
                )
            parts.append(mixins.PerTokenPositionRuntimeStatsScaling)
        else:
            parts.append(mixins.DynamicPerTokenScaling)
    elif settings.dynamic:
        parts.append(mixins.DynamicPerTensorScaling)
    if settings.observer is not None:
        if settings.dynamic or (granularity == "token" and mixins.DynamicPerTokenScaling in parts):
            raise _refuse(where, settings, "observer", "a dynamic scale is computed from each tensor, not observed")
        if asymmetric and settings.observer != "minmax":
            raise _refuse(where, settings, "observer", "zero-point activations take minmax")
        parts.insert(0, observers.AsymmetricMinMaxObserver if asymmetric else _ACT_OBSERVERS[settings.observer])
    return compose(*parts, base) if parts else base


def _bias_quantizer(settings: TensorQuant, where: str) -> type[ExtendedInjector]:
    for name in ("granularity", "observer", "method", "format", "dynamic", "scale", "signed", "symmetric"):
        if getattr(settings, name) is not None:
            raise _refuse(where, settings, name, "biases take bit_width (their scale is input scale x weight scale)")
    return si.Int32Bias
