"""The 1-bit paths (int1 per-channel weights, int8 activations) through the kernel dispatch: the native W8A8 kernel
on every build this CPU runs and torch._int_mm (VNNI only) against the reference path, and the rules that keep
the oneDNN path off CPUs where it is slow or inexact."""
import pytest
import torch
from torch import nn

from modelpress.quant import QuantLinear, kernels
from modelpress.quant.activation import uint8_params
from modelpress.quant.kernels import cpu, paths

INT_KERNEL_REL_L2 = 2e-6  # as for int_mm: the same int32 sums, fp32 scale products in another order
AVX2_ENV = (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2"))


def _layer(k, n, act, bias=True):
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(k, n, bias=bias), "int1", act)
    if act == "int8:static":
        calib = torch.randn(64, k, generator=torch.Generator().manual_seed(1))
        layer.set_input_range(*uint8_params(calib.min(), calib.max()))
    return layer


def _rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _isas():
    from modelpress.quant.kernels import build

    lib, best = build.load(), cpu.cpu_info().isa
    if lib is None or best == "none":
        return []
    return [i for i in cpu.ISAS[cpu.ISAS.index(best):] if i in lib.available()]


@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("act", ["int8", "int8:static"])
def test_native_int1_matches_the_reference(isa, act, monkeypatch):
    if isa not in _isas():
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    for k, n in ((256, 48), (100, 30), (8, 1)):
        for bias in (True, False):
            layer = _layer(k, n, act, bias)
            assert paths.applies("linear", "native-int1", layer, cpu.cpu_info(), 4)
            for m in (1, 16, 17, 40):
                for dtype in (torch.float32, torch.bfloat16):
                    x = (2 * torch.randn(m, k, generator=torch.Generator().manual_seed(2))).to(dtype)
                    y = kernels.run(layer, "native-int1", x)
                    assert y.dtype == dtype and y.shape == (m, n)
                    ref = layer.reference(x.float())
                    if dtype == torch.float32:
                        assert _rel(y, ref) <= INT_KERNEL_REL_L2
                    else:
                        torch.testing.assert_close(y.float(), ref, rtol=2.0**-8, atol=1e-5 * ref.abs().max().item())
            assert set(layer._kernel_cache) == {"native-int1"}


@pytest.mark.parametrize("k, n", [(256, 48), (100, 30), (8, 1)])
@pytest.mark.parametrize("m", [1, 16, 17, 40])
@pytest.mark.parametrize("act", ["int8", "int8:static"])
def test_int1_mm_matches_the_reference_where_onednn_is_exact(k, n, m, act):
    layer = _layer(k, n, act)
    if not paths.applies("linear", "int1_mm", layer, cpu.cpu_info(), m):
        assert not cpu.cpu_info().onednn_exact
        pytest.skip("torch._int_mm has no VNNI here: int1_mm is never a candidate")
    x = 2 * torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    y = kernels.run(layer, "int1_mm", x)
    assert _rel(y, layer.reference(x)) <= INT_KERNEL_REL_L2
    signs, colsum, _ = layer._kernel_cache["int1_mm"]
    assert signs.dtype == torch.int8 and set(signs.unique().tolist()) <= {-1, 1}
    assert torch.equal(colsum, signs.sum(0, dtype=torch.int32))


def test_int1_dispatch_picks_a_kernel_and_matches_the_reference():
    layer = _layer(256, 48, "int8")
    x = torch.randn(20, 256)
    name = kernels.select(layer, x)
    assert name in ("native-int1", "int1_mm") or not _isas() and not cpu.cpu_info().onednn_exact
    assert _rel(layer(x), layer.reference(x)) <= INT_KERNEL_REL_L2


def test_int1_mm_never_a_candidate_without_vnni(monkeypatch):
    """Without VNNI torch._int_mm is a slow fallback (and its u8 x s8 product not trusted): the 1-bit layers then
    run the native kernel (its AVX2 build) or the reference path, never oneDNN."""
    for key, v in AVX2_ENV:
        monkeypatch.setenv(key, v)
    info = cpu.cpu_info()
    assert not info.onednn_exact
    layer = _layer(256, 48, "int8")
    for m in (1, 17, 300):
        names = kernels._candidates(layer, "linear", m, info)
        assert "int1_mm" not in names
        assert ("native-int1" in names) == bool(_isas())
    x = 3 * torch.rand(20, 256) + 2  # all-positive rows: codes near 255
    assert kernels.select(layer, x) != "int1_mm"
    assert _rel(layer(x), layer.reference(x)) <= INT_KERNEL_REL_L2


def test_int1_without_int8_activations_or_with_groups_takes_the_reference_path():
    x = torch.randn(4, 64)
    assert kernels.select(_layer(64, 8, None), x) is None
    torch.manual_seed(0)
    grouped = QuantLinear.from_float(nn.Linear(64, 8), "int1:g32", "int8")
    assert kernels.select(grouped, x) is None
    assert torch.allclose(grouped(x), grouped.reference(x))
    assert grouped.weight_codes.numel() == 64 * 8 // 8  # the stored codes stay one bit per weight
