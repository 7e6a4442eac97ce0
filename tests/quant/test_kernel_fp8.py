"""fp8 x fp8 kernel (kernels/fp8.py, csrc/fp8.cpp and gemm_impl.h fp8_f32): with any native build the "native-fp8"
path gives the reference path's output (fp8 weights, fp8-fake-quantized input) to fp32 rounding for Linear and Conv2d
layers, static and dynamic scales, NaN included: through bf16 products on CPUs with AVX512-BF16 (and an AVX-512 build
in use), fp32 products elsewhere; without a native build it does not apply."""
import pytest
import torch
from torch import nn

from modelpress.quant import QuantConv2d, QuantLinear, kernels, set_kernels
from modelpress.quant.kernels import build, fp8, paths

LIB = build.load()
CPU = kernels.cpu_info()
HAS = LIB is not None and CPU.isa != "none"
needs = pytest.mark.skipif(not HAS, reason="no native build in use")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_applies_only_where_the_cpu_multiplies_bf16():
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


@needs
@pytest.mark.parametrize("k,n,m", [(37, 50, 37), (64, 16, 40), (8, 1, 4096), (130, 70, 1), (1, 3, 5), (96, 33, 17)])
@pytest.mark.parametrize("wfmt,act", [("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"), ("fp8_e4m3:tensor", "fp8_e5m2"),
                                      ("fp8_e4m3", "fp8_e4m3:static")])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_the_reference(k, n, m, wfmt, act, bias):
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(k, n, bias=bias), wfmt, act)
    if act.endswith("static"):
        q.set_input_range(torch.tensor(3.0 / 448), torch.tensor(0.0))  # clips: values beyond 3 saturate
    x = torch.randn(m, k) * 2
    ref = q.reference(x)
    y = kernels.run(q, "native-fp8", x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert _rel(y, ref) < 1e-5


@needs
@pytest.mark.parametrize("conv,hw", [
    (nn.Conv2d(16, 32, 3, padding=1), (8, 8)),
    (nn.Conv2d(32, 64, 1), (4, 4)),
    (nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2)), (9, 11)),
    (nn.Conv2d(5, 7, 3, padding=2, dilation=2, bias=False), (6, 7)),
    (nn.Conv2d(4, 20, 2), (5, 5)),
    (nn.Conv2d(6, 18, 1, stride=2), (7, 7)),
], ids=["3x3", "1x1", "strided", "dilated", "even-kernel", "1x1-strided"])
def test_conv_matches_the_reference(conv, hw):
    torch.manual_seed(0)
    q = QuantConv2d.from_float(conv, "fp8_e4m3", "fp8_e4m3")
    x = torch.randn(3, conv.in_channels, *hw)
    ref = q.reference(x)
    y = kernels.run_conv(q, "native-fp8", x)
    assert y.shape == ref.shape and y.is_contiguous()
    assert _rel(y, ref) < 1e-5
    # channels-last input and bf16 input: the same values
    assert _rel(kernels.run_conv(q, "native-fp8", x.contiguous(memory_format=torch.channels_last)), ref) < 1e-5
    yb = kernels.run_conv(q, "native-fp8", x.bfloat16())
    assert yb.dtype == torch.bfloat16 and _rel(yb.float(), q.reference(x.bfloat16()).float()) < 1e-2


@needs
def test_non_finite_inputs_go_to_the_reference_path():
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(24, 12), "fp8_e4m3", "fp8_e4m3")
    x = torch.randn(20, 24)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    state = fp8.Fp8State(q, CPU)
    assert state.run(q, x) is None  # the kernel declines: one scale for the whole tensor
    y, ref = kernels.run(q, "native-fp8", x), q.reference(x)
    assert torch.equal(y.isnan(), ref.isnan())


@needs
@pytest.mark.parametrize("mode", ["memory", "speed"])
def test_memory_mode_keeps_the_copy_for_small_layers_only(mode, monkeypatch):
    small = QuantLinear.from_float(nn.Linear(64, 32), "fp8_e4m3", "fp8_e4m3")
    big = QuantLinear.from_float(nn.Linear(64, 32), "fp8_e4m3", "fp8_e4m3")
    monkeypatch.setattr(fp8, "MEMORY_BYTES", 2 * 64 * 32)  # the copy: 2 bytes per weight
    big = QuantLinear.from_float(nn.Linear(64, 33), "fp8_e4m3", "fp8_e4m3")
    for q in (small, big):
        set_kernels(q, True, mode=mode)
    assert paths.extra_bytes("native-fp8", small) == 2 * 64 * 32
    assert paths.applies("linear", "native-fp8", small, CPU, 1)
    assert paths.applies("linear", "native-fp8", big, CPU, 1) == (mode == "speed")
    product = "bf16" if fp8.bf16(CPU) else "fp32"
    assert paths.display("linear", "native-fp8", small, CPU).endswith(f"fp8 ({product} products)")


def test_the_bf16_product_only_on_avx512_bf16():
    """The bf16 product needs the instruction (and an AVX-512 build in use: under the AVX2 switches it is off)."""
    assert fp8.bf16(CPU) == (LIB is not None and CPU.isa in ("avx512_vnni", "avx512") and LIB.fp8_bf16())
    if LIB is not None and not LIB.fp8_bf16():
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            LIB.Fp8Layer(0, 0, 0, 1, 1, False, -1.0, LIB.available()[0], True)


@needs
def test_a_model_runs_it_end_to_end():
    """A small CNN with a classifier, kernels on (timed choices): the output stays the reference's."""
    torch.manual_seed(0)
    from modelpress.quantize import quantize_

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 36, 10)).eval()
    import modelpress as mp

    quantize_(model, mp.QuantConfig(weights="fp8_e4m3", activations="fp8_e4m3"))
    x = torch.randn(4, 3, 6, 6)
    set_kernels(model, False)
    ref = model(x)
    set_kernels(model, True)
    with torch.inference_mode():
        y = model(x)
    assert _rel(y, ref) < 1e-5
    x[0, 0, 0, 0] = float("nan")
    set_kernels(model, False)
    ref = model(x)
    set_kernels(model, True)
    with torch.inference_mode():
        assert torch.equal(model(x).isnan(), ref.isnan())
