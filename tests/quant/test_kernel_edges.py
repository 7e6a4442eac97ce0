"""Edge cases found by fuzzing the kernel paths against the reference path: a Linear with one input, convolution
geometries torch's bf16 product gets wrong, NaN rows on bf16 products, empty batches, bf16 after quantized
activations. Each runs the paths this CPU has (the others skip)."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.quant import QuantConv2d, QuantLinear, kernels, set_kernels
from modelpress.quant.kernels import _bf16_conv_ok, paths
from modelpress.quant.kernels.torch_ops import k_by_n

CPU = kernels.cpu_info()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_a_one_input_weight_is_laid_out_row_major():
    """w.t().contiguous() of [n, 1] keeps strides (1, 1), which oneDNN's integer product misread (garbage)."""
    w = torch.arange(33, dtype=torch.int8).reshape(33, 1)
    t = k_by_n(w)
    assert t.shape == (1, 33) and t.stride() == (33, 1) and torch.equal(t, w.t())


@pytest.mark.parametrize("weights", ["int8", "int1"])
def test_integer_products_of_a_one_input_layer(weights):
    name = "int_mm" if weights == "int8" else "int1_mm"
    q = QuantLinear.from_float(nn.Linear(1, 33), weights, "int8")
    x = torch.randn(7, 1)
    if not paths.applies("linear", name, q, CPU, 7):
        pytest.skip(f"{name} is not offered on this CPU")
    with torch.no_grad():
        assert _rel(kernels.run(q, name, x), q.reference(x)) < 1e-3


def test_bf16_convolutions_are_left_out_where_torch_computes_garbage():
    """A stride above 1 with an output one pixel wide: torch's bf16 convolution gives relative error ~1 or NaN."""
    q = QuantConv2d.from_float(nn.Conv2d(64, 64, 3, stride=2), "int8")
    assert not _bf16_conv_ok(q, (64, 11, 4)) and _bf16_conv_ok(q, (64, 11, 8))
    assert _bf16_conv_ok(QuantConv2d.from_float(nn.Conv2d(64, 64, 3), "int8"), (64, 11, 3))


@pytest.mark.parametrize("name", ["native-bf16", "dense-bf16"])
def test_nan_rows_stay_in_their_rows_on_bf16_products(name):
    """oneDNN's bf16 product spread an Inf of one row into others (K = 33): such inputs decline to the row split."""
    q = QuantLinear.from_float(nn.Linear(33, 8), "int8")
    q.kernel_mode = "speed"
    if not paths.applies("linear", name, q, CPU, 64):
        pytest.skip(f"{name} is not offered on this CPU")
    x = torch.randn(64, 33)
    x[0, 3], x[5, 1] = float("inf"), float("nan")
    with torch.no_grad():
        y, ref = kernels.run(q, name, x), q.reference(x)
    clean = torch.ones(64, dtype=torch.bool)
    clean[[0, 5]] = False
    assert torch.isfinite(y[clean]).all() and _rel(y[clean], ref[clean]) < 1e-2
    assert torch.equal(y[~clean].isnan(), ref[~clean].isnan())


def test_bf16_copies_are_not_used_after_int8_activations():
    """After int8 activations a bf16 product exceeds W8A8's tolerance (2.5e-3 against 1e-3)."""
    assert not paths.applies("linear", "dense-bf16", QuantLinear.from_float(nn.Linear(8, 8), "int4:g8", "int8"), CPU, 8)
    fp8 = QuantLinear.from_float(nn.Linear(8, 8), "fp8_e4m3", "fp8_e4m3")
    assert paths.applies("linear", "dense-bf16", fp8, CPU, 8) == CPU.bf16_fast


@pytest.mark.parametrize("act", ["int8", "fp8_e4m3"])
def test_empty_batches_give_empty_outputs(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 25, 4))
    calib = [torch.randn(4, 8, 5, 5)]
    mp.quantize_(model, mp.QuantConfig(weights="int8", activations=act), calib=calib)
    for on in (False, True):
        set_kernels(model, on)
        with torch.no_grad():
            assert model(torch.randn(0, 8, 5, 5)).shape == (0, 4)


def test_finite_rows_whose_sum_overflows_run_the_reference_path():
    """The bf16 paths decline an input whose sum is not finite; finite rows of huge values then take the reference."""
    q = QuantLinear.from_float(nn.Linear(33, 8), "int8")
    if not paths.applies("linear", "native-bf16", q, CPU, 64):
        pytest.skip("no bf16 tiles on this CPU")
    x = torch.randn(64, 33)
    x[:8] = 3e38  # finite, but their sum overflows
    with torch.no_grad():
        y, ref = kernels.run(q, "native-bf16", x), q.reference(x)
    assert torch.equal(y[:8].isfinite(), ref[:8].isfinite()) and torch.isfinite(y[8:]).all()
