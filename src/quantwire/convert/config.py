"""The conversion config: which tensors of a model are quantized, and how.

A :class:`QuantConfig` holds one :class:`TensorQuant` per *kind* of tensor (matrix-product
weights, their inputs, attention operands, residual adds, ...) and a list of
:class:`Override` s that change those settings for the layers whose name matches a pattern or
whose type matches a class. It is written in Python::

    QuantConfig(weight=TensorQuant(bit_width=4, granularity="channel"), input=TensorQuant(bit_width=4),
                overrides=[Override(name="conv1", weight=TensorQuant(bit_width=8)), Override(name="fc", skip=True)])

or as a dict / YAML / JSON document with the same field names (MMRazor style)::

    weight: {bit_width: 4, granularity: channel}
    input: {bit_width: 4, observer: mse}
    overrides:
      - {name: conv1, weight: {bit_width: 8}, input: {bit_width: 8}}
      - {name: fc, skip: true}
      - {type: torch.nn.LayerNorm, norm: {bit_width: 8}}

An override changes only the fields it gives (``weight: {bit_width: 8}`` keeps the default's
granularity), ``null`` turns a kind off for the matched layers, and later overrides win.
:func:`preset` returns the common schemes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from quantwire.errors import QuantConfigError

__all__ = [
    "GRANULARITIES",
    "KINDS",
    "METHODS",
    "OBSERVERS",
    "Override",
    "QuantConfig",
    "TensorQuant",
    "preset",
    "PRESETS",
]

GRANULARITIES = ("tensor", "channel", "group", "token")
OBSERVERS = ("minmax", "ema", "percentile", "mse", "entropy", "histogram")
METHODS = ("rtn", "lsq", "lsq_plus", "pact", "adaround", "qdrop")
FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")
SCALES = ("float", "po2")

KINDS = ("weight", "input", "output", "bias", "activation", "residual", "attention", "embedding", "norm")
"""The kinds of tensors a config sets, each a :class:`TensorQuant` or None (not quantized):

- ``weight``: weights of matrix products (``Linear``, ``Conv*``, attention projections);
- ``input``: inputs of those matrix products;
- ``output``: their outputs (None by default: the next layer's input quantizer does it);
- ``bias``: their biases (None: biases stay float, as an integer kernel adds them at accumulator precision);
- ``activation``: outputs of activation layers (``ReLU`` & co; None leaves them float);
- ``residual``: the operands of residual additions (one grid for both, so the sum stays on it);
- ``attention``: ``Q`` (pre-scaled), ``Kᵀ`` and ``V`` of attention matrix products (the
  attention probabilities take ``attention_probs``);
- ``embedding``: embedding tables;
- ``norm``: ``LayerNorm`` affine weights (None leaves normalisation layers float).
"""


@dataclass(frozen=True)
class TensorQuant:
    """How one kind of tensor is quantized. Fields left None take the quantizer's own value.

    - ``bit_width``: integer bit width (2..16 for weights and activations, up to 32 for biases);
    - ``symmetric``: False adds a zero point (asymmetric, unsigned grid);
    - ``signed``: activations only; False for non-negative tensors (e.g. after ReLU);
    - ``granularity``: ``tensor``, ``channel`` (weights: one scale per output channel),
      ``group`` (weights: ``group_size`` input channels share a scale), ``token``
      (activations: one scale per token, dynamic unless ``method`` is ``lsq``);
    - ``scale``: ``float`` or ``po2`` (power-of-two scales, for shift-only hardware);
    - ``observer``: how activation statistics are gathered during calibration
      (``minmax``, ``ema``, ``percentile``, ``mse``, ``entropy``, ``histogram``; weights take
      ``minmax`` or ``mse``);
    - ``method``: ``rtn`` (round to nearest), ``lsq`` (learned step size), ``lsq_plus``
      (learned step and offset), ``pact`` (learned clipping), ``adaround`` (learned rounding,
      weights), ``qdrop`` (random quantization dropping, activations);
    - ``format``: ``int``, ``fp8_e4m3`` or ``fp8_e5m2``;
    - ``dynamic``: activations only: the scale is recomputed from every tensor (as
      ``torch.ao.quantization.quantize_dynamic`` does) instead of calibrated;
    - ``quantizer``: a quantizer class, or its name in :mod:`quantwire.quant`, or
      ``"package.module:Name"``: used as it is (the fields above that are set are applied to it);
    - ``options``: any other attribute of the quantizer, applied with ``.let(**options)``.
    """

    bit_width: int | None = None
    symmetric: bool | None = None
    signed: bool | None = None
    granularity: str | None = None
    group_size: int | None = None
    scale: str | None = None
    observer: str | None = None
    method: str | None = None
    format: str | None = None
    dynamic: bool | None = None
    quantizer: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("observer", self.observer, OBSERVERS)
        _check_choice("method", self.method, METHODS)
        _check_choice("format", self.format, FORMATS)
        _check_choice("scale", self.scale, SCALES)
        if self.bit_width is not None and (
            isinstance(self.bit_width, bool) or not isinstance(self.bit_width, int) or not 1 <= self.bit_width <= 32
        ):
            raise QuantConfigError(f"TensorQuant.bit_width must be an integer in [1, 32], got {self.bit_width!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise QuantConfigError(f"TensorQuant.group_size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.options, Mapping):
            raise QuantConfigError(f"TensorQuant.options must be a mapping, got {self.options!r}")

    def merged(self, update: TensorQuant | Mapping[str, Any]) -> TensorQuant:
        """These settings with the fields ``update`` sets replaced (options are merged)."""
        changes = update if isinstance(update, Mapping) else _set_fields(update)
        changes = dict(changes)
        if "options" in changes:
            changes["options"] = {**self.options, **changes["options"]}
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | TensorQuant, where: str = "TensorQuant") -> TensorQuant:
        if isinstance(data, TensorQuant):
            return data
        if not isinstance(data, Mapping):
            raise QuantConfigError(f"{where}: expected a mapping of quantizer settings or null, got {data!r}")
        _check_keys(where, data, {f.name for f in fields(cls)})
        try:
            return cls(**data)
        except QuantConfigError as error:  # say which kind of tensor the bad setting is for
            raise QuantConfigError(f"{where}: {error}") from error
        except TypeError as error:  # pragma: no cover - keys were checked
            raise QuantConfigError(f"{where}: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        data = _set_fields(self)
        if "quantizer" in data and isinstance(data["quantizer"], type):
            data["quantizer"] = f"{data['quantizer'].__module__}:{data['quantizer'].__qualname__}"
        return data


def _set_fields(settings: TensorQuant) -> dict[str, Any]:
    """The fields of ``settings`` that differ from the defaults."""
    data = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name == "options":
            if value:
                data["options"] = dict(value)
        elif value is not None:
            data[f.name] = value
    return data


class Override:
    """Settings for the layers whose qualified name matches ``name`` (a glob such as
    ``"layer4.*"``, or a regular expression written ``"re:..."``) and/or whose type is ``type``
    (a class or ``"package.module.Class"``; subclasses match). A pattern that names a
    container applies to everything inside it. ``skip=True`` leaves the matched layers float.
    Each kind given as a keyword (``weight=TensorQuant(bit_width=8)``, ``input={"bit_width": 8}``)
    replaces the fields it sets; ``None`` turns that kind off."""

    def __init__(self, name: str | None = None, type: Any = None, skip: bool = False, **settings: Any) -> None:
        if name is None and type is None:
            raise QuantConfigError("Override needs a layer name pattern (name=...) or a layer type (type=...)")
        if name is not None and not isinstance(name, str):
            raise QuantConfigError(f"Override.name must be a string pattern, got {name!r}")
        for kind in settings:
            if kind not in _SETTING_NAMES:
                raise QuantConfigError(_unknown(f"Override(name={name!r}) setting", kind, _SETTING_NAMES))
        self.name = name
        self.type = type
        self.skip = bool(skip)
        self.settings: dict[str, TensorQuant | None] = {
            kind: None if value is None else TensorQuant.from_dict(value, f"Override(name={name!r}).{kind}")
            for kind, value in settings.items()
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Override) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def __repr__(self) -> str:
        return f"Override({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Override:
        if isinstance(data, Override):
            return data
        if not isinstance(data, Mapping):
            raise QuantConfigError(f"an override must be a mapping, got {data!r}")
        _check_keys("override", data, {"name", "type", "skip", *_SETTING_NAMES})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.name is not None:
            data["name"] = self.name
        if self.type is not None:
            data["type"] = _type_name(self.type)
        if self.skip:
            data["skip"] = True
        for kind, settings in self.settings.items():
            data[kind] = None if settings is None else settings.to_dict()
        return data

    def layer_type(self) -> type | None:
        """The class this override matches (imported when given by name)."""
        return None if self.type is None else resolve_class(self.type, "Override.type")

    def matches(self, qualified_name: str, module: nn.Module) -> bool:
        """Whether this override applies to ``module`` called ``qualified_name`` (a pattern
        also matches what lies inside the layers it names)."""
        if self.type is not None and not isinstance(module, self.layer_type()):
            return False
        if self.name is None:
            return True
        parts = qualified_name.split(".") if qualified_name else []
        candidates = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(self._name_matches(candidate) for candidate in candidates)

    def _name_matches(self, candidate: str) -> bool:
        if self.name.startswith("re:"):
            return re.fullmatch(self.name[3:], candidate) is not None
        return fnmatch.fnmatchcase(candidate, self.name)


# The settings a config and an override carry, with the extra attention-probability kind.
_SETTING_NAMES = (*KINDS, "attention_probs")


@dataclass(frozen=True)
class QuantConfig:
    """What :func:`quantwire.quantize_model` quantizes. Each kind is a :class:`TensorQuant`
    (None: not quantized); see :data:`KINDS`. ``attention_probs`` quantizes the softmax
    output (unsigned). ``fold_bn`` folds ``BatchNorm`` into the preceding convolution's
    quantized weight for QAT (see :class:`quantwire.nn.QuantConvBn2d`); ``freeze_bn_step``
    freezes the BN statistics after that many training steps."""

    weight: TensorQuant | None = field(default_factory=lambda: TensorQuant(bit_width=8, granularity="channel"))
    input: TensorQuant | None = field(default_factory=lambda: TensorQuant(bit_width=8))
    output: TensorQuant | None = None
    bias: TensorQuant | None = None
    activation: TensorQuant | None = None
    residual: TensorQuant | None = field(default_factory=lambda: TensorQuant(bit_width=8))
    attention: TensorQuant | None = field(default_factory=lambda: TensorQuant(bit_width=8))
    attention_probs: TensorQuant | None = field(default_factory=lambda: TensorQuant(bit_width=8, signed=False))
    embedding: TensorQuant | None = field(default_factory=lambda: TensorQuant(bit_width=8))
    norm: TensorQuant | None = None
    fold_bn: bool = False
    freeze_bn_step: int | None = None
    overrides: tuple[Override, ...] = ()

    def __post_init__(self) -> None:
        for kind in _SETTING_NAMES:
            value = getattr(self, kind)
            if value is not None and not isinstance(value, TensorQuant):
                object.__setattr__(self, kind, TensorQuant.from_dict(value, f"QuantConfig.{kind}"))
        object.__setattr__(self, "overrides", tuple(Override.from_dict(o) for o in self.overrides))

    # -- reading and writing ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """A config from a mapping with the field names of this class; ``preset: name`` starts
        from a preset (other keys then change it)."""
        if isinstance(data, QuantConfig):
            return data
        if not isinstance(data, Mapping):
            raise QuantConfigError(f"a quantization config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        base = preset(data.pop("preset")) if "preset" in data else cls()
        _check_keys("QuantConfig", data, {f.name for f in fields(cls)})
        changes: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SETTING_NAMES:
                changes[key] = None if value is None else TensorQuant.from_dict(value, f"QuantConfig.{key}")
            elif key == "overrides":
                if not isinstance(value, list | tuple):
                    raise QuantConfigError(f"QuantConfig.overrides must be a list, got {value!r}")
                changes[key] = tuple(Override.from_dict(o) for o in value)
            else:
                changes[key] = value
        return dataclasses.replace(base, **changes)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for kind in _SETTING_NAMES:
            value = getattr(self, kind)
            data[kind] = None if value is None else value.to_dict()
        data["fold_bn"] = self.fold_bn
        data["freeze_bn_step"] = self.freeze_bn_step
        data["overrides"] = [o.to_dict() for o in self.overrides]
        return data

    @classmethod
    def from_file(cls, path: str | Path) -> QuantConfig:
        """A config from a ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise QuantConfigError(f"can not read the quantization config {str(path)!r}: {error}") from error
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise QuantConfigError(f"{path}: not valid YAML: {error}") from error
        elif path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise QuantConfigError(f"{path}: not valid JSON: {error}") from error
        else:
            raise QuantConfigError(f"{path}: a quantization config is a .yaml, .yml or .json file")
        return cls.from_dict(data or {})

    # -- per layer ----------------------------------------------------------------------------

    def with_overrides(self, *overrides: Override | Mapping[str, Any]) -> QuantConfig:
        """This config with more overrides appended (they win over the existing ones)."""
        return dataclasses.replace(self, overrides=(*self.overrides, *(Override.from_dict(o) for o in overrides)))

    def for_layer(self, qualified_name: str, module: nn.Module) -> LayerSettings:
        """The settings that apply to one layer, after every matching override."""
        settings = {kind: getattr(self, kind) for kind in _SETTING_NAMES}
        skip = False
        matched = []
        for index, override in enumerate(self.overrides):
            if not override.matches(qualified_name, module):
                continue
            matched.append(index)
            skip = skip or override.skip
            for kind, update in override.settings.items():
                current = settings[kind]
                if update is None or current is None:
                    settings[kind] = update
                else:
                    settings[kind] = current.merged(update)
        return LayerSettings(name=qualified_name, skip=skip, matched=tuple(matched), **settings)


@dataclass(frozen=True)
class LayerSettings:
    """The resolved settings of one layer: a :class:`TensorQuant` (or None) per kind."""

    name: str
    skip: bool
    matched: tuple[int, ...]
    weight: TensorQuant | None
    input: TensorQuant | None
    output: TensorQuant | None
    bias: TensorQuant | None
    activation: TensorQuant | None
    residual: TensorQuant | None
    attention: TensorQuant | None
    attention_probs: TensorQuant | None
    embedding: TensorQuant | None
    norm: TensorQuant | None


# -- presets --------------------------------------------------------------------------------------


def _w8a8() -> QuantConfig:
    return QuantConfig()


def _w8a8_per_tensor() -> QuantConfig:
    return QuantConfig(weight=TensorQuant(bit_width=8, granularity="tensor"))


def _w8a8_per_token() -> QuantConfig:
    """W8A8 for transformers (as SmoothQuant's and ZeroQuant's int8 kernels run): per-channel
    weights, activations and residual adds with one dynamic scale per token, so that a token's
    outlier channels do not flatten every other token."""
    token = TensorQuant(bit_width=8, granularity="token", dynamic=True)
    return QuantConfig(input=token, residual=token)


def _w8a8_residual16() -> QuantConfig:
    """Static W8A8 matrix products with 16-bit residual adds: transformers whose residual
    stream carries outliers (BERT's reach 100x the typical value) keep it precise, and every
    scale stays static for the integer backend."""
    return QuantConfig(residual=TensorQuant(bit_width=16))


def _w8a8_po2() -> QuantConfig:
    """W8A8 for shift-only hardware: every scale a power of two and biases int32 on the
    accumulator grid, so that the integer backend's rescales are exact (its output equals the
    fake-quantized model's bit for bit)."""
    po2 = TensorQuant(bit_width=8, scale="po2")
    return QuantConfig(
        weight=po2.merged({"granularity": "channel"}),
        input=po2,
        bias=TensorQuant(bit_width=32),
        residual=po2,
        attention=po2,
        attention_probs=po2.merged({"signed": False}),
        embedding=po2,
    )


def _w4a8() -> QuantConfig:
    return QuantConfig(weight=TensorQuant(bit_width=4, granularity="channel", observer="mse"))


def _w4a4() -> QuantConfig:
    four = TensorQuant(bit_width=4)
    return QuantConfig(
        weight=TensorQuant(bit_width=4, granularity="channel", observer="mse"),
        input=four.merged({"observer": "mse"}),
        residual=four.merged({"observer": "mse"}),
        attention=four,
        attention_probs=TensorQuant(bit_width=4, signed=False),
        embedding=four,
    )


def _w4a16_group() -> QuantConfig:
    return QuantConfig(
        weight=TensorQuant(bit_width=4, granularity="group", group_size=32),
        input=None,
        residual=None,
        attention=None,
        attention_probs=None,
        embedding=None,
    )


def _fp8() -> QuantConfig:
    e4m3 = TensorQuant(format="fp8_e4m3")
    return QuantConfig(
        weight=e4m3.merged({"granularity": "channel"}),
        input=e4m3,
        residual=e4m3,
        attention=e4m3,
        attention_probs=e4m3,
        embedding=e4m3,
    )


def _dynamic_int8() -> QuantConfig:
    """Like ``torch.ao.quantization.quantize_dynamic``: int8 weights of Linear layers and
    their inputs quantized with a scale computed from each input at run time."""
    return QuantConfig(
        input=TensorQuant(bit_width=8, dynamic=True),
        residual=None,
        attention=None,
        attention_probs=None,
        embedding=None,
    )


def _weight_only_int8() -> QuantConfig:
    return QuantConfig(input=None, residual=None, attention=None, attention_probs=None, embedding=None)


def _w8a8_lsq() -> QuantConfig:
    return QuantConfig(
        weight=TensorQuant(bit_width=8, granularity="channel", method="lsq"),
        input=TensorQuant(bit_width=8, method="lsq"),
        residual=TensorQuant(bit_width=8, method="lsq"),
    )


def _w4a4_lsq() -> QuantConfig:
    lsq4 = TensorQuant(bit_width=4, method="lsq")
    return QuantConfig(
        weight=lsq4.merged({"granularity": "channel"}),
        input=lsq4,
        residual=lsq4,
        attention=lsq4,
        attention_probs=TensorQuant(bit_width=4, signed=False),
        embedding=TensorQuant(bit_width=4),
    )


PRESETS = {
    "w8a8": _w8a8,
    "w8a8_per_tensor": _w8a8_per_tensor,
    "w8a8_per_token": _w8a8_per_token,
    "w8a8_residual16": _w8a8_residual16,
    "w8a8_po2": _w8a8_po2,
    "w4a8": _w4a8,
    "w4a4": _w4a4,
    "w4a16_group": _w4a16_group,
    "fp8": _fp8,
    "dynamic_int8": _dynamic_int8,
    "weight_only_int8": _weight_only_int8,
    "w8a8_lsq": _w8a8_lsq,
    "w4a4_lsq": _w4a4_lsq,
}
"""Preset schemes by name: W8A8 (per-channel weights, per-tensor activations, the default),
its per-tensor-weight variant, its per-token dynamic variant and its 16-bit-residual variant
(transformers), power-of-two W8A8 with int32 biases (exact integer rescales), W4A8 and W4A4
(MSE-calibrated), W4A16 per-group (weight only), FP8 E4M3, dynamic int8 and weight-only int8
(as ``torch.ao.quantization.quantize_dynamic``), and the LSQ QAT schemes."""


def preset(name: str) -> QuantConfig:
    """The preset config called ``name`` (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise QuantConfigError(_unknown("preset", name, PRESETS)) from None
    except TypeError:
        raise QuantConfigError(f"a preset is named by a string, got {name!r}") from None


# -- helpers --------------------------------------------------------------------------------------


def _check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise QuantConfigError(_unknown(f"TensorQuant.{what}", value, choices))


def _check_keys(where: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise QuantConfigError(_unknown(f"{where} key", key, sorted(allowed)))


def _unknown(what: str, value: Any, choices: Any) -> str:
    import difflib

    choices = list(choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {value!r}{hint} (choose from {', '.join(map(str, choices))})"


def _type_name(cls: Any) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def resolve_class(spec: Any, where: str) -> type:
    """A class given as itself, ``"package.module.Name"`` or ``"package.module:Name"``."""
    if isinstance(spec, type):
        return spec
    if not isinstance(spec, str) or not spec:
        raise QuantConfigError(f"{where}: expected a class or its dotted name, got {spec!r}")
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name:
        raise QuantConfigError(f"{where}: {spec!r} is not a dotted class name (package.module.Class)")
    try:
        module = importlib.import_module(module_name)
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as error:
        raise QuantConfigError(f"{where}: can not import {spec!r}: {error}") from error
    if not isinstance(obj, type):
        raise QuantConfigError(f"{where}: {spec!r} is not a class")
    return obj
