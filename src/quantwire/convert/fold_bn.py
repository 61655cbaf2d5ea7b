"""Folding BatchNorms into the convolutions before them, for quantization-aware training.

:func:`fold_batch_norms` replaces each convolution whose output feeds only a BatchNorm by a
:class:`~quantwire.nn.fused.QuantConvBn2d` (``QuantConvBn1d`` for ``Conv1d`` -> ``BatchNorm1d``)
that holds the BatchNorm and quantizes the folded weight, and the BatchNorm by ``nn.Identity``.
:func:`quantwire.quantize_model` calls it when the config says ``fold_bn: true``;
:func:`fold_into_convs` later turns the folded layers into the plain quant convolutions an
integer backend runs.

The pairs are found in the graph ``torch.fx`` traces; for a model that does not trace, in the
patterns of common architectures: consecutive children of an ``nn.Sequential`` (a ResNet's
``downsample``) and children named ``convN`` / ``bnN`` of one module (torchvision's ResNet
blocks), trusting that such a convolution feeds only its BatchNorm.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import fx, nn

from quantwire.convert.config import QuantConfig
from quantwire.convert.registry import Conversion
from quantwire.errors import QuantConfigError
from quantwire.nn.base import QuantLayer
from quantwire.nn.fused import QuantConvBn1d, QuantConvBn2d, _QuantConvBnNd
from quantwire.proxy import QuantProxyFromInjector

__all__ = ["find_conv_bn_pairs", "fold_batch_norms", "fold_into_convs"]

_FUSED = {nn.Conv1d: QuantConvBn1d, nn.Conv2d: QuantConvBn2d}
"""The folded layer of each float convolution type (exact types: a subclass may compute
something else)."""

_CONV_NAME = re.compile(r"conv(\d*)")


def fold_batch_norms(
    model: nn.Module, config: QuantConfig | Mapping[str, Any] | str | Path | None = None
) -> list[tuple[str, str]]:
    """Fold every BatchNorm that follows a convolution into it, in place: the convolution
    becomes a :class:`~quantwire.nn.fused.QuantConvBn2d` with the quantizers ``config`` gives
    that convolution (by its qualified name; default: the W8A8 config) and
    ``config.freeze_bn_step``, the BatchNorm an ``nn.Identity``. Convolutions the config skips
    or does not quantize at all are left float, with their BatchNorm.

    Returns the ``(conv_name, bn_name)`` pairs folded.
    """
    from quantwire.convert.quantize import as_config

    config = as_config(config)
    folded = []
    for conv_name, bn_name in find_conv_bn_pairs(model):
        fused = _fused_layer(model, conv_name, bn_name, config)
        if fused is None:
            continue
        model.set_submodule(conv_name, fused)
        model.set_submodule(bn_name, nn.Identity())
        folded.append((conv_name, bn_name))
    return folded


def _fused_layer(model: nn.Module, conv_name: str, bn_name: str, config: QuantConfig) -> _QuantConvBnNd | None:
    """The folded layer for one pair, or None when the config leaves the convolution float."""
    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name)
    settings = config.for_layer(conv_name, conv)
    if settings.skip:
        return None
    try:
        quantizers = Conversion(conv_name, settings, config, model).wbiol_quantizers()
        if all(quant is None for quant in quantizers.values()):
            return None
        fused = _FUSED[type(conv)].from_float(conv, bn, freeze_bn_step=config.freeze_bn_step, **quantizers)
    except QuantConfigError as error:
        raise QuantConfigError(f"{conv_name} (folding {bn_name}): {error}") from error
    return fused.train(conv.training)


def find_conv_bn_pairs(
    model: nn.Module, is_pair: Callable[[nn.Module, nn.Module], bool] | None = None
) -> list[tuple[str, str]]:
    """The ``(conv_name, bn_name)`` pairs of ``model`` whose BatchNorm can be folded into the
    convolution: from the ``torch.fx`` graph when the model traces, else from the
    ``nn.Sequential`` and ``convN``/``bnN`` patterns. A module that appears under two names
    (shared) is never folded, nor a BatchNorm without running statistics (with a warning).
    ``is_pair(conv, bn)`` says which module pairs count (default: a float ``nn.Conv1d/2d``
    and the BatchNorm of its dimension and width)."""
    is_pair = is_pair or _is_pair
    try:
        candidates = _traced_pairs(model)
    except Exception:  # fx fails in many ways on dynamic models; the patterns remain
        candidates = list(_pattern_pairs(model))
    shared = _shared_modules(model)
    pairs = []
    for conv_name, bn_name in candidates:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if id(conv) in shared or id(bn) in shared or not is_pair(conv, bn):
            continue
        if not bn.track_running_stats or bn.running_var is None:
            warnings.warn(
                f"{bn_name}: a BatchNorm without running statistics is not folded into {conv_name}", stacklevel=2
            )
            continue
        pairs.append((conv_name, bn_name))
    return pairs


def _is_pair(conv: nn.Module, bn: nn.Module) -> bool:
    fused = _FUSED.get(type(conv))
    return fused is not None and type(bn) is fused._bn_class and bn.num_features == conv.out_channels


class _Tracer(fx.Tracer):
    """Traces through everything but quantwire's own layers and proxies."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, QuantLayer | QuantProxyFromInjector) or super().is_leaf_module(module, qualified_name)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Convolution calls whose only user is a BatchNorm call on their output, each module
    called once and never read as an attribute (``self.bn.weight``) elsewhere."""
    graph = _Tracer().trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    attributes = [node.target for node in graph.nodes if node.op == "get_attr"]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args[:1] != (node,) or len(user.all_input_nodes) != 1:
            continue
        names = (node.target, user.target)
        if any(calls[name] != 1 or any(a.startswith(name + ".") for a in attributes) for name in names):
            continue
        pairs.append(names)
    return pairs


def _pattern_pairs(model: nn.Module) -> Iterator[tuple[str, str]]:
    """Consecutive children of every ``nn.Sequential``, and ``convN``/``bnN`` siblings."""
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for first, second in zip(names, names[1:], strict=False):
                yield prefix + first, prefix + second
            continue
        for name in children:
            match = _CONV_NAME.fullmatch(name)
            if match is not None and f"bn{match.group(1)}" in children:
                yield prefix + name, f"{prefix}bn{match.group(1)}"


def _shared_modules(model: nn.Module) -> set[int]:
    """The ids of the modules reachable under more than one name."""
    counts = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    return {key for key, count in counts.items() if count > 1}


def fold_into_convs(model: nn.Module) -> list[str]:
    """Replace, in place, every folded conv-BN layer by the plain quant convolution with the
    folded weight and bias (:meth:`~quantwire.nn.fused.QuantConvBn2d.fold_into_conv`): the
    model an integer backend runs, with the same eval outputs. Returns the names replaced."""
    names = [name for name, module in model.named_modules() if isinstance(module, _QuantConvBnNd)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).fold_into_conv())
    return names
