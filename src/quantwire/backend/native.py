"""``to_native_int8``: an integer model lowered onto PyTorch's int8 CPU kernels.

The integer model (:func:`~quantwire.backend.integer.to_integer`) is the bit-exact reference:
it simulates every integer product in float64. This module runs the same arithmetic on the
CPU's int8 kernels instead (x86 / fbgemm / onednn quantized convolution and linear, quantized
add), and :func:`compare_native` measures how far the two agree, in steps of the grids involved.

What is lowered:

- every :class:`~quantwire.backend.layers.IntegerWBIOL` (``conv1d``, ``conv2d``, ``linear``)
  whose input grid is per-tensor with at most 8 bits and whose weight codes fit int8. Weights
  become ``qint8`` codes, one scale per output channel (the real rescale multiplier, BatchNorm
  included, divided by the input scale; a negative multiplier flips the channel's codes) with
  zero point 0. A signed input grid with zero point ``z`` becomes ``quint8`` with zero point
  ``z + 128`` and the same scale;
- every :class:`~quantwire.backend.layers.IntegerAdd` (quantized ``add`` / ``add_relu``).

Anything else that cannot be lowered (more than 8 bits, per-group scales, conv3d or transposed
convolutions, a zero point outside ``quint8``) is refused with
:class:`~quantwire.backend.fixed_point.BackendError` naming the layer and the value. Other
integer operators (attention products, embeddings) and the float glue stay as they are in the
integer model (float64).

What is fused: the model is traced with ``torch.fx`` (integer layers as leaves). When a layer's
output reaches, through ReLU, max pooling, flatten, reshape or identity only, consumers that
all quantize onto one full-range 8-bit grid (the next layer's input grid, a residual add's
grid), the layer emits its output already quantized on that grid, the ops in between run on the
quantized tensor, and a ReLU that is the layer's only consumer fuses into it (``ConvReLU2d``,
``LinearReLU``, ``add_relu``). What falls back: a layer whose output is needed as a real number
(float glue such as average pooling or normalisation, the model's output, consumers on several
grids) computes it in floating point from the exact int32 accumulator (onednn's int8 kernels
with a float32 output) and the next layer quantizes it again; a model that does not trace is
lowered layer by layer that way. Both paths are correct; the fused one keeps activations in int8.

Where the two models differ: the kernels requantize with a float32 multiplier instead of the
fixed-point integer one, and quantize real inputs in float32; a value within rounding distance
of a grid boundary can land one step away, and the difference travels on.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from quantwire.backend.fixed_point import BackendError
from quantwire.backend.integer import run_example
from quantwire.backend.layers import Grid, IntegerAdd, IntegerWBIOL
from quantwire.backend.ops import MulQuant

__all__ = ["Agreement", "NativeAdd", "NativeComparison", "NativeWBIOL", "compare_native", "to_native_int8"]

_LOWERED_OPS = ("conv1d", "conv2d", "linear")
_QUINT8 = (0, 255)


# -- grids ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuintGrid:
    """A per-tensor integer grid as ``quint8`` sees it: ``real = scale * (q - zero_point)``;
    ``low``/``high`` are the grid's own codes (shifted into ``quint8``), narrower than
    ``[0, 255]`` for grids of fewer bits or with a narrow range."""

    scale: float
    zero_point: int
    low: int
    high: int

    @property
    def full_range(self) -> bool:
        """Whether the grid uses every ``quint8`` code (a kernel's output clamps the same way)."""
        return (self.low, self.high) == _QUINT8


def quint8_grid(grid: Grid, name: str) -> QuintGrid:
    """``grid`` as a ``quint8`` grid, or :class:`BackendError` naming ``name`` when it does not fit
    (more than 8 bits, a per-channel scale, codes outside ``[0, 255]`` once shifted)."""
    if grid.bit_width > 8:
        raise BackendError(f"{name}: a {grid.bit_width}-bit grid does not fit int8 kernels (8 bits at most)")
    if grid.scale.numel() != 1 or grid.zero_point.numel() != 1:
        raise BackendError(f"{name}: int8 kernels need a per-tensor activation scale (got {grid.scale.numel()})")
    shift = 128 if grid.signed else 0
    zero_point = int(round(float(grid.zero_point))) + shift
    low, high = grid.qmin + shift, grid.qmax + shift
    if not (_QUINT8[0] <= low <= zero_point <= high <= _QUINT8[1]):
        raise BackendError(
            f"{name}: codes [{grid.qmin}, {grid.qmax}] with zero point {float(grid.zero_point):g} do not fit quint8"
        )
    return QuintGrid(float(grid.scale), zero_point, low, high)


def quantize(x: Tensor, grid: QuintGrid) -> Tensor:
    """A real tensor onto ``grid`` as a ``quint8`` tensor (clamped to the grid's own range)."""
    x = x.float()
    if not grid.full_range:
        x = x.clamp(grid.scale * (grid.low - grid.zero_point), grid.scale * (grid.high - grid.zero_point))
    return torch.quantize_per_tensor(x, grid.scale, grid.zero_point, torch.quint8)


# -- weights --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Weights:
    """A layer's weights as an int8 kernel takes them: codes, positive per-channel scales and a
    real bias, such that ``scale[c] * sum(codes[c] * x_codes) * input_scale + bias[c]`` is the
    layer's real output."""

    codes: Tensor
    scales: Tensor
    bias: Tensor


def _real_rescale(layer: IntegerWBIOL) -> tuple[Tensor, Tensor]:
    """The real multiplier and bias of one accumulator step, in real output units."""
    rescale = layer.rescale
    out_channels = layer.matmul.weight.shape[0]
    multiplier = rescale.real_multiplier.double().reshape(-1)
    if multiplier.numel() not in (1, out_channels):
        raise BackendError(
            f"{layer.name}: {multiplier.numel()} rescale multipliers for {out_channels} output channels "
            "(per-group scales); int8 kernels take one scale per output channel"
        )
    bias = torch.zeros(()) if rescale.real_bias is None else rescale.real_bias.double().reshape(-1)
    multiplier, bias = multiplier.expand(out_channels), bias.expand(out_channels)
    if isinstance(rescale, MulQuant):
        # MulQuant's real values are in output-code units: back to real units.
        output_scale = layer.output_grid.scale.double().reshape(())
        multiplier, bias = multiplier * output_scale, bias * output_scale
    return multiplier.clone(), bias.clone()


def _weights(layer: IntegerWBIOL, input_scale: float) -> _Weights:
    codes = layer.matmul.weight.double()
    low, high = float(codes.min()), float(codes.max())
    if low < -128 or high > 127:
        raise BackendError(f"{layer.name}: weight codes reach [{low:g}, {high:g}]; int8 kernels take [-128, 127]")
    multiplier, bias = _real_rescale(layer)
    negative = multiplier < 0
    flipped = codes[negative]
    if flipped.numel() and float(flipped.min()) == -128:
        channel = int(torch.nonzero(negative & (codes == -128).flatten(1).any(1))[0])
        raise BackendError(
            f"{layer.name}: channel {channel} has a negative rescale multiplier and a weight code -128, "
            "which has no int8 negation"
        )
    sign = torch.where(negative, -1.0, 1.0).reshape(-1, *([1] * (codes.dim() - 1)))
    scales = (multiplier.abs() / input_scale).float()
    # A zero multiplier (a BatchNorm gamma of 0) leaves only the bias: any positive scale will do.
    zero = scales == 0
    scales = torch.where(zero, torch.ones_like(scales), scales)
    codes = torch.where(zero.reshape(sign.shape), torch.zeros_like(codes), codes * sign)
    return _Weights(codes.to(torch.int8), scales.double(), bias.float())


# -- the lowered layers ---------------------------------------------------------------------------


class NativeWBIOL(nn.Module):
    """An :class:`IntegerWBIOL` on int8 kernels. Takes a real tensor (quantized onto the input
    grid here) or a ``quint8`` tensor already on its input grid. With ``output_grid`` it returns
    its output quantized on that grid (a ``torch.ao.nn.quantized`` module, ``relu`` fused); without,
    the real output in ``real_dtype`` (float64, as the integer model's glue; float32 when only
    quantizers consume it), computed from the exact int32 accumulator (onednn, float32 out)."""

    def __init__(
        self,
        layer: IntegerWBIOL,
        output_grid: QuintGrid | None = None,
        relu: bool = False,
        real_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        op = layer.matmul.op
        if op not in _LOWERED_OPS:
            raise BackendError(f"{layer.name}: no int8 kernel for {op!r} (lowered: {', '.join(_LOWERED_OPS)})")
        self.name = layer.name
        self.op = op
        self.input_grid = quint8_grid(layer.input_grid, f"{layer.name}.input_grid")
        self.code_shift = 128 if layer.input_grid.signed else 0
        self.output_grid = output_grid
        self.relu = relu
        self.real_dtype = real_dtype
        weights = _weights(layer, self.input_grid.scale)
        self.kwargs = {k: _as_list(v) for k, v in layer.matmul.op_kwargs.items()}
        if output_grid is None:
            self._prepare_real(weights)
        else:
            self.kernel = _quantized_module(op, weights, self.kwargs, output_grid, relu)

    def _prepare_real(self, weights: _Weights) -> None:
        self.register_buffer("weight_scales", weights.scales.float())
        self.register_buffer("weight_zero_points", torch.zeros(weights.scales.numel(), dtype=torch.int64))
        self.register_buffer("bias", weights.bias)
        if self.op == "linear":
            self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(weights.codes, None))
            return
        codes = weights.codes.unsqueeze(2) if self.op == "conv1d" else weights.codes
        kwargs = _conv2d_kwargs(self.op, self.kwargs)
        packed = torch.ops.onednn.qconv_prepack(
            codes,
            self.weight_scales,
            self.input_grid.scale,
            self.input_grid.zero_point,
            kwargs["stride"],
            kwargs["padding"],
            kwargs["dilation"],
            kwargs["groups"],
            None,
        )
        self.register_buffer("packed", packed)

    def forward(self, x: Tensor) -> Tensor:
        q = x if x.is_quantized else quantize(x, self.input_grid)
        if self.output_grid is not None:
            return self.kernel(q)
        return self._real(q.int_repr()).to(self.real_dtype)

    def _real(self, codes: Tensor) -> Tensor:
        grid = self.input_grid
        post = "relu" if self.relu else "none"
        if self.op == "linear":
            return torch.ops.onednn.qlinear_pointwise(
                codes,
                grid.scale,
                grid.zero_point,
                self.packed,
                self.weight_scales,
                self.weight_zero_points,
                self.bias,
                1.0,
                0,
                torch.float32,
                post,
                [],
                "",
            )
        kwargs = _conv2d_kwargs(self.op, self.kwargs)
        if self.op == "conv1d":
            codes = codes.unsqueeze(2)
        out = torch.ops.onednn.qconv2d_pointwise(
            codes,
            grid.scale,
            grid.zero_point,
            self.packed,
            self.weight_scales,
            self.weight_zero_points,
            self.bias,
            kwargs["stride"],
            kwargs["padding"],
            kwargs["dilation"],
            kwargs["groups"],
            1.0,
            0,
            torch.float32,
            post,
            [],
            None,
        )
        return out.squeeze(2) if self.op == "conv1d" else out

    def extra_repr(self) -> str:
        out = "real" if self.output_grid is None else f"quint8(scale={self.output_grid.scale:.6g})"
        return f"{self.name}: {self.op}, output={out}, relu={self.relu}"


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _conv2d_kwargs(op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Conv arguments as onednn's 2-d convolution takes them (a conv1d as a conv2d of height 1)."""
    if op == "conv2d":
        return kwargs
    return {
        "stride": [1, *kwargs["stride"]],
        "padding": [0, *kwargs["padding"]],
        "dilation": [1, *kwargs["dilation"]],
        "groups": kwargs["groups"],
    }


def _quantized_module(
    op: str, weights: _Weights, kwargs: dict[str, Any], output_grid: QuintGrid, relu: bool
) -> nn.Module:
    """The ``torch.ao.nn.quantized`` module (its ReLU-fused variant with ``relu``) computing ``op``
    with ``weights`` and quantizing its output onto ``output_grid``."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    codes = weights.codes
    qweight = torch._make_per_channel_quantized_tensor(
        codes, weights.scales, torch.zeros(codes.shape[0], dtype=torch.int64), 0
    )
    if op == "linear":
        module = (nniq.LinearReLU if relu else nnq.Linear)(codes.shape[1], codes.shape[0])
    else:
        cls = {"conv1d": (nnq.Conv1d, nniq.ConvReLU1d), "conv2d": (nnq.Conv2d, nniq.ConvReLU2d)}[op][int(relu)]
        in_channels = codes.shape[1] * kwargs["groups"]
        module = cls(in_channels, codes.shape[0], tuple(codes.shape[2:]), **{k: kwargs[k] for k in kwargs})
    module.set_weight_bias(qweight, weights.bias)
    module.scale = output_grid.scale
    module.zero_point = output_grid.zero_point
    return module


class NativeAdd(nn.Module):
    """An :class:`IntegerAdd` on int8 kernels: both operands on the add's grid (real operands are
    quantized here), then a quantized ``add`` (``add_relu``) onto ``output_grid``, or, without
    one, the exact sum of the codes as a real number (``real_dtype``)."""

    def __init__(
        self,
        layer: IntegerAdd,
        output_grid: QuintGrid | None = None,
        relu: bool = False,
        real_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.name = layer.name
        self.grid = quint8_grid(layer.grid, f"{layer.name}.grid")
        self.output_grid = output_grid
        self.relu = relu
        self.real_dtype = real_dtype

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        qa = a if a.is_quantized else quantize(a, self.grid)
        qb = b if b.is_quantized else quantize(b, self.grid)
        if self.output_grid is not None:
            add = torch.ops.quantized.add_relu if self.relu else torch.ops.quantized.add
            return add(qa, qb, self.output_grid.scale, self.output_grid.zero_point)
        codes = qa.int_repr().to(torch.int32) + qb.int_repr().to(torch.int32) - 2 * self.grid.zero_point
        out = codes.to(self.real_dtype) * self.grid.scale
        return out.relu() if self.relu else out

    def extra_repr(self) -> str:
        out = "real" if self.output_grid is None else f"quint8(scale={self.output_grid.scale:.6g})"
        return f"{self.name}: output={out}, relu={self.relu}"


# -- lowering -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    """Pack weights for ``engine`` (packing picks the kernels; the global setting is restored)."""
    if engine not in torch.backends.quantized.supported_engines:
        raise BackendError(
            f"quantized engine {engine!r} is not available here (supported: "
            f"{', '.join(torch.backends.quantized.supported_engines)})"
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def to_native_int8(integer_model: nn.Module, example_input: Any, engine: str = "x86") -> nn.Module:
    """``integer_model`` (from :func:`~quantwire.backend.integer.to_integer`) with its Linear/Conv
    layers and residual adds on PyTorch's int8 CPU kernels (see the module docstring for what is
    fused and what falls back). ``example_input`` (a tensor, a tuple of positional arguments or a
    dict of keyword arguments) runs the lowered model once, so that a failure shows here. The
    integer model is not modified. Raises :class:`BackendError` naming the layer and the value
    for a layer that cannot be lowered."""
    integer_model = integer_model.eval()
    for module in integer_model.modules():
        if isinstance(module, IntegerWBIOL):
            _check_lowerable(module)
    with _quantized_engine(engine):
        graph_module = _traced(integer_model)
        native = _fused(graph_module) if graph_module is not None else _per_layer(integer_model)
        native.eval()
        with torch.no_grad():
            run_example(native, example_input)
    return native


def _check_lowerable(layer: IntegerWBIOL) -> None:
    """Refuse, naming the layer, what the lowering would fail on (before any tracing)."""
    NativeWBIOL(layer)


class _IntegerTracer(fx.Tracer):
    """Traces through the model's own forwards, keeping integer operators as single calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if type(module).__module__.startswith("quantwire.backend"):
            return True
        return super().is_leaf_module(module, qualified_name)


def _traced(model: nn.Module) -> fx.GraphModule | None:
    """``model`` as an FX graph, or None when it does not trace."""
    try:
        graph = _IntegerTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: lower layer by layer instead
        return None
    return fx.GraphModule(model, graph, type(model).__name__)


def _per_layer(model: nn.Module) -> nn.Module:
    """The fallback: every integer layer replaced in place by its native twin with a real output."""
    native = copy.deepcopy(model)
    for name, module in list(native.named_modules()):
        if isinstance(module, IntegerWBIOL):
            native.set_submodule(name, NativeWBIOL(module))
        elif isinstance(module, IntegerAdd):
            native.set_submodule(name, NativeAdd(module))
    return native


_TRANSPARENT_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_TRANSPARENT_FUNCTIONS = (torch.relu, F.relu, torch.flatten, torch.reshape)
_TRANSPARENT_METHODS = ("relu", "flatten", "reshape", "view")
"""Operations that commute with quantization onto a grid (ReLU, since the grid holds 0; max
pooling, since rounding is monotonic) or only move values: a quantized tensor passes them on
its grid."""


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    return (node.op == "call_function" and node.target in (torch.relu, F.relu)) or (
        node.op == "call_method" and node.target == "relu"
    )


def _is_transparent(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` passes ``source`` (its first argument, its only tensor) along its grid."""
    if not node.args or node.args[0] is not source:
        return False
    if any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return False
    if node.op == "call_module":
        return isinstance(modules[node.target], _TRANSPARENT_MODULES)
    if node.op == "call_function":
        return node.target in _TRANSPARENT_FUNCTIONS
    return node.op == "call_method" and node.target in _TRANSPARENT_METHODS


def _consumer_grid(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> QuintGrid | None:
    """The grid ``node`` quantizes ``source`` onto, when it is a lowered layer's input or a
    residual add's operand; None for a consumer that needs a real number."""
    if node.op != "call_module":
        return None
    module = modules[node.target]
    if isinstance(module, IntegerWBIOL) and node.args[:1] == (source,) and source not in node.args[1:]:
        return quint8_grid(module.input_grid, f"{module.name}.input_grid")
    if isinstance(module, IntegerAdd) and source in node.args[:2] and not node.kwargs:
        return quint8_grid(module.grid, f"{module.name}.grid")
    return None


def _final_consumers(producer: fx.Node, modules: dict[str, nn.Module]) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """Where ``producer``'s output ends up through transparent operations: ``(consumer, source,
    path)`` with ``source`` the node the consumer takes and ``path`` the transparent nodes from
    ``producer`` to it."""
    found = []
    pending: list[tuple[fx.Node, list[fx.Node]]] = [(producer, [])]
    while pending:
        source, path = pending.pop()
        for user in source.users:
            if _is_transparent(user, source, modules):
                pending.append((user, [*path, user]))
            else:
                found.append((user, source, path))
    return found


def _consumer_grids(producer: fx.Node, modules: dict[str, nn.Module]) -> list[QuintGrid] | None:
    """The full-range grid each final consumer of ``producer`` quantizes it onto, or None when
    some consumer needs a real number (or a grid narrower than quint8)."""
    grids = []
    for consumer, source, _ in _final_consumers(producer, modules):
        grid = _consumer_grid(consumer, source, modules)
        if grid is None or not grid.full_range:
            return None
        grids.append(grid)
    return grids or None


def _drop_identities(graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Remove identity modules (a folded BatchNorm's place, eval-mode dropout), so that a ReLU
    after them is seen as the layer's own."""
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity | nn.Dropout):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _split_adds(graph_module: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """A residual add whose output several grids consume (the next block's convolution and its
    residual add) becomes one add per grid, each followed by its own copy of the transparent
    operations in between: an int8 add is cheap, and each copy rounds once, as the integer
    model does."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], IntegerAdd):
            continue
        grids = _consumer_grids(node, modules)
        if grids is None or len(set(grids)) < 2:
            continue
        consumers = _final_consumers(node, modules)
        order = {n: i for i, n in enumerate(graph.nodes)}
        copies: dict[QuintGrid, dict[fx.Node, fx.Node]] = {}
        for index, grid in enumerate(dict.fromkeys(grids)):
            target = f"{node.target}_grid{index}"
            graph_module.add_submodule(target, modules[node.target])
            modules[target] = modules[node.target]
            with graph.inserting_after(node):
                copies[grid] = {node: graph.call_module(target, node.args, node.kwargs)}
        for (consumer, source, path), grid in sorted(zip(consumers, grids, strict=True), key=lambda c: order[c[0][0]]):
            memo = copies[grid]
            with graph.inserting_before(consumer):
                for original in path:
                    if original not in memo:
                        memo[original] = graph.node_copy(original, lambda n, memo=memo: memo.get(n, n))
            consumer.replace_input_with(source, memo[source])
        for original in sorted({n for _, _, path in consumers for n in path}, key=order.get, reverse=True):
            if not original.users:
                graph.erase_node(original)
        graph.erase_node(node)


def _fused(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Every integer layer of the traced model replaced by its native twin, each emitting its
    output on its consumers' grid when they all quantize onto one (ReLU fused when it is the
    only consumer)."""
    modules = dict(graph_module.named_modules())
    graph = graph_module.graph
    _drop_identities(graph, modules)
    _split_adds(graph_module, modules)
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], IntegerWBIOL | IntegerAdd):
            continue
        layer = modules[node.target]
        grids = _consumer_grids(node, modules)
        grid = grids[0] if grids and len(set(grids)) == 1 else None
        # A real output that only quantizers consume need not match the float64 glue.
        real_dtype = torch.float64 if grids is None else torch.float32
        relu_node = None
        users = list(node.users)
        if grid is not None and len(users) == 1 and _is_relu(users[0], modules) and _fusable(layer):
            relu_node = users[0]
        native_class = NativeWBIOL if isinstance(layer, IntegerWBIOL) else NativeAdd
        graph_module.add_submodule(node.target, native_class(layer, grid, relu_node is not None, real_dtype))
        if relu_node is not None:
            relu_node.replace_all_uses_with(node)
            graph.erase_node(relu_node)
    graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


def _fusable(layer: nn.Module) -> bool:
    """Whether a ReLU after ``layer`` has a fused int8 kernel."""
    return isinstance(layer, IntegerAdd) or layer.matmul.op in _LOWERED_OPS


# -- agreement ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How closely the native model follows the integer model, in steps of a grid.

    ``within_one``/``exact``: the fraction of compared values at most one step apart / equal
    (for real numbers: less than half a step apart, i.e. the same accumulator); ``largest``: the
    largest difference in steps; ``count``: how many values were compared."""

    within_one: float
    exact: float
    largest: float
    count: int

    @classmethod
    def of(cls, steps: Tensor) -> Agreement:
        """The agreement of differences ``steps`` (in grid steps)."""
        steps = steps.detach().double().abs().flatten()
        if steps.numel() == 0:
            return cls(1.0, 1.0, 0.0, 0)
        return cls(
            float((steps <= 1.0).double().mean()),
            float((steps < 0.5).double().mean()),
            float(steps.max()),
            steps.numel(),
        )


@dataclass(frozen=True)
class NativeComparison:
    """:func:`compare_native`'s report.

    ``layers``: every lowered layer fed the integer model's own input codes, its output against
    the integer model's, in steps of the grid it emits (its consumers' grid) or, for a real
    output, of one accumulator step: the kernels' own requantization error. ``worst_layer``: the
    layer with the largest difference. ``output``: the models' final outputs, in steps of the last
    layer's grid (or accumulator step), where a rounding flip early in the model has travelled
    on through every layer after it."""

    layers: Agreement
    worst_layer: str
    output: Agreement


def compare_native(native: nn.Module, integer_model: nn.Module, example_input: Any) -> NativeComparison:
    """Run both models on ``example_input`` (the integer model in float64) and measure how far
    the native model's layers and final output (a tensor) are from the integer model's."""
    integer_layers = {m.name: m for m in integer_model.modules() if isinstance(m, IntegerWBIOL | IntegerAdd)}
    records: dict[str, tuple[tuple[Tensor, ...], Tensor]] = {}
    hooks = [layer.register_forward_hook(_record(records, name)) for name, layer in integer_layers.items()]
    try:
        with torch.no_grad():
            expected = run_example(integer_model, _as_double(example_input))
    finally:
        for hook in hooks:
            hook.remove()
    steps: dict[str, Tensor] = {}
    with torch.no_grad():
        for module in native.modules():
            if isinstance(module, NativeWBIOL | NativeAdd) and module.name in records:
                key = module.name if module.name not in steps else f"{module.name}#{len(steps)}"
                steps[key] = _layer_steps(module, integer_layers[module.name], *records[module.name])
        got = run_example(native, example_input)
    if not steps:
        raise BackendError("compare_native: no lowered layer ran in the integer model")
    worst = max(steps, key=lambda name: float(steps[name].abs().max()) if steps[name].numel() else 0.0)
    output_steps = (got.double() - expected.double()) / _output_step(integer_model, expected)
    return NativeComparison(
        Agreement.of(torch.cat([s.flatten() for s in steps.values()])), worst, Agreement.of(output_steps)
    )


def _record(store: dict[str, tuple[tuple[Tensor, ...], Tensor]], name: str) -> Any:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        store[name] = (tuple(i.detach().clone() for i in inputs), output.detach().clone())

    return hook


def _as_quint8(x: Tensor, quantizer: nn.Module, grid: QuintGrid, shift: int) -> Tensor:
    """``x`` on ``grid`` with exactly the integer model's codes (its ``quantizer``'s)."""
    codes = quantizer(x) + shift
    return torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), grid.scale, grid.zero_point)


def _layer_steps(native: nn.Module, layer: nn.Module, inputs: tuple[Tensor, ...], expected: Tensor) -> Tensor:
    """The native twin's output, fed the integer layer's input codes, minus the integer layer's
    output, in steps of the native output's grid (or of one accumulator step)."""
    if isinstance(native, NativeWBIOL):
        got = native(_as_quint8(inputs[0], layer.quantize, native.input_grid, native.code_shift))
        step = _accumulator_step(layer, expected)
    else:
        shift = 128 if layer.grid.signed else 0
        got = native(*(_as_quint8(x, layer.quantize, native.grid, shift) for x in inputs))
        step = native.grid.scale
    if native.relu:
        expected = expected.relu()
    if native.output_grid is None:
        return (got.double() - expected) / step
    grid = native.output_grid
    expected_codes = torch.round(expected / grid.scale + grid.zero_point).clamp(*_QUINT8)
    return got.int_repr().double() - expected_codes


def _accumulator_step(layer: IntegerWBIOL, like: Tensor) -> Tensor:
    """The real value of one accumulator step of ``layer`` (per channel), shaped to broadcast
    against its output ``like``."""
    multiplier, _ = _real_rescale(layer)
    step = multiplier.abs().clamp_min(torch.finfo(torch.float64).tiny)
    shape = [1] * like.dim()
    shape[layer.channel_dim] = -1
    return step.reshape(shape)


def _output_step(integer_model: nn.Module, expected: Tensor) -> Tensor | float:
    """One step of the final output: the last integer layer's output grid, or its accumulator
    step when it outputs real numbers."""
    last = [m for m in integer_model.modules() if isinstance(m, IntegerWBIOL)][-1]
    if last.output_grid is not None:
        return float(last.output_grid.scale.reshape(-1)[0])
    return _accumulator_step(last, expected)


def _as_double(example_input: Any) -> Any:
    """The integer model's input: floating-point tensors in float64."""
    if isinstance(example_input, Tensor):
        return example_input.double() if example_input.is_floating_point() else example_input
    if isinstance(example_input, dict):
        return {k: _as_double(v) for k, v in example_input.items()}
    if isinstance(example_input, tuple | list):
        return type(example_input)(_as_double(v) for v in example_input)
    return example_input
