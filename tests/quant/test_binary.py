"""The 1-bit path (int1 per-channel weights, int8 activations) on the int8 GEMM, against the reference path."""
import pytest
import torch
from torch import nn

from modelpress.quant import QuantLinear, kernels
from modelpress.quant.activation import uint8_params

INT_KERNEL_REL_L2 = 2e-6  # as for int_mm: the same int32 sums, fp32 scale products in another order


def _layer(k, n, act, bias=True):
    torch.manual_seed(0)
    return QuantLinear.from_float(nn.Linear(k, n, bias=bias), "int1", act)


def _reference(layer, x):
    layer.use_kernels = False
    try:
        return layer(x)
    finally:
        layer.use_kernels = True


@pytest.mark.parametrize("k, n", [(256, 48), (100, 30), (8, 1)])
@pytest.mark.parametrize("m", [1, 16, 17, 40])
@pytest.mark.parametrize("act", ["int8", "int8:static"])
@pytest.mark.parametrize("bias", [True, False])
def test_int1_gemm_matches_the_reference(k, n, m, act, bias):
    layer = _layer(k, n, act, bias)
    if act == "int8:static":
        calib = torch.randn(64, k, generator=torch.Generator().manual_seed(1))
        layer.set_input_range(*uint8_params(calib.min(), calib.max()))
    x = 2 * torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    assert kernels.select(layer, x) == "int1_mm"
    y, ref = layer(x), _reference(layer, x)
    assert ((y - ref).norm() / ref.norm()).item() <= INT_KERNEL_REL_L2
    signs, colsum, _ = layer._kernel_cache["int1_mm"]
    assert signs.dtype == torch.int8 and set(signs.unique().tolist()) <= {-1, 1}
    assert torch.equal(colsum, signs.sum(0, dtype=torch.int32))


def test_int1_without_int8_activations_or_with_groups_takes_the_reference_path():
    x = torch.randn(4, 64)
    assert kernels.select(_layer(64, 8, None), x) is None
    torch.manual_seed(0)
    grouped = QuantLinear.from_float(nn.Linear(64, 8), "int1:g32", "int8")
    assert kernels.select(grouped, x) is None
    assert torch.allclose(grouped(x), _reference(grouped, x))
    assert grouped.weight_codes.numel() == 64 * 8 // 8  # the stored codes stay one bit per weight
