"""FP4 E2M1 weights (MXFP4, NVFP4, fp4_e2m1 groups of 16 or 32) on the native 4-bit products: each code read through a table of
2 x its value (integers in [-12, 12]) with the group scale halved, so the sums are those of the int4 kernels; the
result is the reference path's within the 14-bit activation rounding (as for int4)."""
import pytest
import torch
from torch import nn

from modelpress.quant import QuantConv2d, QuantLinear, kernels
from modelpress.quant.kernels import build, cpu, native, paths

pytestmark = pytest.mark.skipif(build.load() is None, reason="no native build on this machine")
REL = 1e-3  # weight-only native paths: 14-bit activations inside (measured ~1e-4)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def isas():
    """The native builds this process may run (from the one chosen for it down), and the portable one."""
    best = kernels.cpu_info().isa
    if best == "none":
        return []
    return sorted({i for i in cpu.ISAS[cpu.ISAS.index(best):] if i in build.load().available()} | {"scalar"})


@pytest.mark.parametrize("fmt", ["mxfp4", "fp4_e2m1:g32", "nvfp4", "fp4_e2m1:g16"])
@pytest.mark.parametrize("k", [64, 96, 256])
def test_linear_matches_reference_on_every_build(fmt, k):
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(k, 40), fmt)
    ran = 0
    for isa in isas():
        assert native.supports(layer, isa)  # groups of 16 (NVFP4) run the 128-bit steps on x86
        state = native.NativeLayer(layer, isa)
        assert state.name.endswith("s16l4")
        for m in (1, 7, 33):
            x = torch.randn(m, k)
            assert rel(state.linear(x), layer.reference(x)) < REL
        ran += 1
    assert ran == len(isas())


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp4_e2m1:g16"])
@pytest.mark.parametrize("cin,groups", [(6, 1), (8, 8)], ids=["dense", "depthwise"])
def test_convolution_matches_reference(fmt, cin, groups):
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(cin, 8, 3, padding=1, groups=groups), fmt)
    x = torch.randn(2, cin, 7, 7)
    for isa in isas():
        assert native.supports(conv, isa, conv=True)
        assert rel(native.NativeLayer(conv, isa, conv=True).conv(x, conv), conv.reference(x)) < REL


def test_table_and_scales_reproduce_the_decoded_weight_exactly():
    torch.manual_seed(0)
    for fmt in ("mxfp4", "nvfp4", "fp4_e2m1:g16"):
        layer = QuantLinear.from_float(nn.Linear(64, 8), fmt)
        table, gscale = native._fp4_table(layer)
        w = native._int_rows(layer, hwc=False, table=table).float().view(8, -1, layer.weight_format.group_size)
        assert torch.equal((w * gscale.unsqueeze(-1)).view(8, 64), layer.dequantized_weight(torch.float32))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4:g16", "int4:g16:asym"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-tiles", "fp32-tiles"])
def test_tiles_decode_fp4_and_groups_of_16(fmt, dtype):
    """Large M: the codes decoded a tile at a time (through the table for FP4), then torch's matrix product in bf16
    or fp32."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(96, 40), fmt)
    assert native.bf16_supported(layer)
    x = torch.randn(70, 96)
    for isa in isas():
        y = native.NativeLayer(layer, isa).linear_tiles(x, dtype)
        assert rel(y, layer.reference(x)) < (5e-3 if dtype == torch.bfloat16 else 1e-6)


def test_planes_and_int8_activations_do_not_apply():
    """No planes product for FP4 (it splits integer codes); activations quantized: native-decode only."""
    layer = QuantLinear.from_float(nn.Linear(64, 8), "mxfp4")
    info = kernels.cpu_info()
    assert not native.planes_ok(layer, info.isa)
    assert native.bf16_supported(QuantLinear.from_float(nn.Linear(48, 8), "nvfp4"))  # 3 groups of 16: tiles
    assert not native.bf16_supported(QuantLinear.from_float(nn.Linear(40, 8), "int4"))  # one group of 40 per row
    assert paths.applies("linear", "native", layer, info, 1) == (info.isa != "none")
    w8a8 = QuantLinear.from_float(nn.Linear(64, 8), "mxfp4", "int8")
    assert not native.supports(w8a8, info.isa)
