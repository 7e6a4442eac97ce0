"""The native activation fake quantization (kernels/actq.py, csrc/actq.cpp) is bit-identical to the torch version
the reference path runs, for every activation format, dynamic and static, linear and convolution inputs."""
import pytest
import torch
from torch import nn

from modelpress.quant import QuantConv2d, QuantLinear, kernels
from modelpress.quant.activation import uint8_params
from modelpress.quant.kernels import actq, build

pytestmark = pytest.mark.skipif(build.load() is None, reason="no native build on this machine")

ACTS = ["int8", "int8:static", "int4", "int4:static", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3:static", "fp8_e5m2:static"]


def hard_inputs(rows: int, k: int) -> torch.Tensor:
    """Gaussian rows at several magnitudes, plus the values rounding is most likely to get wrong."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-6, 3, rows).reshape(-1, 1)
    x[0] = 0.0  # an all-zero row: scale 1
    x[1, ::2] = -0.0
    x[2] = torch.randn(k, generator=g).abs() + 0.5  # all positive: zero point 0
    x[3] = -(torch.randn(k, generator=g).abs() + 0.5)  # all negative
    # fp8 ties and grid edges relative to the row's largest value (448 / 57344 scale the grid to the input)
    x[4, :8] = torch.tensor([448.0, 1.0625, 1.1875, 0.015625, 0.0146484375, 0.0009765625, 0.00146484375, -240.0])
    return x


def layer_for(act: str, k: int) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(k, 8), "int8", act)
    if act.endswith(":static"):
        calib = torch.randn(64, k) * 3
        if act.startswith("fp8"):
            layer.set_input_range(calib.abs().max() / (448.0 if "e4m3" in act else 57344.0), torch.zeros(()))
        else:
            layer.set_input_range(*uint8_params(calib.min(), calib.max(), layer.act.bits))
    return layer


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rows,k", [(1, 64), (33, 200), (700, 96)])
def test_native_activation_quantization_is_bit_identical(act, rows, k):
    layer = layer_for(act, k)
    x = hard_inputs(rows, k) if rows >= 5 else torch.randn(rows, k)
    ref = layer.quantize_input(x)
    got = actq.quantize_input(layer, x)
    assert got.data_ptr() != x.data_ptr()
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # bit patterns: -0.0 and 0.0 differ


@pytest.mark.parametrize("act", ["int8", "fp8_e4m3", "int8:static"])
def test_every_fp8_and_int_grid_value_round_trips(act):
    """Dense sweep through the whole range (ties included: every midpoint of the fp8 grid is hit)."""
    layer = layer_for(act, 64)
    grid = torch.linspace(-448.0, 448.0, 64 * 1024).reshape(-1, 64)
    assert torch.equal(actq.quantize_input(layer, grid).view(torch.int32), layer.quantize_input(grid).view(torch.int32))


@pytest.mark.parametrize("act", ["int8", "fp8_e4m3", "int8:static"])
def test_convolution_inputs_are_per_sample(act):
    torch.manual_seed(0)
    layer = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), "int8", act)
    if act.endswith(":static"):
        layer.set_input_range(*uint8_params(torch.tensor(-3.0), torch.tensor(3.0)))
    x = torch.randn(5, 3, 8, 8) * torch.tensor([0.01, 1, 10, 100, 1000]).reshape(-1, 1, 1, 1)
    assert torch.equal(actq.quantize_input(layer, x, conv=True), layer.quantize_conv_input(x))
    xl = x.contiguous(memory_format=torch.channels_last)  # NHWC: each sample is still one block of memory
    yl = actq.quantize_input(layer, xl, conv=True)
    assert yl.is_contiguous(memory_format=torch.channels_last) and torch.equal(yl, layer.quantize_conv_input(x))


@pytest.mark.parametrize("act", ["int8", "fp8_e4m3", "fp8_e4m3:static"])
def test_nan_inf_and_other_inputs_fall_back_to_torch(act):
    layer = layer_for(act, 32)
    x = torch.randn(4, 32)
    x[2, 5] = float("nan")
    x[3, 1] = float("inf")
    got, ref = actq.quantize_input(layer, x), layer.quantize_input(x)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())
    xt = torch.randn(32, 4).t()  # not contiguous, bf16: the torch version
    assert torch.equal(actq.quantize_input(layer, xt), layer.quantize_input(xt))
    xb = torch.randn(4, 32, dtype=torch.bfloat16)
    assert torch.equal(actq.quantize_input(layer, xb), layer.quantize_input(xb))


def test_dense_path_uses_it_and_matches_reference():
    layer = layer_for("fp8_e4m3", 64)
    x = hard_inputs(9, 64)
    assert torch.equal(kernels.run(layer, "dense", x), layer.reference(x))
