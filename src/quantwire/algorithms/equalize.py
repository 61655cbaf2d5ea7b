"""Float-preserving rewrites of a model's weights, done before quantization is calibrated.

* :func:`equalize`: cross-layer weight equalization (Nagel et al., 2019, "Data-Free
  Quantization Through Weight Equalization and Bias Correction"). Two layers joined by
  positively homogeneous per-channel ops (``f(x / s) = f(x) / s`` for ``s > 0``: ReLU,
  LeakyReLU, pooling, ...) can trade a per-channel factor: the producer's output channel
  ``i`` is divided by ``s_i`` and the consumer's input channel ``i`` multiplied by it. With
  ``s_i = sqrt(r1_i / r2_i)`` (``r1``: range of the producer's output channel, ``r2``: range of
  the consumer's input channel) both ranges become ``sqrt(r1_i * r2_i)``, which makes the
  weights of both far friendlier to per-tensor quantization.
* :func:`smooth_quant`: SmoothQuant (Xiao et al., 2023). Activation outliers live in a few
  channels; dividing those channels by ``s_j`` where they are produced (a LayerNorm's affine
  weight and bias, or a Linear's rows and bias) and multiplying the consumers' input columns by
  ``s_j`` moves the difficulty from activations into weights, with
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

Both edit the model **in place** (and return it), leave its float outputs unchanged up to
float rounding, and rebuild the quantizers of every quant layer whose tensors changed
(``init_quantizers()``). Activation quantizers are not touched: calibrate them afterwards.

Which layers pair up is found by tracing the model with :mod:`torch.fx` (quant layers and
``torch.nn`` modules are leaves). Models fx cannot trace (most Hugging Face models) take
explicit ``pairs=`` / ``groups=`` by module name.

What a chain between producer and consumer may contain (each intermediate result must have a
single user; a fork, e.g. a residual branch, ends the chain):

* anywhere: ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.PReLU``, ``nn.Identity``, ``nn.Dropout``
  (1d/2d/3d, not AlphaDropout), quant activation layers whose activation is one of those or
  none (``QuantReLU``, ``QuantIdentity``), ``F.relu``/``torch.relu``/``x.relu()``,
  ``F.leaky_relu``, ``F.dropout``, ``x.contiguous()``;
* after a convolution only (channels on dim 1): max/average pooling (plain and adaptive,
  1d/2d/3d, module or functional), ``nn.Upsample``/``F.interpolate``;
* ``flatten`` with ``start_dim=1`` (``nn.Flatten()``, ``torch.flatten(x, 1)``,
  ``x.flatten(1)``): it turns a convolution's ``(N, C, *spatial)`` output into ``(N, C *
  prod(spatial))``, so a following Linear with ``in_features == C`` proves the spatial size is
  1 and channel ``i`` stays feature ``i``. A convolution feeds a Linear only through such a
  flatten; a Linear never pairs with a following convolution. ``view``/``reshape`` and
  ``mean`` are not followed.

Not positively homogeneous, so they end a chain: BatchNorm (fold it into the preceding layer
first: a warning says so), ReLU6/Hardtanh and other clipping or saturating activations
(sigmoid, GELU, ...), additions, concatenations. A module called at more than one place, or
whose weight is also used elsewhere (tied), is never paired.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from quantwire.algorithms._utils import (
    ForwardFn,
    batch_iterator,
    call_model,
    check_finite,
    eval_mode,
    num_batches_of,
    progress_bar,
    quantization_disabled,
    resolve_modules,
)
from quantwire.errors import QuantConfigError, QuantInputError
from quantwire.nn.base import QuantActLayer, QuantLayer
from quantwire.proxy.base import plain_value

__all__ = [
    "QuantwireTracer",
    "equalize",
    "find_equalization_pairs",
    "find_smooth_quant_groups",
    "smooth_quant",
]

PairSpec = tuple[str | nn.Module, str | nn.Module]
GroupSpec = tuple[str | nn.Module, str | nn.Module | Sequence[str | nn.Module]]


# -- tracing -----------------------------------------------------------------------------------


class QuantwireTracer(fx.Tracer):
    """An fx tracer that keeps quant layers (and, like fx's default, ``torch.nn`` modules) as
    leaves: their ``forward`` is not traced into."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, QuantLayer) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, what: str, explicit: str) -> fx.Graph:
    try:
        return QuantwireTracer().trace(model)
    except Exception as error:  # fx raises many kinds: TraceError, TypeError, control flow on proxies, ...
        raise QuantConfigError(
            f"{what}: torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}); "
            f"pass {explicit} explicitly by module name"
        ) from error


# -- what layers are ---------------------------------------------------------------------------

_HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
)
_HOMOGENEOUS_FUNCTIONS: tuple[Callable, ...] = (
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.leaky_relu,
    F.leaky_relu_,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
)
_SPATIAL_FUNCTIONS: tuple[Callable, ...] = (
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.interpolate,
)
_HOMOGENEOUS_METHODS = frozenset({"relu", "relu_", "contiguous"})

# Layouts of a chain's current value: channels on dim 1 with spatial dims after them (a
# convolution's output), or channels last (a Linear's output, or anything flattened).
_CONV, _LINEAR = "conv", "linear"


def _is_weight_layer(module: nn.Module) -> bool:
    """A Linear or a (transposed) convolution with materialised weights."""
    if not isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
        return False
    return not isinstance(module.weight, nn.parameter.UninitializedParameter)


def _is_transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvTransposeNd)


def _layout_of(module: nn.Module) -> str:
    return _LINEAR if isinstance(module, nn.Linear) else _CONV


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _is_homogeneous_module(module: nn.Module) -> bool:
    if isinstance(module, QuantActLayer):
        return module.act_impl is None or _is_homogeneous_module(module.act_impl)
    return isinstance(module, _HOMOGENEOUS_MODULES)


# -- per-channel weight views ------------------------------------------------------------------
#
# A weight's dim 0 holds A channels (one slice each); its dim 1 holds B channels per group, and
# with G groups channel ``g * B + b`` is read by the rows ``g * A/G ... (g+1) * A/G`` at ``b``.
# Conv/Linear: output channels on dim 0, input channels on dim 1. Transposed conv: the other
# way round. Depthwise and grouped layers are the G > 1 case of dim 1.


def _channel_ranges(weight: Tensor, dim: int, groups: int) -> Tensor:
    """``max |w|`` of every channel along ``dim`` (0 or 1) of ``weight``, in float32."""
    w = weight.detach().abs().float()
    if dim == 0:
        return w.reshape(w.shape[0], -1).amax(1)
    a, b = w.shape[0], w.shape[1]
    return w.reshape(groups, a // groups, b, -1).amax(dim=(1, 3)).reshape(-1)


def _scale_channels(weight: Tensor, dim: int, groups: int, factor: Tensor) -> None:
    """Multiply channel ``i`` along ``dim`` of ``weight`` by ``factor[i]``, in place."""
    factor = factor.to(device=weight.device, dtype=weight.dtype)
    if dim == 0:
        scaled = weight.reshape(weight.shape[0], -1) * factor[:, None]
    else:
        a, b = weight.shape[0], weight.shape[1]
        scaled = weight.reshape(groups, a // groups, b, -1) * factor.reshape(groups, 1, b, 1)
    weight.copy_(scaled.reshape(weight.shape))


def _output_dim(module: nn.Module) -> int:
    return 1 if _is_transposed(module) else 0


def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def _producer_ranges(module: nn.Module) -> Tensor:
    return _channel_ranges(module.weight, _output_dim(module), _groups(module))


def _consumer_ranges(module: nn.Module) -> Tensor:
    return _channel_ranges(module.weight, 1 - _output_dim(module), _groups(module))


def _scale_outputs(module: nn.Module, factor: Tensor) -> None:
    """Multiply output channel ``i`` of a weight layer (weight slice and bias) by ``factor[i]``."""
    _scale_channels(module.weight, _output_dim(module), _groups(module), factor)
    if module.bias is not None:
        module.bias.mul_(factor.to(device=module.bias.device, dtype=module.bias.dtype))


def _scale_inputs(module: nn.Module, factor: Tensor) -> None:
    """Multiply what input channel ``i`` of a weight layer reads by ``factor[i]``."""
    _scale_channels(module.weight, 1 - _output_dim(module), _groups(module), factor)


def _rebuild_quantizers(modules: Iterable[nn.Module]) -> None:
    seen: set[int] = set()
    for module in modules:
        if isinstance(module, QuantLayer) and id(module) not in seen:
            seen.add(id(module))
            module.init_quantizers()


# -- graph walking -----------------------------------------------------------------------------


class _Graph:
    """A traced model with the questions pair discovery asks of it."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model = model
        self.graph = graph
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        # Parameters used outside their module's call (get_attr) or held by several modules (tied).
        owners: Counter[int] = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self.shared_params = {pid for pid, count in owners.items() if count > 1}
        self.attr_prefixes = [node.target for node in graph.nodes if node.op == "get_attr"]

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def pairable(self, node: fx.Node) -> bool:
        """Whether this call's module is called only here and owns its tensors alone."""
        name = node.target
        if self.calls[name] != 1:
            return False
        if any(attr == name or attr.startswith(f"{name}.") for attr in self.attr_prefixes):
            return False
        module = self.modules[name]
        return not any(id(p) in self.shared_params for p in module.parameters(recurse=False))

    @staticmethod
    def only_input(node: fx.Node, source: fx.Node) -> bool:
        """Whether ``source`` is ``node``'s first argument and no other argument is a node."""
        if not node.args or node.args[0] is not source:
            return False
        return not _contains_node([*node.args[1:], *node.kwargs.values()])

    def step(self, node: fx.Node, layout: str) -> str | None:
        """The layout after ``node`` if it is a positively homogeneous per-channel op, else None."""
        if node.op == "call_module":
            module = self.modules.get(node.target)
            if module is None:
                return None
            if _is_homogeneous_module(module):
                return layout
            if isinstance(module, _SPATIAL_MODULES):
                return layout if layout == _CONV else None
            if isinstance(module, nn.Flatten):
                return _LINEAR if module.start_dim == 1 and module.end_dim == -1 else None
            return None
        if node.op == "call_function":
            if node.target in _HOMOGENEOUS_FUNCTIONS:
                return layout
            if node.target in _SPATIAL_FUNCTIONS:
                return layout if layout == _CONV else None
            if node.target is torch.flatten:
                return _LINEAR if _flatten_from_1(node) else None
            return None
        if node.op == "call_method":
            if node.target in _HOMOGENEOUS_METHODS:
                return layout
            if node.target == "flatten":
                return _LINEAR if _flatten_from_1(node) else None
        return None

    def follow(self, start: fx.Node, layout: str) -> tuple[fx.Node, str, list[fx.Node]]:
        """Walk from ``start`` through single-user per-channel ops: the last node reached, its
        layout, and the users it has (where the walk stopped)."""
        node = start
        while True:
            users = list(node.users)
            if len(users) != 1:
                return node, layout, users
            user = users[0]
            if not self.only_input(user, node):
                return node, layout, users
            after = self.step(user, layout)
            if after is None:
                return node, layout, users
            node, layout = user, after


def _contains_node(value: Any) -> bool:
    found = [False]

    def mark(node: fx.Node) -> fx.Node:
        found[0] = True
        return node

    fx.node.map_arg(value, mark)
    return found[0]


def _flatten_from_1(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _consumes(node: fx.Node, source: fx.Node) -> bool:
    """``node`` calls a module on ``source`` alone (a transposed conv may add ``output_size``)."""
    return node.op == "call_module" and _Graph.only_input(node, source)


# -- pair discovery ----------------------------------------------------------------------------


def find_equalization_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(producer, consumer)`` module names of every pair :func:`equalize` can rescale.

    A producer is a Conv (any dims, grouped and depthwise included, transposed too) or Linear,
    quant or float, called once; its output must reach exactly one such consumer, whose input
    channels are the producer's output channels, through positively homogeneous per-channel
    ops with a single user each (the module docstring lists them). Residual forks, BatchNorm
    and clipping activations (ReLU6, Hardtanh) break a chain; a warning names producers
    followed by BatchNorm, which should be folded first.

    Raises :class:`QuantConfigError` when fx cannot trace the model (pass ``pairs=`` to
    :func:`equalize` then).
    """
    graph = _Graph(model, _trace(model, "find_equalization_pairs", "pairs="))
    pairs: list[tuple[str, str]] = []
    before_bn: list[str] = []
    for node in graph.graph.nodes:
        producer = graph.module(node)
        if producer is None or not _is_weight_layer(producer) or not graph.pairable(node):
            continue
        end, layout, users = graph.follow(node, _layout_of(producer))
        if len(users) != 1:
            continue
        user = users[0]
        consumer = graph.module(user)
        if isinstance(consumer, nn.modules.batchnorm._BatchNorm):
            before_bn.append(node.target)
            continue
        if consumer is None or not _is_weight_layer(consumer) or consumer is producer:
            continue
        if not _consumes(user, end) or not graph.pairable(user):
            continue
        if _layout_of(consumer) != layout or _in_channels(consumer) != _out_channels(producer):
            continue
        pairs.append((node.target, user.target))
    if before_bn:
        shown = ", ".join(before_bn[:5]) + (", ..." if len(before_bn) > 5 else "")
        warnings.warn(
            f"find_equalization_pairs: BatchNorm follows {len(before_bn)} layer(s) ({shown}); BatchNorm is not "
            "positively homogeneous, so these were not paired. Fold BatchNorm into the preceding layers first "
            "to equalize them",
            UserWarning,
            stacklevel=2,
        )
    return pairs


def find_smooth_quant_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(producer, [consumers])`` module names of every group :func:`smooth_quant` can rescale.

    A producer is a LayerNorm (quant or float) with an elementwise affine weight over one
    dimension, or a Linear; its output must reach only Linear consumers (at least one, e.g. the
    q, k and v projections of one attention) that read it as their sole input, through the
    channel-last ops of the chain rules (ReLU, Dropout, Identity, ...). Every module involved
    must be called once. Raises :class:`QuantConfigError` when fx cannot trace the model.
    """
    graph = _Graph(model, _trace(model, "find_smooth_quant_groups", "groups="))
    groups: list[tuple[str, list[str]]] = []
    for node in graph.graph.nodes:
        producer = graph.module(node)
        if producer is None or not _is_smoothable_producer(producer) or not graph.pairable(node):
            continue
        end, layout, users = graph.follow(node, _LINEAR)
        if not users or layout != _LINEAR:
            continue
        channels = _smooth_channels(producer)
        consumers = []
        for user in users:
            consumer = graph.module(user)
            if (
                not isinstance(consumer, nn.Linear)
                or not _consumes(user, end)
                or not graph.pairable(user)
                or consumer.in_features != channels
            ):
                consumers = []
                break
            consumers.append(user.target)
        if consumers:
            groups.append((node.target, consumers))
    return groups


def _is_smoothable_producer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return _is_weight_layer(module)
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return module.weight is not None and len(module.normalized_shape) == 1
    return False


def _smooth_channels(producer: nn.Module) -> int:
    return producer.out_features if isinstance(producer, nn.Linear) else int(producer.normalized_shape[0])


# -- explicit specifications -------------------------------------------------------------------


def _resolve(model: nn.Module, entries: Sequence[str | nn.Module], what: str) -> list[tuple[str, nn.Module]]:
    try:
        return resolve_modules(model, entries)
    except QuantInputError as error:
        raise QuantConfigError(f"{what}: {error}") from None


def _resolve_pairs(model: nn.Module, pairs: Iterable[PairSpec]) -> list[tuple[str, nn.Module, str, nn.Module]]:
    resolved = []
    for pair in pairs:
        if isinstance(pair, str | nn.Module) or len(pair) != 2:
            raise QuantConfigError(f"equalize: each pair is (producer, consumer), got {pair!r}")
        (p_name, producer), (c_name, consumer) = _resolve(model, list(pair), "equalize")
        for name, module in ((p_name, producer), (c_name, consumer)):
            if not _is_weight_layer(module):
                raise QuantConfigError(
                    f"equalize: {name} is a {type(module).__name__}; only Linear and (transposed) "
                    "convolutions can be equalized"
                )
        if producer is consumer:
            raise QuantConfigError(f"equalize: pair ({p_name}, {c_name}) names the same layer twice")
        if _out_channels(producer) != _in_channels(consumer):
            raise QuantConfigError(
                f"equalize: {p_name} ({type(producer).__name__}) has {_out_channels(producer)} output channels "
                f"but {c_name} ({type(consumer).__name__}) has {_in_channels(consumer)} input channels; "
                "they can not be equalized as a pair"
            )
        resolved.append((p_name, producer, c_name, consumer))
    return resolved


def _resolve_groups(model: nn.Module, groups: Iterable[GroupSpec]) -> list[tuple[str, nn.Module, list]]:
    resolved = []
    for group in groups:
        if isinstance(group, str | nn.Module) or len(group) != 2:
            raise QuantConfigError(f"smooth_quant: each group is (producer, [consumers]), got {group!r}")
        producer_spec, consumer_specs = group
        if isinstance(consumer_specs, str | nn.Module):
            consumer_specs = [consumer_specs]
        ((p_name, producer),) = _resolve(model, [producer_spec], "smooth_quant")
        consumers = _resolve(model, list(consumer_specs), "smooth_quant")
        if not consumers:
            raise QuantConfigError(f"smooth_quant: group of {p_name} has no consumers")
        if not _is_smoothable_producer(producer):
            raise QuantConfigError(
                f"smooth_quant: {p_name} is a {type(producer).__name__}; a producer must be a Linear, or a "
                "LayerNorm/RMSNorm with an elementwise affine weight over one dimension"
            )
        channels = _smooth_channels(producer)
        for c_name, consumer in consumers:
            if not isinstance(consumer, nn.Linear):
                raise QuantConfigError(
                    f"smooth_quant: consumer {c_name} of {p_name} is a {type(consumer).__name__}; "
                    "consumers must be Linear layers"
                )
            if consumer is producer:
                raise QuantConfigError(f"smooth_quant: {p_name} is listed as its own consumer")
            if consumer.in_features != channels:
                raise QuantConfigError(
                    f"smooth_quant: {p_name} ({type(producer).__name__}) produces {channels} channels but "
                    f"{c_name} ({type(consumer).__name__}) reads {consumer.in_features}; they can not be smoothed"
                )
        resolved.append((p_name, producer, consumers))
    return resolved


# -- cross-layer equalization ------------------------------------------------------------------


def _equalization_scale(producer: nn.Module, consumer: nn.Module) -> Tensor:
    """``s_i = sqrt(r1_i * r2_i) / r2_i``, 1 where either range is zero (or not finite)."""
    r1 = _producer_ranges(producer).double()
    r2 = _consumer_ranges(consumer).double().to(r1.device)
    ok = (r1 > 0) & (r2 > 0) & torch.isfinite(r1) & torch.isfinite(r2)
    scale = torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2))
    return torch.where(ok, scale, torch.ones_like(scale))


def equalize(
    model: nn.Module,
    pairs: Iterable[PairSpec] | None = None,
    iterations: int = 20,
    threshold: float = 1e-8,
) -> nn.Module:
    """Cross-layer weight equalization, **in place**; returns ``model``.

    For each ``(producer, consumer)`` pair (module names or modules; found by
    :func:`find_equalization_pairs` when None) and each channel ``i``: with ``r1`` the range
    (``max |w|``) of the producer's output channel and ``r2`` that of the consumer's input
    channel (the right weight slice of a grouped or depthwise consumer),
    ``s = sqrt(r1 * r2) / r2``; the producer's weight slice and bias of channel ``i`` are
    divided by ``s``, the consumer's slice multiplied by it. All pairs are swept again until
    every ``max |s - 1|`` of a sweep is below ``threshold`` (or below a few ulps of the
    weights' dtype, which is as close to 1 as stored weights let it get) or after
    ``iterations`` sweeps. Then every quant layer that changed rebuilds its quantizers.

    The model's float outputs are unchanged (up to rounding) provided what lies between each
    pair is positively homogeneous per channel; explicit pairs are trusted on that.
    """
    if int(iterations) < 1:
        raise QuantConfigError(f"equalize: iterations must be at least 1, got {iterations!r}")
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise QuantConfigError(f"equalize: threshold must be a finite number >= 0, got {threshold!r}")
    if pairs is None:
        names = find_equalization_pairs(model)
        resolved = [(p, model.get_submodule(p), c, model.get_submodule(c)) for p, c in names]
    else:
        resolved = _resolve_pairs(model, pairs)
    if not resolved:
        return model
    eps = max(torch.finfo(p.weight.dtype).eps for _, p, _, c in resolved)
    tolerance = max(float(threshold), 4 * eps)
    with torch.no_grad():
        for _ in range(int(iterations)):
            worst = 0.0
            for _, producer, _, consumer in resolved:
                scale = _equalization_scale(producer, consumer)
                change = float((scale - 1).abs().max())
                worst = max(worst, change)
                if change < tolerance:
                    continue
                _scale_outputs(producer, 1 / scale)
                _scale_inputs(consumer, scale)
            if worst < tolerance:
                break
    _rebuild_quantizers(m for _, p, _, c in resolved for m in (p, c))
    return model


# -- SmoothQuant -------------------------------------------------------------------------------


def _collect_input_maxima(
    model: nn.Module,
    consumers: list[tuple[str, nn.Module]],
    data: Iterable,
    num_batches: int | None,
    progress: bool,
    forward_fn: ForwardFn | None,
) -> dict[str, Tensor]:
    """Per-input-channel ``max |x|`` of each consumer's input over the calibration data, with
    quantization disabled and the model in eval mode."""
    maxima: dict[str, Tensor] = {}

    def make_hook(name: str, module: nn.Linear) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            tensors = [*args, *kwargs.values()]
            x = plain_value(tensors[0]) if tensors else None
            if not isinstance(x, Tensor) or x.shape[-1] != module.in_features:
                shape = None if not isinstance(x, Tensor) else tuple(x.shape)
                raise QuantInputError(
                    f"smooth_quant: {name} expected an input with {module.in_features} features last, got {shape}"
                )
            check_finite(x, f"smooth_quant: input of {name}")
            current = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(0)
            previous = maxima.get(name)
            maxima[name] = current if previous is None else torch.maximum(previous, current)

        return hook

    handles = [
        module.register_forward_pre_hook(make_hook(name, module), with_kwargs=True) for name, module in consumers
    ]
    run = forward_fn or call_model
    seen = 0
    try:
        with torch.no_grad(), eval_mode(model), quantization_disabled(model):
            batches = batch_iterator(data, num_batches)
            total = num_batches_of(data, num_batches)
            for batch in progress_bar(batches, desc="smooth_quant", total=total, enabled=progress):
                run(model, batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise QuantInputError("smooth_quant: the calibration data yielded no batches")
    for name, _ in consumers:
        if name not in maxima:
            raise QuantInputError(
                f"smooth_quant: {name} was not called while running the model on the calibration data; "
                "is it part of the model's forward pass?"
            )
    return maxima


def smooth_quant(
    model: nn.Module,
    data: Iterable,
    alpha: float = 0.5,
    groups: Iterable[GroupSpec] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    forward_fn: ForwardFn | None = None,
) -> nn.Module:
    """SmoothQuant activation equalization, **in place**; returns ``model``.

    For each group ``(producer, [consumers])`` (module names or modules; found by
    :func:`find_smooth_quant_groups` when None, e.g. ``[("ln1", ["q", "k", "v"])]`` for a model
    fx can not trace) the per-input-channel ``max |X_j|`` of the consumers' input is collected
    over ``data`` (the first ``num_batches`` batches; ``forward_fn(model, batch)`` runs one
    when the default call does not fit), in eval mode with quantization disabled. Then
    ``s_j = max|X_j|^alpha / max_over_consumers(max|W_j|)^(1 - alpha)``, both maxima clamped
    to at least 1e-5 and ``s`` to ``[1e-5, 1e5]`` (1 for a channel that is zero in either);
    the producer's output channel ``j`` (LayerNorm weight and bias, or Linear row and bias) is
    divided by ``s_j`` and every consumer's input column ``j`` multiplied by it. Quant layers
    that changed rebuild their quantizers. ``alpha`` in ``[0, 1]`` moves more of the
    difficulty to the weights as it grows (0.5 is the paper's default).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise QuantConfigError(f"smooth_quant: alpha must be in [0, 1], got {alpha}")
    if groups is None:
        found = find_smooth_quant_groups(model)
        resolved = [(p, model.get_submodule(p), [(c, model.get_submodule(c)) for c in cs]) for p, cs in found]
    else:
        resolved = _resolve_groups(model, groups)
    if not resolved:
        return model
    consumers: dict[str, nn.Module] = {}
    for p_name, _, group in resolved:
        for name, module in group:
            if name in consumers:
                raise QuantConfigError(f"smooth_quant: {name} is a consumer in more than one group (again of {p_name})")
            consumers[name] = module
    maxima = _collect_input_maxima(model, list(consumers.items()), data, num_batches, progress, forward_fn)
    with torch.no_grad():
        for _, producer, group in resolved:
            act_max = torch.stack([maxima[name] for name, _ in group]).amax(0).double()
            weight_max = torch.stack([m.weight.detach().abs().float().amax(0).to(act_max.device) for _, m in group])
            weight_max = weight_max.amax(0).double()
            ok = (act_max > 0) & (weight_max > 0)
            scale = act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
            scale = torch.where(ok, scale.clamp(1e-5, 1e5), torch.ones_like(scale))
            if isinstance(producer, nn.Linear):
                _scale_outputs(producer, 1 / scale)
            else:
                producer.weight.div_(scale.to(device=producer.weight.device, dtype=producer.weight.dtype))
                bias = getattr(producer, "bias", None)
                if bias is not None:
                    bias.div_(scale.to(device=bias.device, dtype=bias.dtype))
            for _, consumer in group:
                _scale_inputs(consumer, scale)
    _rebuild_quantizers(m for _, p, group in resolved for m in (p, *(c for _, c in group)))
    return model
