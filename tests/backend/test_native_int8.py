"""to_native_int8: the integer model on PyTorch's int8 CPU kernels, against the bit-exact integer
model (compare_native), the fusion it does on a traced ResNet, the per-layer fallback, and what
it refuses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import quantwire
from quantwire.backend import BackendError, IntegerConfig, compare_native, to_integer, to_native_int8
from quantwire.backend.layers import Grid, IntegerWBIOL
from quantwire.backend.native import NativeAdd, NativeWBIOL, quantize, quint8_grid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def calibrated(model: nn.Module, config, batch: torch.Tensor) -> nn.Module:
    qmodel = quantwire.quantize_model(model, config)
    quantwire.calibrate(qmodel, [batch], progress=False)
    return qmodel.eval()


def settled_resnet18() -> nn.Module:
    """A random resnet18 whose BatchNorm statistics follow a few training-mode batches."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.fixture(scope="module")
def resnet18_w8a8() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model = settled_resnet18()
    x = torch.randn(4, 3, 32, 32)
    imodel = to_integer(calibrated(model, "w8a8", x))
    return imodel, to_native_int8(imodel, x), x


def test_resnet18_keeps_activations_int8_between_layers(resnet18_w8a8):
    imodel, native, _ = resnet18_w8a8
    assert not any(isinstance(m, IntegerWBIOL) for m in native.modules())
    layers = [m for m in native.modules() if isinstance(m, NativeWBIOL)]
    assert len(layers) == 21
    # The classifier (after average pooling) produces real numbers, and the stem does when the
    # first block's conv and residual add quantize its output onto different grids; every other
    # conv emits its consumers' codes.
    stem_grids = {imodel.layer1[0].conv1.input_grid.scale.item(), imodel.layer1[0].residual_add.grid.scale.item()}
    real = sorted(m.name for m in layers if m.output_grid is None)
    assert real == (["conv1", "fc"] if len(stem_grids) == 2 else ["fc"])
    assert sum(m.relu for m in layers) == 8 + (len(stem_grids) == 1)  # ReLU fused into each block's first conv
    adds = [m for m in native.modules() if isinstance(m, NativeAdd)]
    assert adds and all(m.output_grid is not None and m.relu for m in adds[:-1])
    assert adds[-1].output_grid is None  # the last add feeds average pooling


def test_resnet18_agrees_with_the_integer_model_within_one_step(resnet18_w8a8):
    imodel, native, x = resnet18_w8a8
    fresh = torch.randn(4, 3, 32, 32)
    for data in (x, fresh):
        report = compare_native(native, imodel, data)
        assert report.layers.within_one >= 0.999
        assert report.layers.largest <= 1.0
        assert report.layers.exact >= 0.999
        with torch.no_grad():
            expected, got = imodel(data.double()), native(data).double()
        assert nn.functional.cosine_similarity(expected.flatten(), got.flatten(), dim=0) > 0.99


def test_mlp_with_exact_scales_is_bit_exact():
    """Power-of-two scales and int32 biases: the kernels' float32 requantization is exact."""
    x = torch.randn(64, 32)
    imodel = to_integer(calibrated(mlp(), "w8a8_po2", x), IntegerConfig(swl=40))
    report = compare_native(to_native_int8(imodel, x), imodel, torch.randn(64, 32))
    assert report.layers.largest == 0.0
    assert report.output.largest == 0.0


@pytest.mark.slow
def test_resnet18_with_exact_scales_is_bit_exact():
    """Power-of-two scales and int32 biases: the kernels' float32 requantization is exact too."""
    x = torch.randn(2, 3, 32, 32)
    qmodel = calibrated(settled_resnet18(), {"preset": "w8a8_po2", "fold_bn": True}, x)
    imodel = to_integer(qmodel, IntegerConfig(swl=40))
    report = compare_native(to_native_int8(imodel, x), imodel, x)
    assert report.layers.largest == 0.0
    assert report.output.largest == 0.0


def test_the_integer_model_is_left_unchanged(resnet18_w8a8):
    imodel, _, x = resnet18_w8a8
    with torch.no_grad():
        before = imodel(x.double())
    to_native_int8(imodel, x)
    with torch.no_grad():
        assert torch.equal(imodel(x.double()), before)
    assert any(isinstance(m, IntegerWBIOL) for m in imodel.modules())


def test_mlp_fuses_relu_into_linear_and_matches_the_integer_model():
    x = torch.randn(64, 32)
    imodel = to_integer(calibrated(mlp(), "w8a8", x))
    native = to_native_int8(imodel, x)
    layers = [m for m in native.modules() if isinstance(m, NativeWBIOL)]
    assert [m.relu for m in layers] == [True, True, False]
    assert [m.output_grid is None for m in layers] == [False, False, True]
    report = compare_native(native, imodel, torch.randn(64, 32))
    assert report.output.within_one >= 0.999 and report.layers.within_one >= 0.999


class _Branchy(nn.Module):
    """A model FX can not trace (its control flow depends on the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.second(h)


def test_a_model_that_does_not_trace_is_lowered_layer_by_layer():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    imodel = to_integer(calibrated(_Branchy().eval(), "w8a8", x))
    native = to_native_int8(imodel, x)
    assert not isinstance(native, torch.fx.GraphModule)
    assert all(m.output_grid is None for m in native.modules() if isinstance(m, NativeWBIOL))
    report = compare_native(native, imodel, x)
    assert report.output.within_one >= 0.999 and report.layers.exact >= 0.999


def test_a_vision_transformer_lowers_its_linear_layers():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    imodel = to_integer(calibrated(model, "w8a8", x))
    native = to_native_int8(imodel, x)
    # patch embedding, 4 linear layers per block, the head
    assert sum(isinstance(m, NativeWBIOL) for m in native.modules()) == 1 + 4 * 2 + 1
    report = compare_native(native, imodel, x)
    assert report.layers.within_one >= 0.999
    assert report.output.within_one >= 0.999


def test_a_16_bit_grid_is_refused_naming_the_layer():
    x = torch.randn(16, 32)
    imodel = to_integer(calibrated(mlp(), {"input": {"bit_width": 16}}, x))
    with pytest.raises(BackendError, match=r"^0\.input_grid: a 16-bit grid does not fit int8 kernels"):
        to_native_int8(imodel, x)


def test_per_group_scales_are_refused_naming_the_layer():
    x = torch.randn(16, 32)
    imodel = to_integer(calibrated(mlp(), "w8a8", x))
    layer = imodel[2]
    layer.rescale.real_multiplier = torch.ones(2 * layer.matmul.weight.shape[0], dtype=torch.float64)
    with pytest.raises(BackendError, match=r"^2: 128 rescale multipliers for 64 output channels \(per-group"):
        to_native_int8(imodel, x)


def test_weights_wider_than_8_bits_are_refused_naming_the_layer():
    x = torch.randn(16, 32)
    imodel = to_integer(calibrated(mlp(), {"weight": {"bit_width": 10}}, x))
    with pytest.raises(BackendError, match=r"^0: weight codes reach \[-?\d+, \d+\]; int8 kernels take \[-128, 127\]"):
        to_native_int8(imodel, x)


def test_an_unknown_engine_is_refused():
    x = torch.randn(16, 32)
    imodel = to_integer(calibrated(mlp(), "w8a8", x))
    with pytest.raises(BackendError, match="quantized engine 'tpu' is not available"):
        to_native_int8(imodel, x, engine="tpu")


def _grid(scale: float, zero_point: int, bit_width: int, signed: bool) -> Grid:
    qmin, qmax = (-(2 ** (bit_width - 1)), 2 ** (bit_width - 1) - 1) if signed else (0, 2**bit_width - 1)
    return Grid(
        torch.tensor(scale, dtype=torch.float64), torch.tensor(float(zero_point)), bit_width, signed, qmin, qmax
    )


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(1e-3, 10.0),
    bit_width=st.integers(2, 8),
    signed=st.booleans(),
    offset=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_a_grid_maps_onto_quint8_keeping_every_code(scale, bit_width, signed, offset, data):
    """Every code of an integer grid (zero point anywhere in its range) survives quint8: a real on
    the grid comes back as the same code shifted by 128 for signed grids, and reals beyond the
    grid clamp to its own range, not quint8's."""
    qmin, qmax = (-(2 ** (bit_width - 1)), 2 ** (bit_width - 1) - 1) if signed else (0, 2**bit_width - 1)
    zero_point = data.draw(st.integers(qmin, qmax))
    grid = _grid(scale, zero_point, bit_width, signed)
    quint = quint8_grid(grid, "layer")
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float64)
    reals = (codes - zero_point) * scale + (offset - 0.5) * 0.9 * scale  # within 0.45 steps of each code
    q = quantize(reals, quint)
    assert torch.equal(q.int_repr().double() - (128 if signed else 0), codes)
    beyond = quantize(torch.tensor([-1e6, 1e6]), quint).int_repr().double() - (128 if signed else 0)
    assert beyond.tolist() == [qmin, qmax]


def test_a_grid_wider_than_quint8_is_refused():
    with pytest.raises(BackendError, match=r"layer: a 9-bit grid does not fit int8 kernels"):
        quint8_grid(_grid(0.1, 0, 9, True), "layer")
    per_channel = Grid(torch.ones(4, dtype=torch.float64), torch.zeros(4), 8, True, -128, 127)
    with pytest.raises(BackendError, match=r"layer: int8 kernels need a per-tensor activation scale \(got 4\)"):
        quint8_grid(per_channel, "layer")
