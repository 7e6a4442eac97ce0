"""Every kernel path of QuantLinear against the dequantize-then-compute reference path, on every instruction set
this CPU can run (the native kernels are forced to each lower build with MODELPRESS_ISA), and the dispatch rules.

The reference is always computed in fp32 (`use_kernels = False`, input cast to fp32), so a bf16 caller is
checked against the exact math rather than against another bf16 computation.
"""
import sys

import pytest
import torch
from torch import nn

from modelpress.quant import QuantLinear, kernels
from modelpress.quant.activation import uint8_params
from modelpress.quant.kernels import build, cpu, decode, native, paths

# int8pack / int4pack cast the input (and the per-channel / per-group scales) to bf16 inside the kernel:
# relative rounding 2**-9 per operand, accumulated over K. Measured 1.7e-3..3.3e-3 at K=256.
BF16_KERNEL_REL_L2 = 1e-2
# native weight-only kernels quantize each input row to 14-bit integers (step max|x| / 8128): measured
# 1.1e-4..2.2e-4 on Gaussian rows at K = 96..4096; bound ~5x above.
NATIVE_WO_REL_L2 = 1e-3
# int_mm / linear_dynamic / native int8-activation kernels consume exactly the uint8 codes the reference
# fake-quantizes and accumulate in int32: the only differences are the order of the fp32 scale products and the
# fp32 accumulation of the reference. Measured 0.8e-7..3.7e-7 (fp32 callers); bound ~5x above.
INT_KERNEL_REL_L2 = 2e-6
# A bf16 caller of an integer kernel gets the exact result rounded once to bf16: within one bf16 ulp
# (relative 2**-8) of the fp32 reference, elementwise.
BF16_ULP = 2.0**-8

K, N = 256, 48  # K: a multiple of every int4 group (32..256) and of 16; N: a multiple of 16 for int4pack
INT4_FORMATS = [f"int4:g{g}{s}" for g in (32, 64, 128, 256) for s in ("", ":asym")]

# torch kernels: (format, activations, M, path)
TORCH_CASES = (
    [("int8", None, m, "int8pack") for m in (1, 5)]
    + [(f, None, 3, "int4pack") for f in INT4_FORMATS]
    + [("int4:g32", None, 1, "int4pack")]
    + [("int8", "int8", 1, "linear_dynamic")]
    + [("int8", "int8", m, "int_mm") for m in (2, 16, 17, 33)]
    + [("int8", "int8:static", m, "int_mm") for m in (1, 17)]
)
SHAPES_3D = {1: (1, 1), 2: (2, 1), 3: (1, 3), 5: (5, 1), 16: (4, 4), 17: (1, 17), 33: (3, 11)}
NATIVE_FORMATS = [("int8", None), ("int8", "int8"), ("int8", "int8:static"), ("int4:g32", None),
                  ("int4:g64:asym", None), ("int4:g128", None), ("int4:g32:asym", None), ("int4", None),
                  ("int4:g16", None), ("int4:g16:asym", None)]  # groups of 16: 128-bit steps on x86


def rel_l2(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def make_layer(fmt, act, bias=True, k=K, n=N, seed=0):
    torch.manual_seed(seed)
    layer = QuantLinear.from_float(nn.Linear(k, n, bias=bias), fmt, act)
    if act == "int8:static":
        calibrate_static(layer, k)
    return layer


def _with_weight(lin, w):
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def reference(layer, x):
    layer.use_kernels = False
    try:
        return layer(x.float())
    finally:
        layer.use_kernels = True


def calibrate_static(layer, k=K):
    calib = torch.randn(64, k, generator=torch.Generator().manual_seed(1))
    layer.set_input_range(*uint8_params(calib.min(), calib.max()))


def native_isas():
    """The native builds this CPU runs under the current environment (each lower one can be forced)."""
    lib = build.load()
    best = cpu.cpu_info().isa
    if lib is None or best == "none":
        return []
    return [i for i in cpu.ISAS[cpu.ISAS.index(best):] if i in lib.available()]


def check(y, ref, kind, dtype):
    if kind == "weight-only-bf16":
        assert rel_l2(y, ref) <= BF16_KERNEL_REL_L2
    elif kind == "weight-only-native":
        assert rel_l2(y, ref) <= (NATIVE_WO_REL_L2 if dtype == torch.float32 else BF16_KERNEL_REL_L2)
    elif dtype == torch.float32:
        assert rel_l2(y, ref) <= INT_KERNEL_REL_L2
    else:
        torch.testing.assert_close(y.float(), ref, rtol=BF16_ULP, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("fmt,act", NATIVE_FORMATS, ids=[f"{f}-{a}" for f, a in NATIVE_FORMATS])
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_native_matches_reference(isa, fmt, act, monkeypatch):
    if isa not in native_isas():
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    kind = "int" if act else "weight-only-native"
    for k, n in ((K, N), (96, 5), (100, 7), (1024, 33)):
        for bias in (True, False):
            layer = make_layer(fmt, act, bias, k=k, n=n)
            supported = paths.applies("linear", "native", layer, cpu.cpu_info(), 1)
            group = min(int(fmt.split(":g")[1].split(":")[0]), k) if ":g" in fmt else k
            # 4-bit rows that do not fit the chunk layout (a group of 100 values here) run the convolutions'
            # broadcast product, as a 1 x 1 convolution
            assert supported
            chunks = not fmt.startswith("int4") or group % (2 if isa == "scalar" else 16) == 0
            assert native.as_conv(layer, isa) == (not chunks)
            for m in (1, 3, 17, 70):
                for dtype in (torch.float32, torch.bfloat16):
                    x = (2 * torch.randn(m, k)).to(dtype)
                    assert kernels.select(layer, x) is not None  # native, bf16 tiles (large M), or torch's (scalar build)
                    y = kernels.run(layer, "native", x)
                    assert y.dtype == dtype and y.shape == (m, n)
                    check(y, reference(layer, x), kind, dtype)
            assert "native" in layer._kernel_cache  # the kernel (not the reference path) ran


def check_planes(layer, plain, k, n, ms):
    """The planes path over m rows for each m in ms, fp32 and bf16: within the weight-only tolerance of the reference,
    the int16 product's outputs (`plain`) to float rounding, and one row alone (its own tile: 8 weight rows, and for
    4-bit groups of one chunk straight-line code) equal to the same row inside a block (the last row: not the first)."""
    for m in ms:
        for dtype in (torch.float32, torch.bfloat16):
            x = (2 * torch.randn(m, k)).to(dtype)
            y = kernels.run(layer, "native-planes", x)
            assert y.dtype == dtype and y.shape == (m, n)
            check(y, reference(layer, x), "weight-only-native", dtype)
            if dtype == torch.float32:
                assert rel_l2(y, plain.linear(x)) <= 1e-6
                assert torch.equal(kernels.run(layer, "native-planes", x[-1:]), y[-1:])


@pytest.mark.parametrize("fmt", ["int4:g128", "int4:g128:asym", "int4:g64", "int4:g64:asym", "int4:g256", "int4"])
@pytest.mark.parametrize("isa", ["avx512_vnni", "avx2_vnni"])
def test_native_planes_match_reference_and_s16u4(isa, fmt, monkeypatch):
    """The planes product (4-bit codes x two int8 planes of the 14-bit activations) sums the same integers as the
    int16 product: outputs agree to float rounding, and both stay within the weight-only tolerance of the reference."""
    if isa not in native_isas():
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    for k, n in ((K, N), (1024, 33), (512, 7)):
        layer = make_layer(fmt, None, True, k=k, n=n)
        group = min(int(fmt.split(":g")[1].split(":")[0]), k) if ":g" in fmt else k
        ok = paths.applies("linear", "native-planes", layer, cpu.cpu_info(), 1)
        assert ok == (group % (128 if isa == "avx512_vnni" else 64) == 0)
        if not ok:
            continue
        planes = paths.prepare("linear", "native-planes", layer, cpu.cpu_info())
        plain = paths.prepare("linear", "native", layer, cpu.cpu_info())
        assert planes.name.endswith("p8u4") and plain.name.endswith("s16u4")
        check_planes(layer, plain, k, n, (1, 3, 17, 70))


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx2_vnni"])
def test_native_planes_int8_match_reference_and_s16s8(isa, monkeypatch):
    """int8 weight-only through the planes product (two uint8 planes of the 14-bit activations x the signed weight
    bytes): the same integers as the int16 product, summed exactly; within the weight-only tolerance of the reference.
    Rows of K not a multiple of the vector (masked tails) and K past one block of exact int32 lanes (65536)."""
    if isa not in native_isas():
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    for k, n in ((K, N), (1000, 9), (70, 3), (66000, 2)):
        layer = make_layer("int8", None, True, k=k, n=n)
        assert paths.applies("linear", "native-planes", layer, cpu.cpu_info(), 1)
        planes = paths.prepare("linear", "native-planes", layer, cpu.cpu_info())
        plain = paths.prepare("linear", "native", layer, cpu.cpu_info())
        assert planes.name.endswith("p8s8") and plain.name.endswith("s16s8")
        check_planes(layer, plain, k, n, (1, 3, 17) if k > 4096 else (1, 3, 17, 70))
    # the largest sums: every weight -127 and every activation 8128 (lo 64, hi + 64 = 127) over K past two blocks of
    # 65536 (an int32 total over a longer block would wrap): y = -K exactly
    w = torch.full((2, 140000), -1.0)
    layer = QuantLinear.from_float(_with_weight(nn.Linear(140000, 2, bias=False), w), "int8", None)
    y = kernels.run(layer, "native-planes", torch.ones(1, 140000))
    assert torch.equal(y, torch.full((1, 2), -140000.0))
    # activations at the ends of the 14-bit range and of each plane: a = +-8128 (hi + 64 = 127 / 0), 127 (lo = 127), -1
    layer = make_layer("int8", None, True, k=300, n=5)
    x = torch.tensor([1.0, -1.0, 127 / 8128, -1 / 8128]).repeat(75).reshape(1, 300)
    y = kernels.run(layer, "native-planes", x)
    assert rel_l2(y, paths.prepare("linear", "native", layer, cpu.cpu_info()).linear(x)) <= 1e-6


@pytest.mark.parametrize("fmt", ["int8", "int4:g128"])
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_native_weight_only_rows_of_tiny_values(isa, fmt, monkeypatch):
    """A row whose largest |x| is below 1e-34 (its 14-bit scale max|x| / 8128 would be subnormal, its inverse inf: the
    codes were 0 or +-32767) keeps the scale at FLT_MIN: outputs finite, within 1 % of the reference."""
    if isa not in native_isas():
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    layer = make_layer(fmt, None, False, k=256, n=24)
    x = torch.randn(3, 256)
    x[1] *= 1e-36  # a tiny row between normal ones
    x[2] *= 1e-30
    planes = paths.applies("linear", "native-planes", layer, cpu.cpu_info(), 3)
    names = ["native"] + (["native-planes"] if planes else [])
    for name in names:
        y = kernels.run(layer, name, x)
        ref = reference(layer, x)
        assert torch.isfinite(y).all()
        for r in range(3):  # (in float64, scaled: squares of 1e-37 underflow in float32)
            s = 1 / ref[r].double().abs().max()
            assert rel_l2(y[r].double() * s, ref[r].double() * s) <= (NATIVE_WO_REL_L2 if r != 1 else 1e-2), (name, r)


@pytest.mark.parametrize("fmt,act", [("int8", None), ("int8", "int8"), ("int4:g128", None)])
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_native_rows_of_huge_values_take_the_reference_path(isa, fmt, act, monkeypatch):
    """A row holding |x| >= 1e30 (finite) is declined like a NaN row: the integer sums' scaling (up to 127 K max|x|
    before the weight scale) overflowed to inf where float stays finite. Those rows equal the reference path's, the
    others the kernel's on them alone."""
    if isa not in native_isas():
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    layer = make_layer(fmt, act, True, k=256, n=24)
    x = torch.randn(4, 256)
    x[0, 5], x[2, 1] = 1e37, -3e36
    planes = paths.applies("linear", "native-planes", layer, cpu.cpu_info(), 4)
    for name in ["native"] + (["native-planes"] if planes else []):
        y = kernels.run(layer, name, x)
        assert torch.isfinite(y).all(), name
        assert torch.equal(y[[0, 2]], reference(layer, x)[[0, 2]]), name
        assert torch.equal(y[[1, 3]], kernels.run(layer, name, x[[1, 3]])), name


@pytest.mark.parametrize("path", ["native-bf16", "native-f32"])
@pytest.mark.parametrize("fmt", ["int8", "int4:g32", "int4:g128:asym", "int4"])
def test_native_tiles_match_reference(fmt, path):
    """Weight-only formats through dequantized tiles and torch's product: bf16 tiles (bf16 inside, like
    int8pack/int4pack), or fp32 tiles (the reference's own fp32 product, on weights decoded a tile at a time)."""
    if not native_isas():
        pytest.skip("no native build")
    for k, n, m in ((K, N, 3), (1024, 2100, 70)):  # 2100 rows: several tiles, the last one partial
        layer = make_layer(fmt, None, k=k, n=n)
        assert paths.applies("linear", path, layer, cpu.cpu_info(), m)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dtype)
            y = kernels.run(layer, path, x)
            assert y.dtype == dtype and y.shape == (m, n)
            if path == "native-f32" and dtype == torch.float32:
                assert rel_l2(y, reference(layer, x)) <= 1e-6
            else:
                check(y, reference(layer, x), "weight-only-bf16", dtype)


@pytest.mark.parametrize("fmt", ["int8", "int4:g16", "int4:g32:asym", "int4:g128", "int4:asym", "mxfp4", "nvfp4"])
def test_dequantized_tiles_are_the_decoded_weight(fmt):
    """Every native build's tile decoder gives the layer's decoded weight exactly, in its natural column order:
    fp32 bit for bit, bf16 as torch rounds it (4-bit rows over the padded grid: rows of 224 values in groups of 128
    leave a partial last group, its padding decoded beyond k; int8 rows of 100 values end in a scalar tail)."""
    lib = build.load()
    if lib is None:
        pytest.skip("no native build")
    for k in (256, 224, 100):  # (100: int8 rows with a tail of 4 values; 4-bit groups of 16 over 112)
        layer = make_layer(fmt, None, k=k, n=40)
        if not native.bf16_supported(layer):  # groups of min(group, k) = 100 values: int4:g128, per channel
            assert k == 100 and fmt != "int8" and not paths.applies("linear", "native-bf16", layer, cpu.cpu_info(), 64)
            continue
        want = layer.float_param("weight").detach()
        for isa in native_isas():
            state = native.NativeLayer(layer, isa)
            length = state.tile_k
            for dtype, fill in ((torch.float32, state.op.dequant_f32), (torch.bfloat16, state.op.dequant_bf16)):
                out = torch.full((37, length), float("nan"), dtype=dtype)
                fill(3, 40, out.data_ptr())  # rows 3..39 only
                assert torch.equal(out[:, :k], want[3:].to(dtype)), (isa, dtype, k)
                assert out.isfinite().all()


def test_tiles_refuse_autograd():
    """The tiles' product reads a buffer reused by the next call: an input that autograd would record is refused (the
    guard never sends one: kernels run under inference only)."""
    if build.load() is None:
        pytest.skip("no native build")
    state = native.NativeLayer(make_layer("int4:g32", None), cpu.cpu_info().isa)
    x = torch.randn(4, K, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        state.linear_tiles(x)
    with torch.no_grad():
        assert state.linear_tiles(x).shape == (4, N)


@pytest.mark.parametrize("fmt,act", [("int8", "int8"), ("nvfp4", None), ("mxfp4", "fp8_e4m3")])
def test_dense_copies_match_reference(fmt, act):
    """Speed mode's dense copies: fp32 gives the reference exactly; bf16 (bf16 CPUs only) within bf16 rounding."""
    layer = make_layer(fmt, act)
    x = torch.randn(5, K)
    assert torch.equal(kernels.run(layer, "dense", x), layer.reference(x))
    if paths.applies("linear", "dense-bf16", layer, cpu.cpu_info(), 5):
        assert rel_l2(kernels.run(layer, "dense-bf16", x), layer.reference(x)) <= BF16_KERNEL_REL_L2 * (3 if act else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("fmt,act,m,path", TORCH_CASES, ids=[f"{c[3]}-{c[0]}-{c[1]}-M{c[2]}" for c in TORCH_CASES])
def test_torch_kernel_matches_reference(fmt, act, m, path, dims, bias, dtype):
    layer = make_layer(fmt, act, bias)
    if not paths.applies("linear", path, layer, cpu.cpu_info(), m):
        assert path in ("int_mm", "linear_dynamic")  # only the VNNI-dependent ones may be missing
        pytest.skip(f"{path} is not exact on this CPU ({cpu.cpu_info().describe()})")
    torch.manual_seed(2)
    x2 = (2 * torch.randn(m, K)).to(dtype)
    x = x2 if dims == 2 else x2.reshape(*SHAPES_3D[m], K)
    y = kernels.run(layer, path, x.reshape(-1, K)).reshape(*x.shape[:-1], N)
    assert y.dtype == dtype
    check(y, reference(layer, x), "weight-only-bf16" if path in ("int8pack", "int4pack") else "int", dtype)
    assert set(layer._kernel_cache) == {path}


def test_saturating_kernels_never_chosen_without_vnni(monkeypatch):
    """fbgemm / oneDNN u8 x s8 products saturate int16 without VNNI: not candidates under the AVX2 switches."""
    for k, v in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")):
        monkeypatch.setenv(k, v)
    info = cpu.cpu_info()
    assert info.isa in ("avx2", "scalar") and not info.fbgemm_exact and not info.onednn_exact
    layer = make_layer("int8", "int8")
    for m in (1, 2, 17, 300):
        names = kernels._candidates(layer, "linear", m, info)
        assert "int_mm" not in names and "linear_dynamic" not in names
    x = 3 * torch.rand(20, K) + 2  # all-positive rows: codes near 255, the saturating case
    assert rel_l2(layer(x), reference(layer, x)) <= INT_KERNEL_REL_L2


def test_static_int8_clamps_like_reference():
    """Inputs outside the calibrated range saturate the same way in the kernel and the reference."""
    layer = make_layer("int8", "int8:static")
    x = 10 * torch.randn(20, K)  # mostly outside the [-4, 4]-ish calibration range
    assert kernels.select(layer, x) is not None
    assert rel_l2(layer(x), reference(layer, x)) <= INT_KERNEL_REL_L2


def near_ties(scale: torch.Tensor, k: int, gen) -> torch.Tensor:
    """[rows, k] values x whose quotient x / scale (scale [rows, 1]) lies on or within 3 ulp of a half-integer in
    [-127.5, 127.5]: where x * (1 / scale) and the quotient can round to different integers."""
    x = (torch.randint(-128, 128, (scale.shape[0], k), generator=gen).float() + 0.5) * scale
    steps = torch.randint(-3, 4, x.shape, generator=gen)
    for s in range(3):
        x = torch.where(steps > s, torch.nextafter(x, torch.tensor(float("inf"))), x)
        x = torch.where(steps < -s, torch.nextafter(x, torch.tensor(float("-inf"))), x)
    return x


@pytest.mark.parametrize("act", ["int8", "int8:static"])
def test_int8_activation_codes_round_as_the_reference_near_ties(act, monkeypatch):
    """Every code of the native kernels equals the reference's round(x / scale), at ties and next to them, on every
    build (a reciprocal instead of the division would miss some of these). An identity weight puts each code alone in
    an output: one code off by one is a 0.4 % error."""
    if not native_isas():
        pytest.skip("no native build runnable here")
    k, rows = 64, 70
    layer = QuantLinear.from_float(_identity(k), "int8", act)
    gen = torch.Generator().manual_seed(5)
    if act == "int8:static":
        layer.set_input_range(*uint8_params(torch.tensor(-12.76), torch.tensor(12.75)))
        scale = layer.input_scale.reshape(1, 1).expand(rows, 1)
        x = near_ties(scale, k, gen)
    else:  # each row holds its range's ends, so that its scale is the one the ties were built for
        hi = 12.75 * (1 + torch.rand(rows, 1, generator=gen))
        scale = uint8_params(-hi, hi)[0].reshape(rows, 1)
        x = torch.cat([near_ties(scale, k - 2, gen).clamp(-hi, hi), -hi, hi], dim=1)
    assert ((x * (1 / scale)).round() != (x / scale).round()).sum() > 20  # what the reciprocal alone gets wrong
    ref = reference(layer, x)
    for isa in native_isas():
        monkeypatch.setenv("MODELPRESS_ISA", isa)
        y = native.NativeLayer(layer, isa).linear(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{isa}: {m}")


def _identity(k: int) -> nn.Linear:
    lin = nn.Linear(k, k, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(k))
    return lin


def test_dynamic_int8_is_per_token():
    """One token's output does not depend on the other tokens in the batch (per-token scales), at any M."""
    layer = make_layer("int8", "int8")
    torch.manual_seed(3)
    x = torch.randn(40, K)
    alone = layer(x[:1])
    x[1:] *= 100
    for m in (2, 17, 40):
        assert rel_l2(layer(x[:m])[:1], alone) <= INT_KERNEL_REL_L2


@pytest.mark.parametrize("fmt,k,group", [("int4:g8", K, 8), ("int4:g64", 40, 40), ("int4:g32:asym", 13, 13),
                                         ("int4", 100, 100), ("fp4_e2m1:g8", K, 8), ("nvfp4", 13, 13), ("mxfp4", 20, 20)])
def test_four_bit_rows_off_the_chunk_layout_run_as_one_by_one_convolutions(fmt, k, group):
    """4-bit Linear rows that do not fit the matrix kernels' chunk layout (groups below 16, a row shorter than its
    group: ctr's 13 dense features) run the convolutions' broadcast product on int16 rows, as M samples of a 1 x 1
    convolution: the reference's numbers within the weight-only bound, every build."""
    for isa in native_isas():
        layer = make_layer(fmt, None, k=k, n=N)
        assert native.as_conv(layer, isa) == (group % (2 if isa == "scalar" else 16) != 0)
        state = native.NativeLayer(layer, isa)
        for m in (1, 5, 70):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k).to(dtype)
                y = state.linear(x)
                assert y.dtype == dtype and y.shape == (m, N)
                check(y, reference(layer, x), "weight-only-native", dtype)
    big = make_layer(fmt, None, k=k, n=native.AS_CONV_MAX // k + 1)  # an int16 copy too large to keep: decoded
    if native.as_conv(big, cpu.cpu_info().isa):
        assert not paths.applies("linear", "native", big, cpu.cpu_info(), 1)


@pytest.mark.parametrize("fmt,act,k,n", [
    ("int4:tensor", None, K, N),
    ("int8:asym", None, K, N),
    ("int8:g32", None, K, N),
    ("int8:tensor", None, K, N),
    ("int3:g32", None, K, N),
    ("mxfp8", None, K, N),
    ("fp8_e4m3", None, K, N),
    ("int8", "fp8_e4m3", K, N),  # fp8 activations are emulated
    ("int8", "fp8_e4m3:static", K, N),
    ("int4:g32", "int8", K, N),  # int8 activations need int8 weights
    ("int8:asym", "int8", K, N),
    ("int8:g32", "int8:static", K, N),
])
def test_no_kernel_and_reference_runs(fmt, act, k, n, monkeypatch):
    monkeypatch.setenv("MODELPRESS_ISA", "avx2")  # the x86 builds support the same formats; scalar more group sizes
    layer = make_layer(fmt, act, k=k, n=n)
    x = torch.randn(4, k)
    exact = "native-decode" if decode.decoder(layer) is not None else None  # the reference's computation, natively
    assert kernels.select(layer, x) == exact
    assert kernels.select(layer, x[:1]) == exact
    y = layer(x)
    assert y.shape == (4, n) and y.dtype == torch.float32
    assert torch.equal(y, layer.reference(x))
    assert (layer._kernel_cache == {}) == (exact is None)


def test_reference_when_disabled_integer_input_grad_or_tracing(monkeypatch):
    """Kernels are not traceable ops: tracing and compiling (torch.compile, export, jit.trace) see the reference."""
    layer = make_layer("int8", None)
    # the fixed rules: the native kernel, except in the portable build (ARM), where torch's vectorized kernel comes first
    expected = "native" if native_isas() and native_isas()[0] != "scalar" else "int8pack"
    assert kernels.select(layer, torch.randn(2, K)) == expected
    assert kernels.select(layer, torch.ones(2, K, dtype=torch.int64)) is None
    assert kernels.select(layer, torch.randn(2, K, requires_grad=True)) is None
    with torch.no_grad():
        assert kernels.select(layer, torch.randn(2, K, requires_grad=True)) == expected
    assert kernels.select(layer, torch.randn(2, K, device="meta")) is None
    for fn, value in (("_is_compiling", True), ("_is_exporting", True), ("_jit_state", object())):
        with monkeypatch.context() as mp:  # the checks kernels binds once (torch.compiler / torch.jit's own)
            mp.setattr(kernels, fn, lambda value=value: value)
            assert kernels.select(layer, torch.randn(2, K)) is None
    traced = torch.jit.trace(lambda x: torch.tensor(float(kernels.select(layer, x) is None)), torch.randn(2, K))
    assert traced(torch.randn(2, K)).item() == 1.0  # under a real jit.trace the reference path was chosen
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
    a(x)  # builds and caches a's kernel state
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("fmt,act", [("int8", None), ("int4:g32", None), ("int8", "int8"), ("int8", "int8:static")])
def test_kernel_state_rebuilt_after_in_place_copy(fmt, act):
    """Writing into a buffer in place (copy_) bumps its version counter: the kernel state is rebuilt."""
    a, b = make_layer(fmt, act, seed=0), make_layer(fmt, act, seed=1)
    x = torch.randn(5, K)
    before = a(x)
    with torch.no_grad():
        for name, buf in b.named_buffers():
            getattr(a, name).copy_(buf)
        a.bias.copy_(b.bias)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), before)
    if act == "int8:static":  # a new calibrated range reaches the kernel too
        a.set_input_range(*uint8_params(torch.tensor(-0.5), torch.tensor(0.5)))
        assert rel_l2(a(x), reference(a, x)) <= INT_KERNEL_REL_L2


@pytest.mark.parametrize("fmt,act", [("int8", None), ("int4:g32", None), ("int8", "int8")])
def test_kernel_state_rebuilt_after_data_swap_or_replaced_buffer(fmt, act):
    """`buf.data = other` (new storage, same object, no version bump) and a replaced buffer (new object) both
    rebuild the kernel state: it never reads memory the layer no longer holds."""
    a, b = make_layer(fmt, act, seed=0), make_layer(fmt, act, seed=1)
    x = torch.randn(5, K)
    a(x)
    for name, buf in b.named_buffers():
        getattr(a, name).data = buf.clone()
    a.bias.data = b.bias.detach().clone()
    assert torch.equal(a(x), b(x))
    c = make_layer(fmt, act, seed=2)
    for name, buf in c.named_buffers():
        a.register_buffer(name, buf.clone())
    a.bias = nn.Parameter(c.bias.detach().clone())
    assert torch.equal(a(x), c(x))


def test_layer_quantized_under_inference_mode_keeps_its_kernel_state():
    """Buffers made under torch.inference_mode() are inference tensors (no version counter): the state check must
    not fail on them (it raised and caught an error per call, ~25 us, and the guard then timed every kernel path
    with that cost and kept the reference path), and the state is built once, not per call."""
    with torch.inference_mode():
        layer = make_layer("int4:g32", None)
        x = torch.randn(3, K)
        layer(x)
        states = dict(layer._kernel_cache)
        raised = []

        def tracer(frame, event, arg):
            if event == "exception":
                raised.append(arg[0])
            return tracer

        sys.settrace(tracer)
        try:
            kernels._signature(layer)
        finally:
            sys.settrace(None)
        assert raised == []  # not even one raised and caught inside
        y = layer(x)
        assert all(layer._kernel_cache[k] is v for k, v in states.items())
    path = next(iter(layer._kernel_plan.values())).path  # int4pack where the fixed rules prefer torch's (ARM)
    assert rel_l2(y, reference(layer, x)) <= (BF16_KERNEL_REL_L2 if path == "int4pack" else NATIVE_WO_REL_L2)


@pytest.mark.parametrize("fmt,act", [("int8", None), ("int4:g32", None), ("int8", "int8"), ("int8", "int8:static")])
@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernel", "reference"])
def test_nan_and_inf_propagate_like_float(fmt, act, use_kernels):
    """NaN and Inf in the input reach the output as they do in the float layer with the same weight, on kernel
    and reference paths alike; the other rows are unaffected."""
    layer = make_layer(fmt, act)
    layer.use_kernels = use_kernels
    x = torch.randn(6, K)
    clean = layer(x)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3, 0], x[3, 1] = float("inf"), float("-inf")
    x[4, 5] = float("-inf")
    y = layer(x)
    floaty = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.equal(torch.isnan(y), torch.isnan(floaty)) and torch.equal(torch.isinf(y), torch.isinf(floaty))
    assert torch.equal(torch.sign(y[torch.isinf(y)]), torch.sign(floaty[torch.isinf(floaty)]))
    assert torch.isnan(y[1]).all() and torch.isinf(y[2]).any() and not torch.isfinite(y[3]).any()
    torch.testing.assert_close(y[[0, 5]], clean[[0, 5]])


@pytest.mark.parametrize("act", [None, "int8", "int8:static"])
@pytest.mark.parametrize("m", [1, 4])
def test_straight_through_input_gradient(act, m):
    """The input gradient is that of the float layer carrying the dequantized weight (straight-through
    activation quantization), at M = 1 and M > 1 alike."""
    layer = make_layer("int8", act)
    plain = nn.Linear(K, N)
    with torch.no_grad():
        plain.weight.copy_(layer.dequantized_weight())
        plain.bias.copy_(layer.bias)
    x = torch.randn(m, K, requires_grad=True)
    g = torch.randn(m, N)
    (layer(x) * g).sum().backward()
    xf = x.detach().clone().requires_grad_(True)
    (plain(xf) * g).sum().backward()
    torch.testing.assert_close(x.grad, xf.grad)


def test_probe_rejects_a_saturating_kernel(monkeypatch):
    """The probe compares a kernel with the reference on inputs that overflow int16 pair sums: an emulation of
    vpmaddubsw (pairs of uint8 x int8 products saturated to int16) fails it, the exact product passes."""
    from modelpress.quant.kernels import probe, torch_ops

    def saturating(state, name, layer, x):
        from modelpress.quant.activation import dynamic_params, quantize_uint8

        scale, zero = dynamic_params(x, per_token=True)
        u = quantize_uint8(x, scale, zero).to(torch.int32)
        w = layer.weight_codes.view(torch.int8).view(layer.weight_shape).to(torch.int32)
        prod = (u[:, None, :] * w[None]).view(u.shape[0], w.shape[0], -1, 2).sum(-1).clamp(-32768, 32767)
        acc = prod.sum(-1) - zero.to(torch.int32) * w.sum(1)
        return acc.float() * scale * layer.weight_scale.reshape(1, -1)

    probe._exact.cache_clear()
    try:
        monkeypatch.setattr(torch_ops, "run", saturating)
        monkeypatch.setattr(torch_ops, "prepare", lambda name, layer: None)
        assert not probe._exact("int_mm", ("saturating",))
        monkeypatch.setattr(torch_ops, "run", lambda s, n, layer, x: layer.reference(x))
        assert probe._exact("int_mm", ("exact",))
    finally:
        probe._exact.cache_clear()


NARROW_CASES = [("avx512_vnni", "int8", 1), ("avx512_vnni", "int8:static", 1), ("avx512_vnni", None, 2),
                ("avx512", "int8", 2), ("avx2_vnni", "int8", 1), ("avx2_vnni", None, 2), ("avx2", "int8:static", 2),
                ("avx2", None, 2)]


@pytest.mark.parametrize("isa,act,width", NARROW_CASES, ids=[f"{i}-{a}" for i, a, _ in NARROW_CASES])
def test_narrow_products_match_tiles_and_reference(isa, act, width, monkeypatch):
    """Small int8 Linears keep their weight interleaved (int8 by 4 values of k for int8 activations with VNNI,
    int16 by 2 for the int16 products) and, from 16 rows on, run a narrow product (outputs along the vector): the
    tiles' integer sums, for row counts that leave every block size (8, 4, 1) and column counts that leave tails."""
    if isa not in native_isas():
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    for k, n, bias in ((52, 64, True), (13, 33, False), (100, 7, True), (8, 16, False)):
        layer = make_layer("int8", act, bias, k=k, n=n)
        if act and act.endswith(":static"):
            calibrate_static(layer, k)
        state = native.NativeLayer(layer, isa)
        assert state.narrow and paths.extra_bytes("native", layer) == width * k * n
        with monkeypatch.context() as mp:
            mp.setattr(native, "narrow", lambda layer, isa: 0)
            tiles = native.NativeLayer(layer, isa)
        assert not tiles.narrow
        for m in (15, 16, 17, 29, 70):
            x = 2 * torch.randn(m, k)
            y = state.linear(x)
            assert rel_l2(y, tiles.linear(x)) <= 1e-6
            check(y, reference(layer, x), "int" if act else "weight-only-native", torch.float32)
        x = 2 * torch.randn(20, k)
        x[3, 1] = float("nan")  # declined as the tiles decline: the caller runs the reference for that row
        assert state.linear(x) is None


@pytest.mark.parametrize("fmt,act", [("int8", None), ("int8", "int8"), ("int8", "int8:static"), ("int4:g32", None)])
@pytest.mark.parametrize("isa", ["avx512_vnni", "avx512", "avx2_vnni", "avx2"])
def test_narrow_product_rows_do_not_depend_on_their_place_in_the_batch(isa, fmt, act, monkeypatch):
    """A row's output is bit for bit the same wherever it sits in the batch: after 1, 2 or 4 other rows (its place
    in the product's blocks of 8 rows moves; the epilogue's multiply-add was fused in some places of a block and not
    in others on 256-bit builds) and inside a batch of thousands of rows (quantized and multiplied block by block,
    blocks of a multiple of 8 rows)."""
    if isa not in native_isas():
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    for k, n in ((106, 8), (257, 100), (52, 64)):
        layer = make_layer(fmt, act, True, k=k, n=n)
        state = native.NativeLayer(layer, isa)
        assert state.narrow
        x = 2 * torch.randn(64, k)
        y = state.linear(x)
        for shift in (1, 2, 4):
            assert torch.equal(state.linear(torch.cat([torch.randn(shift, k), x]))[shift:], y)
        big = torch.cat([torch.randn(3000, k), x, torch.randn(1000, k)])  # 4064 rows: many blocks
        assert torch.equal(state.linear(big)[3000:3064], y)


NARROW4_FORMATS = ["int4:g32", "int4:g32:asym", "int4:g128", "int4", "mxfp4", "nvfp4", "int4:g16"]


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx512", "avx2_vnni", "avx2"])
@pytest.mark.parametrize("fmt", NARROW4_FORMATS)
def test_narrow_product_of_four_bit_rows(isa, fmt, monkeypatch):
    """Small 4-bit Linears keep their integers (code - zero, or the FP4 table's values) interleaved as int16 with
    their group scales, and from 16 rows on run the int16 narrow product, a scale per group: the tiles' (or, for
    rows off the chunk layout, the 1 x 1 convolution's) exact group sums, scaled the same way. Fewer rows, or a bf16
    input, still run those."""
    if isa not in native_isas():
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    for k, n, bias in ((52, 64, True), (64, 32, False), (8, 16, True), (33, 20, False), (100, 7, True)):
        layer = make_layer(fmt, None, bias, k=k, n=n)
        state = native.NativeLayer(layer, isa)
        assert state.narrow and paths.extra_bytes("native", layer) >= 2 * k * n
        with monkeypatch.context() as mp:
            mp.setattr(native, "narrow", lambda layer, isa: 0)
            tiles = native.NativeLayer(layer, isa)
        assert not tiles.narrow
        for m in (1, 15, 16, 17, 29, 70):
            x = 2 * torch.randn(m, k)
            y = state.linear(x)
            assert rel_l2(y, tiles.linear(x)) <= 1e-6
            check(y, reference(layer, x), "weight-only-native", torch.float32)
        xb = torch.randn(20, k, dtype=torch.bfloat16)  # bf16 out: not the narrow product (fp32 output only)
        assert rel_l2(state.linear(xb).float(), tiles.linear(xb).float()) <= 1e-2
        x = 2 * torch.randn(20, k)
        x[3, 1] = float("nan")
        assert state.linear(x) is None


@pytest.mark.parametrize("fmt", ["int8", "int4:g128"])
def test_only_the_native_path_keeps_a_narrow_copy(fmt):
    """The states of the other native paths (planes, bf16 / fp32 tiles) never run the narrow product: they keep no
    interleaved copy, so the bytes `extra_bytes` reports for them are what they hold."""
    cpu = kernels.cpu_info()
    layer = make_layer(fmt, None, True, k=256, n=64)
    if cpu.isa not in ("avx512_vnni", "avx512", "avx2_vnni", "avx2"):
        pytest.skip("the narrow products are x86 only")
    assert paths.prepare("linear", "native", layer, cpu).narrow
    for name in ("native-planes", "native-bf16", "native-f32"):
        if paths.applies("linear", name, layer, cpu, 32):
            assert not paths.prepare("linear", name, layer, cpu).narrow
            assert paths.extra_bytes(name, layer) == 0
