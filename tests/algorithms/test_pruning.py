"""Pruning masks declared on weight quantizers, ``prune()`` and ``sparsity()``.

The masks: magnitude keeps exactly the right count and the largest ``|w|``; N:M keeps the N
largest of every block of M input channels. On layers: a pruned weight is exactly zero after
quantization, for symmetric, per-channel, per-group and asymmetric quantizers (the quantizer
sees the pruned weight: pruning then quantizing); its gradient is zero; the mask is applied
with quantization disabled too; a saved mask wins over the one recomputed on load; the eval
cache follows ``init_mask``. ``prune()`` gives exactly what declaring the mixin gives;
``scope="global"`` ranks all weights together; ``sparsity()`` counts the effective zeros.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import quantwire.config as config
from quantwire.algorithms.pruning import LayerSparsity, SparsityReport, prune, sparsity
from quantwire.core.pruning import MagnitudeMask, NMMask
from quantwire.core.scaling import ParameterScaling
from quantwire.errors import QuantConfigError
from quantwire.nn import QuantConv2d, QuantConvTranspose2d, QuantLinear
from quantwire.quant.per_group import Int4WeightPerGroupFloat
from quantwire.quant.pruning import (
    Int4WeightPerChannelFloat2of4,
    Int8WeightPerChannelFloat2of4,
    Int8WeightPerChannelFloatMagnitudePruned,
    Int8WeightPerTensorFloat2of4,
    Int8WeightPerTensorFloatMagnitudePruned,
    MagnitudePruning,
    NMPruning,
)
from quantwire.quant.scaled_int import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat
from quantwire.quant.shifted_scaled_int import ShiftedUint8WeightPerTensorFloat

# -- reference masks ------------------------------------------------------------------------------


def reference_magnitude_mask(weight: Tensor, amount: float) -> Tensor:
    """Keep the ``numel - round(amount * numel)`` largest |w|; equal |w|: the earlier one."""
    flat = weight.abs().flatten().tolist()
    keep = len(flat) - round(amount * len(flat))
    kept = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:keep]
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[kept] = True
    return mask.reshape(weight.shape)


def blocks(t: Tensor, dim: int, m: int) -> Tensor:
    """``t`` as rows of ``m`` consecutive elements along ``dim``."""
    return t.movedim(dim, -1).reshape(-1, m)


# -- the masks on their own ------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@given(
    shape=shapes,
    amount=st.floats(0.0, 0.999),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_magnitude_mask_prunes_exactly_the_smallest(shape, amount, seed, ties):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    if ties:  # few distinct magnitudes: ties at the threshold are the rule
        weight = torch.randint(1, 4, shape, generator=g).float() * torch.randn(shape, generator=g).sign()
    mask_module = MagnitudeMask(amount)
    mask_module.init_mask(weight)
    mask = mask_module.mask
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert int((~mask).sum()) == round(amount * weight.numel())
    assert torch.equal(mask, reference_magnitude_mask(weight, amount))
    pruned = mask_module(weight)
    assert int((pruned == 0).sum()) == round(amount * weight.numel())  # the weights are nonzero
    if mask.any() and (~mask).any():
        assert weight.abs()[mask].min() >= weight.abs()[~mask].max()
    again = MagnitudeMask(amount)
    again.init_mask(weight.clone())
    assert torch.equal(again.mask, mask)


nm_cases = st.tuples(st.sampled_from([2, 4, 8]), st.integers(1, 8)).filter(lambda c: c[1] <= c[0])


@given(
    nm=nm_cases,
    out_channels=st.integers(1, 5),
    num_blocks=st.integers(1, 3),
    kernel=st.sampled_from([(), (1,), (3,), (2, 3)]),
    dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_nm_mask_keeps_the_n_largest_of_every_block(nm, out_channels, num_blocks, kernel, dim, seed):
    m, n = nm
    shape = [out_channels, out_channels, *kernel]
    shape[dim] = m * num_blocks
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask_module = NMMask(n, m, dim)
    mask_module.init_mask(weight)
    pruned = mask_module(weight)
    kept = blocks(pruned != 0, dim, m)
    assert bool((kept.sum(dim=1) == n).all())
    rows, mask_rows = blocks(weight.abs(), dim, m), blocks(mask_module.mask, dim, m)
    assert torch.equal(kept, mask_rows)
    for row, row_mask in zip(rows, mask_rows, strict=True):
        if n < m:
            assert row[row_mask].min() >= row[~row_mask].max()


def test_nm_mask_ties_keep_the_earlier_elements():
    mask_module = NMMask(2, 4, 1)
    mask_module.init_mask(torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]))
    assert mask_module.mask.tolist() == [[True, True, False, False, True, True, False, False]]


def test_nm_mask_on_a_conv_weight_runs_along_input_channels_at_each_kernel_position():
    weight = torch.randn(3, 8, 2, 2)
    mask_module = NMMask(1, 4, 1)
    mask_module.init_mask(weight)
    for o in range(3):
        for i in range(2):
            for j in range(2):
                column = mask_module.mask[o, :, i, j].reshape(2, 4)
                assert column.sum(dim=1).tolist() == [1, 1]


def test_a_mask_before_init_prunes_nothing_and_a_saved_mask_loads_into_a_fresh_one():
    weight = torch.randn(4, 8)
    assert torch.equal(MagnitudeMask(0.5)(weight), weight)
    source = NMMask(2, 4, 1)
    source.init_mask(weight)
    fresh = NMMask(2, 4, 1)
    fresh.load_state_dict(source.state_dict())
    assert torch.equal(fresh.mask, source.mask)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MagnitudeMask(1.0), r"pruning_sparsity .*1\.0"),
        (lambda: MagnitudeMask(-0.1), r"pruning_sparsity .*-0\.1"),
        (lambda: MagnitudeMask(float("nan")), r"pruning_sparsity .*nan"),
        (lambda: MagnitudeMask(True), r"pruning_sparsity .*True"),
        (lambda: NMMask(0, 4), r"pruning_n .*got 0"),
        (lambda: NMMask(5, 4), r"pruning_n .*pruning_m = 4, got 5"),
        (lambda: NMMask(2, 0), r"pruning_m .*got 0"),
        (lambda: NMMask(2.0, 4), r"pruning_n must be an int, got 2\.0"),
    ],
)
def test_mask_arguments_are_checked(build: Callable[[], nn.Module], match: str):
    with pytest.raises(QuantConfigError, match=match):
        build()


def test_nm_mask_refuses_a_dim_that_blocks_do_not_divide():
    with pytest.raises(QuantConfigError, match=r"shape \(3, 6\).*size 6, not a multiple of pruning_m=4"):
        NMMask(2, 4, 1).init_mask(torch.randn(3, 6))
    with pytest.raises(QuantConfigError, match="pruning_dim=1 is not a dim"):
        NMMask(2, 4, 1).init_mask(torch.randn(8))


# -- on layers -----------------------------------------------------------------------------------


def make_layer(kind: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return QuantLinear(32, 6, **kwargs)
    if kind == "conv":
        return QuantConv2d(16, 4, 3, **kwargs)
    return QuantConvTranspose2d(16, 4, 3, **kwargs)


def layer_input(kind: str) -> Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 32, generator=g) if kind == "linear" else torch.randn(2, 16, 5, 5, generator=g)


QUANTIZERS = {
    "per_tensor": (Int8WeightPerTensorFloat, {}),
    "per_channel": (Int8WeightPerChannelFloat, {"weight_bit_width": 4}),
    "per_group": (Int4WeightPerGroupFloat, {"weight_group_size": 8}),
    "asymmetric": (ShiftedUint8WeightPerTensorFloat, {}),
    "asymmetric_per_channel": (ShiftedUint8WeightPerTensorFloat, {"weight_scaling_per_output_channel": True}),
}
PRUNINGS = {
    "magnitude": (MagnitudePruning, {"weight_pruning_sparsity": 0.6}),
    "2of4": (NMPruning, {}),
    "1of8": (NMPruning, {"weight_pruning_n": 1, "weight_pruning_m": 8}),
}


def pruned_quantizer(quant: type, mixin: type) -> type:
    return type(f"Pruned{quant.__name__}", (mixin, quant), {})


@pytest.mark.parametrize("kind", ["linear", "conv", "transpose"])
@pytest.mark.parametrize("pruning", list(PRUNINGS))
@pytest.mark.parametrize("quant", list(QUANTIZERS))
def test_pruned_weights_are_exactly_zero_after_quantization(quant, pruning, kind):
    base, quant_kwargs = QUANTIZERS[quant]
    mixin, pruning_kwargs = PRUNINGS[pruning]
    layer = make_layer(kind, weight_quant=pruned_quantizer(base, mixin), **quant_kwargs, **pruning_kwargs)
    mask = layer.weight_quant.pruning.mask
    assert mask.shape == layer.weight.shape and (~mask).any()
    quant_weight = layer.quant_weight()
    assert quant_weight.is_valid
    assert bool((quant_weight.value[~mask] == 0).all())
    # Prune, then quantize the kept weights: the same as quantizing an already pruned weight.
    plain = make_layer(kind, weight_quant=base, **quant_kwargs)
    with torch.no_grad():
        plain.weight.mul_(mask)
    expected = plain.quant_weight()
    assert torch.equal(quant_weight.value, expected.value)
    assert torch.equal(quant_weight.scale, expected.scale)
    assert torch.equal(quant_weight.zero_point, expected.zero_point)
    x = layer_input(kind)
    assert torch.equal(layer(x), plain(x))
    if mixin is NMPruning:
        m, n = pruning_kwargs.get("weight_pruning_m", 4), pruning_kwargs.get("weight_pruning_n", 2)
        kept = blocks(quant_weight.value != 0, layer.input_channel_dim, m).sum(dim=1)
        assert bool((kept <= n).all())  # a kept weight may still round to zero


def test_ready_quantizers_and_keyword_routing():
    layer = make_layer("linear", weight_quant=Int8WeightPerTensorFloatMagnitudePruned, weight_pruning_sparsity=0.7)
    assert isinstance(layer.weight_quant.pruning, MagnitudeMask)
    assert int((~layer.weight_quant.pruning.mask).sum()) == round(0.7 * 32 * 6)
    layer = make_layer("linear", weight_quant=Int8WeightPerChannelFloatMagnitudePruned)
    assert int((~layer.weight_quant.pruning.mask).sum()) == 96
    for quant in (Int8WeightPerTensorFloat2of4, Int8WeightPerChannelFloat2of4, Int4WeightPerChannelFloat2of4):
        transpose = make_layer("transpose", weight_quant=quant, weight_pruning_n=1)
        assert transpose.weight_quant.pruning.pruning_dim == 0  # ConvTranspose: input channels first
        assert bool((blocks(transpose.weight_quant.pruning.mask, 0, 4).sum(dim=1) == 1).all())
        assert transpose.quant_weight().is_valid
    assert make_layer("linear", weight_quant=Int8WeightPerTensorFloat).weight_quant.pruning is None
    with pytest.raises(QuantConfigError, match="weight_pruning_sparsity"):
        make_layer("linear", weight_quant=Int8WeightPerTensorFloat, weight_pruning_sparsity=0.5)


def test_a_layer_that_n_m_blocks_do_not_divide_is_refused_naming_the_quantizer():
    with pytest.raises(QuantConfigError, match=r"QuantConv2d\.weight_quant=.*size 6, not a multiple of pruning_m=4"):
        QuantConv2d(6, 4, 3, weight_quant=Int8WeightPerChannelFloat2of4)


@pytest.mark.parametrize("disable_quant", [False, True])
def test_pruned_weights_get_zero_gradient(disable_quant):
    layer = make_layer("conv", weight_quant=Int8WeightPerChannelFloat2of4)
    layer.weight_quant.disable_quant = disable_quant
    x = layer_input("conv")
    layer(x).square().sum().backward()
    mask = layer.weight_quant.pruning.mask
    assert bool((layer.weight.grad[~mask] == 0).all())
    assert bool((layer.weight.grad[mask] != 0).any())


def test_disabling_quantization_still_prunes():
    layer = make_layer("linear", weight_quant=Int8WeightPerChannelFloatMagnitudePruned)
    layer.weight_quant.disable_quant = True
    mask = layer.weight_quant.pruning.mask
    x = layer_input("linear")
    expected = nn.functional.linear(x, layer.weight * mask, layer.bias)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.quant_weight(), layer.weight * mask)


def test_the_eval_cache_follows_init_mask():
    layer = make_layer("linear", weight_quant=Int8WeightPerChannelFloatMagnitudePruned).eval()
    proxy, x = layer.weight_quant, layer_input("linear")
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer(x), before)  # served from the cache
        proxy.pruning.init_mask(torch.randn_like(layer.weight))
        after = layer(x)
        expected = nn.functional.linear(x, proxy.tensor_quant(layer.weight * proxy.pruning.mask)[0], layer.bias)
    assert not torch.equal(after, before)
    assert torch.equal(after, expected)


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    ("kind", "quant"),
    [
        ("linear", Int8WeightPerChannelFloatMagnitudePruned),
        ("conv", Int8WeightPerTensorFloat2of4),
        ("transpose", Int4WeightPerChannelFloat2of4),
    ],
)
def test_a_saved_mask_wins_over_the_rebuilt_one(kind, quant):
    source = make_layer(kind, seed=0, weight_quant=quant)
    with torch.no_grad():  # training moved the weights: the mask no longer follows from them
        source.weight.copy_(torch.randn_like(source.weight))
    recomputed = type(source.weight_quant.pruning)(**_mask_args(source.weight_quant.pruning))
    recomputed.init_mask(source.weight)
    assert not torch.equal(recomputed.mask, source.weight_quant.pruning.mask)

    fresh = make_layer(kind, seed=1, weight_quant=quant)
    assert not torch.equal(fresh.weight, source.weight)
    fresh.load_state_dict(round_trip(source.state_dict()))
    assert torch.equal(fresh.weight_quant.pruning.mask, source.weight_quant.pruning.mask)
    x = layer_input(kind)
    assert torch.equal(fresh(x), source(x))
    source.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), source(x))
        assert torch.equal(fresh.quant_weight().value, source.quant_weight().value)


def _mask_args(mask_module: nn.Module) -> dict:
    if isinstance(mask_module, MagnitudeMask):
        return {"pruning_sparsity": mask_module.pruning_sparsity}
    return {
        "pruning_n": mask_module.pruning_n,
        "pruning_m": mask_module.pruning_m,
        "pruning_dim": mask_module.pruning_dim,
    }


def test_a_checkpoint_without_a_mask_needs_ignore_missing_keys(monkeypatch):
    float_linear = nn.Linear(32, 6)
    layer = make_layer("linear", weight_quant=Int8WeightPerChannelFloatMagnitudePruned)
    with pytest.raises(RuntimeError, match=r"weight_quant\.pruning\.mask"):
        layer.load_state_dict(float_linear.state_dict())
    monkeypatch.setattr(config, "IGNORE_MISSING_KEYS", True)
    result = layer.load_state_dict(float_linear.state_dict())
    assert not result.missing_keys
    assert torch.equal(layer.weight_quant.pruning.mask, reference_magnitude_mask(float_linear.weight, 0.5))


def test_a_pruning_proxy_can_not_be_shared():
    first = make_layer("linear", weight_quant=Int8WeightPerChannelFloat2of4)
    with pytest.raises(QuantConfigError, match="can not be shared by 2 layers"):
        make_layer("linear", weight_quant=first.weight_quant)


def test_the_mask_follows_dtype_changes_and_pickles():
    layer = make_layer("conv", weight_quant=Int8WeightPerChannelFloat2of4)
    x = layer_input("conv")
    expected = layer(x)
    copied = pickle.loads(pickle.dumps(layer))
    assert torch.equal(copied(x), expected)
    layer.double()
    assert layer.weight_quant.pruning.mask.dtype == torch.bool
    torch.testing.assert_close(layer(x.double()), expected.double(), rtol=1e-4, atol=1e-5)


# -- prune() ------------------------------------------------------------------------------------


def small_model(seed: int = 0, **quant: type) -> nn.Sequential:
    torch.manual_seed(seed)
    conv_q = quant.get("conv", Int8WeightPerChannelFloat)
    linear_q = quant.get("linear", Int8WeightPerTensorFloat)
    return nn.Sequential(
        QuantConv2d(4, 8, 3, weight_quant=conv_q, weight_bit_width=4),
        nn.ReLU(),
        QuantConvTranspose2d(8, 4, 2, weight_quant=conv_q),
        nn.Flatten(),
        QuantLinear(4 * 6 * 6, 8, weight_quant=linear_q),
    )


MODEL_INPUT = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(2))


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert torch.equal(a(MODEL_INPUT), b(MODEL_INPUT))
    for la, lb in zip(a.modules(), b.modules(), strict=True):
        if hasattr(la, "weight_quant") and la.weight_quant is not None:
            assert torch.equal(la.quant_weight().value, lb.quant_weight().value)


@pytest.mark.parametrize(
    ("method", "kwargs", "mixin", "overrides"),
    [
        ("magnitude", {"sparsity": 0.65}, MagnitudePruning, {"pruning_sparsity": 0.65}),
        ("magnitude", {}, MagnitudePruning, {}),
        ("nm", {}, NMPruning, {}),
        ("nm", {"n": 1, "m": 4}, NMPruning, {"pruning_n": 1}),
    ],
)
def test_prune_equals_declaring_the_mixin(method, kwargs, mixin, overrides):
    declared = small_model(
        conv=pruned_quantizer(Int8WeightPerChannelFloat, mixin).let(**overrides),
        linear=pruned_quantizer(Int8WeightPerTensorFloat, mixin).let(**overrides),
    )
    model = small_model()
    assert prune(model, method, **kwargs) is model
    assert_same_model(model, declared)
    assert all(layer.weight_quant.pruning is not None for layer in (model[0], model[2], model[4]))
    assert model[0].weight_quant.tensor_quant.msb_clamp_bit_width_impl() == 4  # the layer's override stays
    assert_same_model(pickle.loads(pickle.dumps(model)), declared)
    reloaded = small_model(seed=5)
    prune(reloaded, method, **kwargs)
    reloaded.load_state_dict(round_trip(model.state_dict()))
    assert_same_model(reloaded, declared)


def test_prune_selects_layers_by_pattern_and_keeps_learned_quantizer_state():
    learned = Int8WeightPerTensorFloat.let(scaling_impl=ParameterScaling, scaling_init=0.05)
    model = small_model(linear=learned)
    with torch.no_grad():
        model[4].weight_quant.tensor_quant.scaling_impl.value.fill_(0.125)
    prune(model, "magnitude", 0.3, layers=["4", "0"])
    assert model[2].weight_quant.pruning is None
    assert model[0].weight_quant.pruning is not None
    assert model[4].weight_quant.tensor_quant.scaling_impl.value.item() == 0.125
    prune(model, "nm", layers="2")  # a single pattern; the others keep their masks
    assert isinstance(model[2].weight_quant.pruning, NMMask)
    assert isinstance(model[4].weight_quant.pruning, MagnitudeMask)


def test_prune_again_replaces_the_declaration():
    model = prune(small_model(), "magnitude", 0.5)
    prune(model, "nm", n=1, m=4)
    assert_same_model(model, prune(small_model(), "nm", n=1, m=4))


def test_global_scope_uses_one_threshold():
    model = small_model()
    with torch.no_grad():
        model[0].weight.mul_(20.0)  # large weights: this layer should keep most of its weights
    prune(model, "magnitude", 0.6, scope="global")
    layers = [model[0], model[2], model[4]]
    weights = [layer.weight.detach() for layer in layers]
    masks = [layer.weight_quant.pruning.mask for layer in layers]
    total = sum(w.numel() for w in weights)
    assert sum(int((~m).sum()) for m in masks) == round(0.6 * total)
    kept = torch.cat([w.abs()[m] for w, m in zip(weights, masks, strict=True)])
    dropped = torch.cat([w.abs()[~m] for w, m in zip(weights, masks, strict=True)])
    assert kept.min() >= dropped.max()
    fractions = [float((~m).float().mean()) for m in masks]
    assert fractions[0] < 0.2 and max(fractions) > 0.6  # one threshold, not one fraction per layer
    # Each layer holds a magnitude mask of its own share.
    for layer, fraction in zip(layers, fractions, strict=True):
        assert math.isclose(layer.weight_quant.pruning.pruning_sparsity, fraction, rel_tol=1e-6)


def test_global_scope_refuses_to_empty_a_layer():
    model = small_model()
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
    with pytest.raises(QuantConfigError, match="every weight of layer '2'"):
        prune(model, "magnitude", 0.9, scope="global")
    assert all(layer.weight_quant.pruning is None for layer in (model[0], model[2], model[4]))


def test_prune_errors_name_the_layer_or_pattern():
    model = nn.Sequential(small_model(), QuantLinear(8, 8, weight_quant=None), nn.Linear(8, 3))
    with pytest.raises(QuantConfigError, match=r"layer '1' \(QuantLinear.*no weight quantizer"):
        prune(model, layers=["1"])
    with pytest.raises(QuantConfigError, match=r"layer '2' \(Linear.*no weight quantizer"):
        prune(model, layers=["0.*", "2"])
    with pytest.raises(QuantConfigError, match=r"'classifier\*' matches no quant layer"):
        prune(model, layers=["classifier*"])
    with pytest.raises(QuantConfigError, match=r"method must be one of .*'random'"):
        prune(model, "random")
    with pytest.raises(QuantConfigError, match=r"scope must be one of .*'model'"):
        prune(model, scope="model")
    with pytest.raises(QuantConfigError, match=r"scope='global' is for method='magnitude' only"):
        prune(model, "nm", scope="global")
    with pytest.raises(QuantConfigError, match=r"prune\(sparsity=1\.5\).*pruning_sparsity"):
        prune(model, sparsity=1.5)
    with pytest.raises(QuantConfigError, match=r"prune\(n=3, m=2\).*pruning_n"):
        prune(model, "nm", n=3, m=2)
    with pytest.raises(QuantConfigError, match="has no quant layer with a weight quantizer"):
        prune(nn.Sequential(nn.Linear(2, 2)))
    # N:M blocks that do not divide a layer: nothing is changed, the error names the layer.
    odd = nn.Sequential(QuantLinear(8, 4, weight_quant=Int8WeightPerTensorFloat))
    odd.append(QuantLinear(4, 6, weight_quant=Int8WeightPerTensorFloat))
    with pytest.raises(QuantConfigError, match=r"layer '1'.*size 4, not a multiple of pruning_m=8"):
        prune(odd, "nm", n=2, m=8)
    assert odd[0].weight_quant.pruning is None
    shared = nn.Sequential(QuantLinear(8, 8, weight_quant=Int8WeightPerTensorFloat))
    shared.append(QuantLinear(8, 8, weight_quant=shared[0].weight_quant))
    with pytest.raises(QuantConfigError, match=r"layer '0' shares its weight quantizer"):
        prune(shared)


# -- sparsity() ---------------------------------------------------------------------------------


def test_sparsity_counts_the_effective_zeros():
    model = small_model()
    model.append(QuantLinear(8, 4, weight_quant=None))
    model.append(nn.Linear(4, 2))  # not a quant layer: not reported
    prune(model, "magnitude", 0.7, layers=["0"])
    prune(model, "nm", layers=["4"])
    with torch.no_grad():
        model[5].weight[0].zero_()  # zeros the weight holds itself count too
    report = sparsity(model)
    assert isinstance(report, SparsityReport) and len(report) == 4
    assert [entry.name for entry in report] == ["0", "2", "4", "5"]
    conv = report["0"]
    assert conv == LayerSparsity("0", round(0.7 * 8 * 4 * 9), 8 * 4 * 9)
    assert conv.fraction == conv.zeros / conv.total
    assert report["2"].zeros == 0 and report["2"].total == 8 * 4 * 4
    assert report["4"].zeros == 144 * 8 // 2
    assert (report["5"].zeros, report["5"].total) == (8, 32)
    assert report.zeros == sum(e.zeros for e in report) and report.total == sum(e.total for e in report)
    assert report.fraction == report.zeros / report.total
    with pytest.raises(KeyError, match="'6'"):
        report["6"]
    with pytest.raises(AttributeError):
        conv.zeros = 0  # frozen
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "zeros", "total", "sparsity"]
    assert lines[-1].split()[0] == "total" and lines[-1].endswith(f"{100 * report.fraction:.2f}%")
    rows = [line for line in lines if line.endswith("%")]
    assert len(rows) == 5 and len({len(row) for row in rows}) == 1  # right-aligned columns
    assert f"{100 * conv.fraction:.2f}%" in lines[2]


def test_sparsity_sees_the_mask_not_the_stored_weight():
    model = nn.Sequential(make_layer("linear", weight_quant=Int8WeightPerChannelFloatMagnitudePruned))
    assert int((model[0].weight == 0).sum()) == 0
    report = sparsity(model)
    assert report["0"].zeros == 96 and report.fraction == 0.5
    assert sparsity(nn.Sequential()).fraction == 0.0
