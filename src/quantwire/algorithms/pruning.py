"""Pruning a quantized model, and measuring how sparse it is.

:func:`prune` adds a pruning declaration (:class:`~quantwire.quant.pruning.MagnitudePruning`
or :class:`~quantwire.quant.pruning.NMPruning`) to the weight quantizer of chosen layers, so
that the result is the model one would have built by declaring it on those layers: the mask
is the proxy's ``pruning`` module, applied before quantization, saved in the ``state_dict``
and rebuilt with the quantizer. :func:`sparsity` reports the fraction of zeros in the
weights the layers actually compute with.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from quantwire.core.pruning import MagnitudeMask, NMMask
from quantwire.errors import QuantConfigError, QuantwireError
from quantwire.inject import DependencyError, value
from quantwire.nn.base import QuantLayer
from quantwire.proxy.weight import WeightQuantProxyFromInjector
from quantwire.quant.pruning import layer_input_channel_dim

__all__ = ["LayerSparsity", "SparsityReport", "prune", "sparsity"]

METHODS = ("magnitude", "nm")
SCOPES = ("layer", "global")


def _weight_of(module: nn.Module) -> Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def _weight_proxy(module: nn.Module) -> WeightQuantProxyFromInjector | None:
    proxy = getattr(module, "weight_quant", None)
    return proxy if isinstance(proxy, WeightQuantProxyFromInjector) else None


def _quant_weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every quant layer with a ``weight`` and a weight quantizer."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, QuantLayer) and _weight_of(module) is not None and _weight_proxy(module) is not None
    ]


def _is_weight_layer(module: nn.Module) -> bool:
    """A quant layer with a weight, or a float Linear / Conv (one that was left unconverted);
    normalization layers, which also have a ``weight``, are not what a pattern means to prune."""
    if _weight_of(module) is None:
        return False
    return isinstance(module, QuantLayer | nn.Linear | nn.modules.conv._ConvNd)


def _label(name: str, model: nn.Module) -> str:
    return name or type(model).__name__


def _select(model: nn.Module, layers: str | Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The layers ``prune`` works on: every quant layer with a weight quantizer whose qualified
    name matches one of the fnmatch ``layers`` patterns (all of them when None)."""
    candidates = _quant_weight_layers(model)
    if layers is None:
        if not candidates:
            raise QuantConfigError(f"prune: {type(model).__name__} has no quant layer with a weight quantizer")
        return candidates
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise QuantConfigError(f"prune: layers must be None or a list of name patterns, got {layers!r}")
    quantized = {name for name, _ in candidates}
    for pattern in patterns:
        matched = [(name, m) for name, m in model.named_modules() if fnmatch.fnmatchcase(name, pattern)]
        for name, module in matched:
            if _is_weight_layer(module) and name not in quantized:
                raise QuantConfigError(
                    f"prune: layer {_label(name, model)!r} ({type(module).__name__}, matched by {pattern!r}) "
                    "has a weight but no weight quantizer to declare pruning on; give it a weight_quant"
                )
        if not any(name in quantized for name, _ in matched):
            raise QuantConfigError(
                f"prune: the pattern {pattern!r} matches no quant layer with a weight quantizer in "
                f"{type(model).__name__}"
            )
    return [(name, m) for name, m in candidates if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def _check_arguments(method: str, scope: str, amount: float, n: int, m: int) -> None:
    if method not in METHODS:
        raise QuantConfigError(f"prune: method must be one of {METHODS}, got {method!r}")
    if scope not in SCOPES:
        raise QuantConfigError(f"prune: scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global" and method != "magnitude":
        raise QuantConfigError(f"prune: scope='global' is for method='magnitude' only, got method={method!r}")
    # The masks check their own arguments: build one to fail before any layer is touched.
    try:
        if method == "magnitude":
            MagnitudeMask(amount)
        else:
            NMMask(n, m)
    except QuantConfigError as error:
        given = f"sparsity={amount!r}" if method == "magnitude" else f"n={n!r}, m={m!r}"
        raise QuantConfigError(f"prune({given}): {error}") from error


def _global_sparsities(selected: list[tuple[str, nn.Module]], amount: float, model: nn.Module) -> list[float]:
    """Each layer's share of one magnitude threshold over all ``selected`` weights.

    All ``|w|`` are ranked together (ties: earlier layer, then earlier position, first) and the
    ``round(amount * total)`` smallest are pruned; a layer pruning ``z`` of its ``n`` weights
    gets a :class:`MagnitudeMask` of sparsity ``z / n``, which prunes exactly those (it ranks
    its own weights the same way).
    """
    with torch.no_grad():
        magnitudes = [_weight_of(layer).detach().abs().reshape(-1).cpu() for _, layer in selected]
        sizes = torch.tensor([t.numel() for t in magnitudes])
        owner = torch.repeat_interleave(torch.arange(len(selected)), sizes)
        order = torch.argsort(torch.cat(magnitudes), descending=True, stable=True)
        total = int(sizes.sum())
        pruned = round(amount * total)
        zeros = torch.bincount(owner[order[total - pruned :]], minlength=len(selected))
    sparsities = []
    for (name, _), z, size in zip(selected, zeros.tolist(), sizes.tolist(), strict=True):
        if z >= size:
            raise QuantConfigError(
                f"prune: global magnitude pruning at sparsity {amount} would remove every weight of layer "
                f"{_label(name, model)!r}; prune fewer weights or leave the layer out (layers=...)"
            )
        sparsities.append(z / size)
    return sparsities


def _declaration(method: str, amount: float, n: int, m: int) -> dict[str, Any]:
    """What the pruning mixin declares, as ``let`` overrides (a ``let``-derived quantizer
    pickles; a class derived on the fly would not)."""
    if method == "magnitude":
        return {"pruning_impl": MagnitudeMask, "pruning_sparsity": amount}
    return {"pruning_impl": NMMask, "pruning_n": n, "pruning_m": m, "pruning_dim": value(layer_input_channel_dim)}


def prune(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float = 0.5,
    n: int = 2,
    m: int = 4,
    layers: str | Sequence[str] | None = None,
    scope: str = "layer",
) -> nn.Module:
    """Declare pruning on the weight quantizers of ``model``'s quant layers, in place.

    ``method="magnitude"`` prunes the ``sparsity`` fraction of each weight with the smallest
    ``|w|`` (:class:`~quantwire.quant.pruning.MagnitudePruning`); ``method="nm"`` keeps the
    ``n`` largest of every ``m`` consecutive input channels
    (:class:`~quantwire.quant.pruning.NMPruning`). ``layers``: fnmatch patterns of qualified
    layer names (``["features.*", "classifier"]``), None for every quant layer with a weight
    quantizer. ``scope="global"`` (magnitude only) ranks the weights of all selected layers
    together: one threshold, each layer keeping its weights above it (so layers prune
    different fractions, ``sparsity`` overall).

    Each selected layer's quantizer becomes ``quantizer.let(<the mixin's declarations>)`` and
    its proxy is rebuilt: the masks are computed from the current weights, and the quantizer's
    own state (learned scales, step counters) is kept. Calling ``prune`` again replaces the
    pruning declaration; masks are computed from the weights as stored, so weights pruned
    before may come back. (A global mask is a per-layer magnitude mask of the layer's share:
    a later rebuild, e.g. ``init_mask``, keeps each layer's fraction, not the threshold.)

    Modifies ``model`` in place and returns it. Raises :class:`QuantConfigError` for an
    unknown ``method`` or ``scope``, a bad ``sparsity``/``n``/``m``, a pattern matching no
    quant layer with a weight quantizer, a matched layer with a weight but no weight
    quantizer, a shared weight quantizer, or a weight N:M blocks do not divide; nothing is
    changed then.
    """
    _check_arguments(method, scope, sparsity, n, m)
    selected = _select(model, layers)
    amounts = _global_sparsities(selected, sparsity, model) if scope == "global" else [sparsity] * len(selected)

    plans = []
    for (name, layer), amount in zip(selected, amounts, strict=True):
        proxy = _weight_proxy(layer)
        if len(proxy.tracked_module_list) > 1:
            raise QuantConfigError(
                f"prune: layer {_label(name, model)!r} shares its weight quantizer with "
                f"{len(proxy.tracked_module_list) - 1} other layer(s); a pruning mask belongs to one weight"
            )
        injector = proxy.quant_injector.let(**_declaration(method, amount, n, m))
        try:  # a dry run: every layer must accept its mask before any layer is changed
            injector.let(module=layer).pruning_impl.init_mask(_weight_of(layer))
        except (DependencyError, QuantwireError) as error:
            raise QuantConfigError(f"prune: layer {_label(name, model)!r}: {error}") from error
        plans.append((proxy, injector))

    for proxy, injector in plans:
        state = proxy.tensor_quant.state_dict()
        proxy.quant_injector = injector
        proxy.init_tensor_quant()
        proxy.tensor_quant.load_state_dict(state)
    return model


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros among the weights one layer computes with (after its pruning mask)."""

    name: str
    zeros: int
    total: int
    fraction: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fraction", self.zeros / self.total if self.total else 0.0)


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and total sparsity of a model's effective weights (see :func:`sparsity`)."""

    layers: tuple[LayerSparsity, ...]

    @property
    def zeros(self) -> int:
        return sum(entry.zeros for entry in self.layers)

    @property
    def total(self) -> int:
        return sum(entry.total for entry in self.layers)

    @property
    def fraction(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def __getitem__(self, name: str) -> LayerSparsity:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"no layer named {name!r} in the sparsity report ({[e.name for e in self.layers]})")

    def __iter__(self) -> Iterator[LayerSparsity]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        rows = [(e.name, str(e.zeros), str(e.total), f"{100 * e.fraction:.2f}%") for e in self.layers]
        rows.append(("total", str(self.zeros), str(self.total), f"{100 * self.fraction:.2f}%"))
        header = ("layer", "zeros", "total", "sparsity")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ).rstrip()

        rule = "  ".join("-" * width for width in widths)
        return "\n".join([line(header), rule, *(line(row) for row in rows[:-1]), rule, line(rows[-1])])


def effective_weight(layer: nn.Module) -> Tensor:
    """The weight ``layer`` computes with before quantization: its pruning mask applied."""
    weight = _weight_of(layer)
    if weight is None:
        raise QuantConfigError(f"{type(layer).__name__} has no weight")
    proxy = _weight_proxy(layer)
    with torch.no_grad():
        return weight.detach() if proxy is None else proxy.pruned(weight.detach())


def sparsity(model: nn.Module) -> SparsityReport:
    """The exact zeros of the effective weight of every quant layer with a weight (the weight
    with its pruning mask applied, quantized or not; zeros the weight holds itself count too),
    per layer in registration order and in total."""
    entries = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer) and _weight_of(module) is not None:
            weight = effective_weight(module)
            entries.append(LayerSparsity(_label(name, model), int((weight == 0).sum()), weight.numel()))
    return SparsityReport(tuple(entries))
