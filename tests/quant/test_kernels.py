"""Every CPU kernel kernels.select can return, against the dequantize-then-compute reference path.

The reference is always computed in fp32 (`use_kernels = False`, input cast to fp32), so a bf16 caller is
checked against the exact math rather than against another bf16 computation.
"""
import pytest
import torch
from torch import nn

from modelpress.quant import QuantLinear, kernels
from modelpress.quant.activation import uint8_params

# int8pack / int4pack cast the input (and the per-channel / per-group scales) to bf16 inside the kernel:
# relative rounding 2**-9 per operand, accumulated over K. Measured 1.7e-3..3.3e-3 at K=256.
BF16_KERNEL_REL_L2 = 1e-2
# int_mm / linear_dynamic consume exactly the uint8 codes the reference fake-quantizes and accumulate in int32:
# the only differences are the order of the fp32 scale products and the fp32 accumulation of the reference.
# Measured 0.8e-7..2.5e-7 at K=256 (fp32 callers); bound set ~8x above that.
INT_KERNEL_REL_L2 = 2e-6
# A bf16 caller of an integer kernel gets the exact result rounded once to bf16: within one bf16 ulp
# (relative 2**-8) of the fp32 reference, elementwise.
BF16_ULP = 2.0**-8

K, N = 256, 48  # K: a multiple of every int4 group (32..256) and of 16; N: a multiple of 16 for int4pack
INT4_FORMATS = [f"int4:g{g}{s}" for g in (32, 64, 128, 256) for s in ("", ":asym")]

# (format, activations, M, expected kernel)
CASES = (
    [("int8", None, m, "int8pack") for m in (1, 5)]
    + [(f, None, 3, "int4pack") for f in INT4_FORMATS]
    + [("int4:g32", None, 1, "int4pack")]
    + [("int8", "int8", 1, "linear_dynamic")]
    + [("int8", "int8", m, "int_mm") for m in (2, 16, 17, 33)]
    + [("int8", "int8:static", m, "int_mm") for m in (1, 17)]
)
SHAPES_3D = {1: (1, 1), 2: (2, 1), 3: (1, 3), 5: (5, 1), 16: (4, 4), 17: (1, 17), 33: (3, 11)}


def rel_l2(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def make_layer(fmt, act, bias=True, k=K, n=N, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_float(nn.Linear(k, n, bias=bias), fmt, act)


def reference(layer, x):
    layer.use_kernels = False
    try:
        return layer(x.float())
    finally:
        layer.use_kernels = True


def calibrate_static(layer, k=K):
    calib = torch.randn(64, k, generator=torch.Generator().manual_seed(1))
    layer.set_input_range(*uint8_params(calib.min(), calib.max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("fmt,act,m,expected", CASES, ids=[f"{c[3]}-{c[0]}-{c[1]}-M{c[2]}" for c in CASES])
def test_kernel_matches_reference(fmt, act, m, expected, dims, bias, dtype):
    layer = make_layer(fmt, act, bias)
    if act == "int8:static":
        calibrate_static(layer)
    torch.manual_seed(2)
    x2 = 2 * torch.randn(m, K)
    x = x2 if dims == 2 else x2.reshape(*SHAPES_3D[m], K)
    x = x.to(dtype)

    assert kernels.select(layer, x.reshape(-1, K)) == expected
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], N)
    ref = reference(layer, x)
    assert ref.dtype == torch.float32

    if expected in ("int8pack", "int4pack"):
        assert rel_l2(y, ref) <= BF16_KERNEL_REL_L2
    elif dtype == torch.float32:
        assert rel_l2(y, ref) <= INT_KERNEL_REL_L2
    else:
        torch.testing.assert_close(y.float(), ref, rtol=BF16_ULP, atol=1e-5 * ref.abs().max().item())
    assert len(layer._kernel_cache) == 1  # the kernel (not the reference path) ran and cached its layout


def test_static_int8_clamps_like_reference():
    """Inputs outside the calibrated range saturate the same way in the kernel and the reference."""
    layer = make_layer("int8", "int8:static")
    calibrate_static(layer)
    x = 10 * torch.randn(20, K)  # mostly outside the [-4, 4]-ish calibration range
    assert kernels.select(layer, x) == "int_mm"
    assert rel_l2(layer(x), reference(layer, x)) <= INT_KERNEL_REL_L2


def test_dynamic_int8_is_per_token():
    """One token's output does not depend on the other tokens in the batch (per-token scales)."""
    layer = make_layer("int8", "int8")
    torch.manual_seed(3)
    x = torch.randn(20, K)
    alone = layer(x[:1])  # M=1: linear_dynamic
    x[1:] *= 100
    batched = layer(x)[:1]  # M=20: int_mm
    assert rel_l2(batched, alone) <= INT_KERNEL_REL_L2


@pytest.mark.parametrize("fmt,act,k,n", [
    ("int4:g32", None, K, 40),  # N not a multiple of 16
    ("int4:g16", None, K, N),  # group below 32
    ("int4:g512", None, 512, N),  # group above 256
    ("int4:g32", None, 48, N),  # K not a multiple of the group
    ("int4", None, K, N),  # int4 per channel
    ("int4:tensor", None, K, N),
    ("int8:asym", None, K, N),
    ("int8:g32", None, K, N),
    ("int8:tensor", None, K, N),
    ("int8", None, 100, N),  # K not a multiple of 16: the int8pack kernel has no K tail
    ("int8", None, 24, N),
    ("int3:g32", None, K, N),
    ("nvfp4", None, K, N),
    ("mxfp4", None, K, N),
    ("fp8_e4m3", None, K, N),
    ("int8", "fp8_e4m3", K, N),  # fp8 activations are emulated
    ("int8", "fp8_e4m3:static", K, N),
    ("int4:g32", "int8", K, N),  # int8 activations need int8 weights
    ("int8:asym", "int8", K, N),
    ("int8:g32", "int8:static", K, N),
])
def test_select_returns_none_and_reference_runs(fmt, act, k, n):
    layer = make_layer(fmt, act, k=k, n=n)
    x = torch.randn(4, k)
    assert kernels.select(layer, x) is None
    assert kernels.select(layer, x[:1]) is None
    y = layer(x)
    assert y.shape == (4, n) and y.dtype == torch.float32
    assert torch.equal(y, layer.reference(x))
    assert layer._kernel_cache == {}


def test_select_none_when_disabled_or_integer_input():
    layer = make_layer("int8", None)
    assert kernels.select(layer, torch.randn(2, K)) == "int8pack"
    assert kernels.select(layer, torch.ones(2, K, dtype=torch.int64)) is None
    layer.use_kernels = False
    assert kernels.select(layer, torch.randn(2, K)) is None


@pytest.mark.parametrize("fmt,act", [("int8", None), ("int4:g32", None), ("int8", "int8")])
def test_misaligned_bf16_input(fmt, act):
    """A bf16 view that starts off an aligned boundary (int8pack used to crash on it)."""
    layer = make_layer(fmt, act)
    x = torch.randn(3 * K + 3, dtype=torch.bfloat16)[3:].view(3, K)
    assert x.data_ptr() % 32 != 0 and kernels.select(layer, x) is not None
    assert rel_l2(layer(x), reference(layer, x)) <= BF16_KERNEL_REL_L2


def test_non_contiguous_input():
    layer = make_layer("int8", None)
    x = torch.randn(5, K + 8, dtype=torch.bfloat16)[:, :K]
    assert rel_l2(layer(x), reference(layer, x)) <= BF16_KERNEL_REL_L2


def test_kernel_layout_rebuilt_after_load_state_dict():
    a, b = make_layer("int4:g32", None, seed=0), make_layer("int4:g32", None, seed=1)
    x = torch.randn(3, K)
    a(x)  # builds and caches a's packed layout
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))
