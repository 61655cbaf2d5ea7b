"""What algorithm loops share: feeding batches to a model, progress bars, seeding, switching
quantization off, and capturing what a sub-module receives and returns.

A *batch* is whatever a data loader yields: a tensor (the model's input), a tuple or list
whose first element is the input (``(images, labels)``), or a dict of keyword arguments
(Hugging Face models). Tensors are moved to the model's device.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from quantwire import config
from quantwire.errors import QuantInputError
from quantwire.nn.base import QuantWBIOL
from quantwire.proxy.base import QuantProxyFromInjector

ForwardFn = Callable[[nn.Module, Any], Any]


def progress_bar(iterable: Iterable, *, desc: str, total: int | None = None, enabled: bool = True) -> Iterable:
    """``iterable`` wrapped in a tqdm bar, unless ``enabled`` is false or ``config.PROGRESS`` is."""
    return tqdm(iterable, desc=desc, total=total, disable=not (enabled and config.PROGRESS), leave=False)


def batch_iterator(data: Iterable, num_batches: int | None = None) -> Iterator[Any]:
    """The first ``num_batches`` batches of ``data`` (all of them when None)."""
    if num_batches is not None and int(num_batches) < 1:
        raise QuantInputError(f"num_batches must be at least 1, got {num_batches!r}")
    if isinstance(data, Tensor):
        raise QuantInputError(
            "data must be an iterable of batches (a DataLoader, a list of tensors), not a single tensor; "
            "wrap it in a list: [tensor]"
        )
    iterator = iter(data)
    return iterator if num_batches is None else itertools.islice(iterator, int(num_batches))


def num_batches_of(data: Iterable, num_batches: int | None) -> int | None:
    """How many batches a loop over ``data`` will see, when known (for progress bars)."""
    try:
        length = len(data)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return length if num_batches is None else min(length, int(num_batches))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without tensors)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: a tensor, ``(input, *rest)`` or a dict of keyword arguments."""
    batch = to_device(batch, model_device(model))
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        if not batch:
            raise QuantInputError("a batch is an empty tuple or list: there is no input to feed the model")
        return model(batch[0])
    return model(batch)


def detach_tree(value: Any, device: torch.device | None = None) -> Any:
    """Every tensor in ``value`` detached (and moved to ``device`` when given)."""

    def detach(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        t = t.detach()
        return t if device is None else t.to(device)

    return tree_map(detach, value)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the body with torch's random generators seeded (and restored afterwards)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def quant_proxies(model: nn.Module | list[nn.Module]) -> list[QuantProxyFromInjector]:
    """Every quantization proxy in ``model`` (or in a list of its modules), once each (shared
    proxies appear once)."""
    seen: dict[int, QuantProxyFromInjector] = {}
    for module in model.modules() if isinstance(model, nn.Module) else model:
        if isinstance(module, QuantProxyFromInjector):
            seen.setdefault(id(module), module)
    return list(seen.values())


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Turn every quantizer of ``model`` into a pass-through for the body: the float model."""
    proxies = quant_proxies(model)
    before = [proxy.disable_quant for proxy in proxies]
    try:
        for proxy in proxies:
            proxy.disable_quant = True
        yield model
    finally:
        for proxy, state in zip(proxies, before, strict=True):
            proxy.disable_quant = state


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the body and restore each module's mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def weight_quant_layers(model: nn.Module) -> list[tuple[str, QuantWBIOL]]:
    """``(name, layer)`` of every quant layer with a weight quantizer, in registration order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, QuantWBIOL) and module.weight_quant is not None
    ]


def check_finite(value: Any, where: str) -> None:
    """Raise :class:`QuantInputError` naming ``where`` if a tensor in ``value`` holds NaN or Inf."""
    for tensor in torch.utils._pytree.tree_leaves(value):
        if not (isinstance(tensor, Tensor) and tensor.is_floating_point()):
            continue
        # A finite sum (one read, no temporary) proves every element finite; otherwise look closer
        # (a sum can also overflow from finite values).
        if bool(torch.isfinite(tensor.sum())):
            continue
        if not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise QuantInputError(f"{where}: received {bad} values (shape {tuple(tensor.shape)})")


def check_non_empty(value: Any, where: str) -> None:
    """Raise :class:`QuantInputError` naming ``where`` if a floating-point tensor in ``value`` has no elements."""
    for tensor in torch.utils._pytree.tree_leaves(value):
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.numel() == 0:
            raise QuantInputError(f"{where}: received an empty tensor (shape {tuple(tensor.shape)})")


class StopForward(Exception):
    """Raised by a capture hook once everything needed was seen, to skip the rest of the model."""


@dataclass
class Captured:
    """What a module received and returned, one entry per batch.

    ``args``/``kwargs`` are the positional and keyword arguments of each call (detached);
    ``outputs`` the return values (None when not captured).
    """

    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.args)

    def first_input(self, index: int) -> Tensor:
        """The first positional (or only keyword) tensor argument of call ``index``."""
        if self.args[index]:
            return self.args[index][0]
        tensors = [v for v in self.kwargs[index].values() if isinstance(v, Tensor)]
        return tensors[0]


def capture(
    model: nn.Module,
    module: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    *,
    outputs: bool = True,
    storage_device: torch.device | str | None = None,
    forward_fn: ForwardFn | None = None,
    progress: bool = False,
    desc: str = "capturing",
) -> Captured:
    """Run ``model`` over ``data`` and record the arguments (and outputs) of ``module``'s first
    call per batch; the rest of the model is skipped once ``module`` has run.

    Runs under ``torch.no_grad()``; the model's modes are left as they are. ``storage_device``
    is where the captured tensors are kept (the model's device by default).
    """
    record = Captured()
    device = None if storage_device is None else torch.device(storage_device)
    seen_this_batch = [False]

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if seen_this_batch[0]:
            return
        record.args.append(detach_tree(args, device))
        record.kwargs.append(detach_tree(kwargs, device))
        if not outputs:
            seen_this_batch[0] = True
            raise StopForward

    def post_hook(_module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
        if seen_this_batch[0]:
            return
        record.outputs.append(detach_tree(output, device))
        seen_this_batch[0] = True
        raise StopForward

    handles = [
        module.register_forward_pre_hook(pre_hook, with_kwargs=True),
        module.register_forward_hook(post_hook, with_kwargs=True),
    ]
    run = forward_fn or call_model
    try:
        with torch.no_grad():
            batches = batch_iterator(data, num_batches)
            total = num_batches_of(data, num_batches)
            for batch in progress_bar(batches, desc=desc, total=total, enabled=progress):
                seen_this_batch[0] = False
                with contextlib.suppress(StopForward):
                    run(model, batch)
                if not seen_this_batch[0]:
                    raise QuantInputError(
                        f"{type(module).__name__} was not called while running the model on a batch; "
                        "is it part of the model's forward pass?"
                    )
    finally:
        for handle in handles:
            handle.remove()
    return record


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` inside ``model`` (its class name if it is not found)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name or type(model).__name__
    return type(module).__name__


def resolve_modules(model: nn.Module, modules: Sequence[str | nn.Module]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for each entry of ``modules`` (qualified names or module objects)."""
    resolved = []
    for entry in modules:
        if isinstance(entry, str):
            try:
                resolved.append((entry, model.get_submodule(entry)))
            except AttributeError:
                raise QuantInputError(f"{type(model).__name__} has no sub-module named {entry!r}") from None
        else:
            resolved.append((module_name(model, entry), entry))
    return resolved


def execution_order(
    model: nn.Module, modules: Sequence[nn.Module], data: Iterable, forward_fn: ForwardFn | None = None
) -> list[int]:
    """Indices of ``modules`` sorted by when each is first called while ``model`` runs on the
    first batch of ``data`` (under ``torch.no_grad()``, modes as they are); modules the
    forward pass never calls are left out."""
    order: dict[int, int] = {}
    handles = []
    for index, module in enumerate(modules):

        def hook(_module: nn.Module, _args: tuple, index: int = index) -> None:
            order.setdefault(index, len(order))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        batch = next(iter(batch_iterator(data, 1)), None)
        if batch is None:
            raise QuantInputError("data yielded no batch: there is nothing to run the model on")
        with torch.no_grad():
            (forward_fn or call_model)(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(order, key=order.__getitem__)
