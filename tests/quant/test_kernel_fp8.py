"""fp8 x fp8 kernel (kernels/fp8.py, csrc/fp8.cpp and gemm_impl.h fp8_f32): with any native build the "native-fp8"
path gives the reference path's output (fp8 weights, fp8-fake-quantized input) to fp32 rounding for Linear and Conv2d
layers, static and dynamic scales, NaN included: through bf16 products on CPUs with AVX512-BF16 (and an AVX-512 build
in use), fp32 products elsewhere; without a native build it does not apply."""
import dataclasses

import pytest
import torch
from torch import nn

from modelpress.quant import QuantConv2d, QuantLinear, kernels, set_kernels
from modelpress.quant.kernels import build, fp8, paths

LIB = build.load()
CPU = kernels.cpu_info()
HAS = LIB is not None and CPU.isa != "none"
needs = pytest.mark.skipif(not HAS, reason="no native build in use")
# every product this machine can run: the fp32 one in each build it has, the bf16 one where the CPU has AVX512-BF16
PRODUCTS = ([(isa, False) for isa in LIB.available()] if LIB is not None else []) + (
    [(isa, True) for isa in ("avx512_vnni", "avx512") if isa in LIB.available()] if LIB is not None and LIB.fp8_bf16()
    else [])
products = pytest.mark.parametrize("isa,use_bf16", PRODUCTS, ids=[f"{i}-{'bf16' if b else 'fp32'}" for i, b in PRODUCTS])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_applies_wherever_a_native_build_runs():
    q = QuantLinear.from_float(nn.Linear(32, 16), "fp8_e4m3", "fp8_e4m3")
    assert fp8.supported(q)
    assert paths.applies("linear", "native-fp8", q, CPU, 1) == HAS
    for fmt, act in [("int8", "fp8_e4m3"), ("fp8_e4m3", None), ("fp8_e4m3", "int8"), ("fp8_e4m3:g16", "fp8_e4m3"),
                     ("mxfp8", "fp8_e4m3")]:
        other = QuantLinear.from_float(nn.Linear(32, 16), fmt, act)
        assert not fp8.supported(other) and not paths.applies("linear", "native-fp8", other, CPU, 1)
    grouped = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1, groups=2), "fp8_e4m3", "fp8_e4m3")
    assert not fp8.supported(grouped)
    assert not fp8.supported(QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding="same"), "fp8_e4m3", "fp8_e4m3"))


def _static(q, act):
    if act.endswith("static"):
        q.set_input_range(torch.tensor(3.0 / 448), torch.tensor(0.0))  # clips: values beyond 3 saturate


@needs
@products
@pytest.mark.parametrize("k,n,m", [(37, 50, 37), (64, 16, 40), (8, 1, 4096), (130, 70, 1), (1, 3, 5), (96, 33, 17)])
@pytest.mark.parametrize("wfmt,act", [("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"), ("fp8_e4m3:tensor", "fp8_e5m2"),
                                      ("fp8_e4m3", "fp8_e4m3:static")])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_the_reference(isa, use_bf16, k, n, m, wfmt, act, bias):
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(k, n, bias=bias), wfmt, act)
    _static(q, act)
    x = torch.randn(m, k) * 2
    ref = q.reference(x)
    y = fp8.Fp8State(q, CPU, isa, use_bf16).run(q, x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert _rel(y, ref) < 1e-5


CONVS = [
    (nn.Conv2d(16, 32, 3, padding=1), (8, 8), 3),
    (nn.Conv2d(32, 64, 1), (4, 4), 3),
    (nn.Conv2d(7, 5, 1, bias=False), (3, 4), 2),  # odd channels: the gathered rows (pairs of k)
    (nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2)), (9, 11), 1),
    (nn.Conv2d(5, 7, 3, padding=2, dilation=2, bias=False), (6, 7), 2),
    (nn.Conv2d(4, 20, 2), (5, 5), 3),
    (nn.Conv2d(6, 18, 1, stride=2), (7, 7), 2),
]


@needs
@products
@pytest.mark.parametrize("conv,hw,b", CONVS, ids=["3x3", "1x1", "1x1-odd", "strided", "dilated", "even-kernel",
                                                  "1x1-strided"])
@pytest.mark.parametrize("wfmt,act", [("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2:tensor", "fp8_e5m2"),
                                      ("fp8_e4m3", "fp8_e4m3:static")])
def test_conv_matches_the_reference(isa, use_bf16, conv, hw, b, wfmt, act):
    torch.manual_seed(0)
    q = QuantConv2d.from_float(conv, wfmt, act)
    _static(q, act)
    x = torch.randn(b, conv.in_channels, *hw)
    ref = q.reference(x)
    state = fp8.Fp8State(q, CPU, isa, use_bf16)
    y = state.run(q, x)
    assert y.shape == ref.shape and y.is_contiguous()
    assert _rel(y, ref) < 1e-5
    assert _rel(state.run(q, x.contiguous(memory_format=torch.channels_last)), ref) < 1e-5
    yb = state.run(q, x.bfloat16())  # computed in fp32, rounded to bf16 (the reference: bf16 inside)
    assert yb.dtype == torch.bfloat16 and _rel(yb.float(), q.reference(x.bfloat16()).float()) < 1e-2


@needs
def test_an_input_smaller_than_the_kernel_gets_the_reference_error():
    q = QuantConv2d.from_float(nn.Conv2d(4, 4, 3), "fp8_e4m3", "fp8_e4m3")
    x = torch.randn(1, 4, 2, 2)
    assert fp8.Fp8State(q, CPU).run(q, x) is None
    with pytest.raises(RuntimeError, match="(?i)kernel size"):
        kernels.run_conv(q, "native-fp8", x)


@needs
@pytest.mark.parametrize("act", ["fp8_e4m3", "fp8_e4m3:static"])
def test_non_finite_inputs_go_to_the_reference_path(act):
    """One activation scale for the whole tensor: a NaN or Inf anywhere changes every row's (dynamic), so the whole
    call runs the reference path and gives exactly its output."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(24, 12), "fp8_e4m3", act)
    _static(q, act)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(20, 24)
        x[3, 5] = bad
        assert fp8.Fp8State(q, CPU).run(q, x) is None  # the kernel declines
        torch.testing.assert_close(kernels.run(q, "native-fp8", x), q.reference(x), equal_nan=True, rtol=0, atol=0)


@needs
@pytest.mark.parametrize("mode", ["memory", "speed"])
def test_memory_mode_keeps_the_copy_for_small_layers_only(mode, monkeypatch):
    small = QuantLinear.from_float(nn.Linear(64, 32), "fp8_e4m3", "fp8_e4m3")
    # the copy: 2 bytes per weight of the padded grid, and the padded scales and bias
    assert fp8.extra_bytes(small) == paths.extra_bytes("native-fp8", small) == 2 * 64 * 32 + 2 * 4 * 32
    tall = QuantLinear.from_float(nn.Linear(1001, 1, bias=False), "fp8_e4m3", "fp8_e4m3")
    assert fp8.extra_bytes(tall) == 2 * 1002 * 32 + 4 * 32  # one output padded to a tile of 32
    monkeypatch.setattr(fp8, "MEMORY_BYTES", fp8.extra_bytes(small))
    big = QuantLinear.from_float(nn.Linear(64, 33), "fp8_e4m3", "fp8_e4m3")
    for q in (small, big):
        set_kernels(q, True, mode=mode)
    assert paths.applies("linear", "native-fp8", small, CPU, 1)
    assert paths.applies("linear", "native-fp8", big, CPU, 1) == (mode == "speed")
    product = "bf16" if fp8.bf16(CPU) else "fp32"
    assert paths.display("linear", "native-fp8", small, CPU).endswith(f"fp8 ({product} products)")


def test_the_bf16_product_refuses_cpus_without_it():
    if LIB is None or LIB.fp8_bf16():
        pytest.skip("no native build, or the CPU has AVX512-BF16")
    assert not fp8.bf16(CPU)
    with pytest.raises(RuntimeError, match="AVX512-BF16"):
        LIB.Fp8Layer(0, 0, 0, 1, 1, False, -1.0, LIB.available()[0], True)


@needs
def test_a_model_runs_it_end_to_end():
    """A small CNN with a classifier, kernels on (fixed rules in tests): the fp8 layers take the kernel where the
    rules pick it (x86 builds), and the output stays the reference's, NaN included."""
    import modelpress as mp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 36, 10)).eval()
    mp.quantize_(model, mp.QuantConfig(weights="fp8_e4m3", activations="fp8_e4m3"))
    x = torch.randn(4, 3, 6, 6)
    set_kernels(model, False)
    ref = model(x)
    set_kernels(model, True)
    with torch.inference_mode():
        y = model(x)
    assert _rel(y, ref) < 1e-5
    names = [n for n in paths.LINEAR if paths.applies("linear", n, model[5], CPU, 4)]
    if paths.static_choice("linear", names, model[5], CPU, 4) == "native-fp8":
        assert {c.path for q in (model[0], model[2], model[5]) for c in q._kernel_plan.values()} == {"native-fp8"}
    x[0, 0, 0, 0] = float("nan")
    set_kernels(model, False)
    ref = model(x)
    set_kernels(model, True)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, equal_nan=True, rtol=1e-5, atol=1e-5)


@needs
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_codes_decode_exactly_to_bf16(fmt):
    """Every finite fp8 code (normals, subnormals, both zeros) as bf16 bits: the exact value (fp8-tiles' decoder)."""
    from modelpress.formats.floats import decode_float

    codes = torch.arange(256, dtype=torch.uint8)
    finite = (codes & 0x7F) != 0x7F if fmt == "fp8_e4m3" else (codes & 0x7C) != 0x7C
    codes = codes[finite].contiguous()
    out = torch.empty(codes.numel(), dtype=torch.bfloat16)
    LIB.fp8_codes_bf16(codes.data_ptr(), codes.numel(), fmt == "fp8_e5m2", out.data_ptr())
    want = decode_float(codes, fmt).float()
    assert torch.equal(out.float(), want) and torch.equal(out.float().signbit(), want.signbit())


TILES = LIB is not None and CPU.bf16_fast and CPU.isa != "none"


@needs
@pytest.mark.parametrize("k,n,m", [(37, 50, 37), (64, 16, 300), (130, 70, 1), (96, 33, 17)])
@pytest.mark.parametrize("wfmt,act", [("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"), ("fp8_e4m3:tensor", "fp8_e5m2"),
                                      ("fp8_e4m3", "fp8_e4m3:static")])
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_tiles_match_the_reference_to_bf16_rounding(k, n, m, wfmt, act, bias):
    """The exact fp8 products summed in fp32 by torch's bf16 product, its sums rounded to bf16: within bf16 rounding
    of the reference; a bf16 input gives a bf16 output; NaN in the input goes to the reference path. Offered on CPUs
    with bf16 hardware; computed (and checked here) wherever a native build runs."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(k, n, bias=bias), wfmt, act)
    _static(q, act)
    assert paths.applies("linear", "fp8-tiles", q, CPU, m) == TILES
    state = fp8.Fp8Tiles(q)
    x = torch.randn(m, k) * 2
    ref = q.reference(x)
    y = state.run(q, x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert _rel(y, ref) < 5e-3
    xb = x.bfloat16()  # (compared with the reference on the same, bf16-rounded, input values)
    yb = state.run(q, xb)
    assert yb.dtype == torch.bfloat16 and _rel(yb.float(), q.reference(xb.float())) < 5e-3
    x[0, 0] = float("nan")
    assert state.run(q, x) is None
    torch.testing.assert_close(kernels.run(q, "fp8-tiles", x), q.reference(x), equal_nan=True, rtol=0, atol=0)
    assert paths.display("linear", "fp8-tiles", q, CPU) == "native fp8 bf16 tiles"
    assert paths.extra_bytes("fp8-tiles", q) == 0


@needs
@pytest.mark.parametrize("fmt,bad", [("fp8_e4m3", 0x7F), ("fp8_e5m2", 0xFC)])
def test_fp8_tiles_decline_damaged_codes(fmt, bad):
    """A NaN / Inf code (a damaged file; never stored by quantization) is not decoded into a number: the call goes to
    the reference path, which names the problem."""
    q = QuantLinear.from_float(nn.Linear(16, 4), fmt, fmt)
    state = fp8.Fp8Tiles(q)
    assert state.run(q, torch.randn(3, 16)) is not None
    q.weight_codes.view(-1)[5] = bad
    state = fp8.Fp8Tiles(q)
    assert state.run(q, torch.randn(3, 16)) is None
    with pytest.raises(ValueError, match="finite range"):
        kernels.run(q, "fp8-tiles", torch.randn(3, 16))


def test_fp8_tiles_apply_to_linear_layers_on_bf16_cpus_only():
    q = QuantLinear.from_float(nn.Linear(32, 16), "fp8_e4m3", "fp8_e4m3")
    assert paths.applies("linear", "fp8-tiles", q, CPU, 64) == TILES
    assert not paths.applies("linear", "fp8-tiles", q, dataclasses.replace(CPU, bf16_fast=False), 64)
    conv = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1), "fp8_e4m3", "fp8_e4m3")
    assert not paths.applies("conv", "fp8-tiles", conv, CPU, 64)
    assert not paths.applies("linear", "fp8-tiles", QuantLinear.from_float(nn.Linear(32, 16), "int8"), CPU, 64)


@pytest.mark.skipif(LIB is None, reason="no native build")
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_native_input_rounding_is_torchs_on_every_grid_point_and_tie(fmt):
    """The native input quantization (actq.cpp fp8_value: fake_quant_fp8 and quant_fp8_bf16) rounds as torch's
    float8 cast on every grid point, every midpoint between neighbours (ties to even), the fp32 numbers on either
    side of each midpoint, subnormals, both zeros and values past the largest one (saturated)."""
    dt = getattr(torch, fmt.replace("fp8_", "float8_") + ("fn" if fmt == "fp8_e4m3" else ""))
    m = torch.finfo(dt).max
    grid = torch.arange(256, dtype=torch.uint8).view(dt).float()
    grid = grid[grid.isfinite() & (grid.abs() <= m)].unique()  # sorted, -m .. m (one zero)
    mid = (grid[1:] + grid[:-1]) / 2  # exact in fp32 (fp8 values have <= 4 significant bits)
    x = torch.cat([grid, mid, torch.nextafter(mid, torch.tensor(float("inf"))),
                   torch.nextafter(mid, torch.tensor(float("-inf"))), torch.tensor([-0.0, 1e-30, -1e-30, m * 1.5, -m * 4]),
                   torch.randn(4096) * torch.logspace(-12, 3, 4096)])
    x = torch.cat([x, torch.zeros((-len(x)) % 64)]).reshape(-1, 64).contiguous()
    expected = x.clamp(-m, m).to(dt).float()
    e5m2 = fmt == "fp8_e5m2"
    y = torch.empty_like(x)
    assert LIB.fake_quant_fp8(x.data_ptr(), y.data_ptr(), x.numel(), e5m2, 1.0)
    assert torch.equal(y.view(torch.int32), expected.view(torch.int32))  # bit for bit: the sign of zero too
    q = torch.empty(x.shape, dtype=torch.int16)
    assert LIB.quant_fp8_bf16(x.data_ptr(), q.data_ptr(), x.shape[0], x.shape[1], e5m2, 1.0) == 1.0
    assert torch.equal(q, expected.to(torch.bfloat16).view(torch.int16))
