"""Depthwise convolution kernel (kernels/depthwise.py, csrc/dw_impl.h): every build this CPU runs gives torch's
depthwise convolution to fp32 rounding, and the "native-dw" path gives the reference path's output (decoded weight,
fake-quantized input) in memory and speed mode, NaN included."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.quant import QuantConv2d, kernels, set_kernels
from modelpress.quant.kernels import build, depthwise, paths

pytestmark = pytest.mark.skipif(build.load() is None, reason="no native build on this machine")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("isa", build.load().available() if build.load() else [])
@pytest.mark.parametrize("b,c,h,w,kh,kw", [(3, 5, 8, 8, 3, 3), (2, 7, 4, 4, 3, 3), (2, 3, 7, 9, 3, 3),
                                           (1, 4, 5, 5, 5, 5), (2, 6, 11, 13, 7, 7), (1, 3, 1, 1, 3, 3),
                                           (2, 4, 3, 2, 1, 1), (1, 2, 6, 5, 3, 5), (5, 9, 4, 4, 3, 3),
                                           (2, 3, 5, 6, 3, 3), (3, 5, 4, 8, 3, 3), (1, 3, 8, 8, 5, 5),
                                           (1, 11, 2, 2, 3, 3), (2, 9, 3, 3, 3, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_torch_depthwise_convolution(isa, b, c, h, w, kh, kw, bias):
    torch.manual_seed(0)
    x, wt = torch.randn(b, c, h, w), torch.randn(c, 1, kh, kw)
    bs = torch.randn(c) if bias else None
    ref = F.conv2d(x, wt, bs, padding=(kh // 2, kw // 2), groups=c)
    y = build.load().dw_conv_t(x, wt, bs, isa)
    assert y.shape == ref.shape
    assert _rel(y, ref) < 1e-6
    # the planes around each one are never read or written: a plane's own output depends on its values alone
    x2 = x.clone()
    x2[0, 0] = 1e30
    assert torch.equal(build.load().dw_conv_t(x2, wt, bs, isa)[:, 1:], y[:, 1:])


@pytest.mark.parametrize("isa", build.load().available() if build.load() else [])
@pytest.mark.parametrize("b,c,m,h,w", [(3, 1, 16, 8, 8), (2, 1, 5, 4, 4), (2, 3, 2, 7, 9), (9, 2, 3, 4, 4),
                                       (1, 1, 3, 1, 1), (2, 2, 6, 8, 8), (2, 2, 10, 4, 4), (3, 3, 9, 5, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_with_a_channel_multiplier(isa, b, c, m, h, w, bias):
    """Output channel o reads input channel o // m (torch: groups = C, C * m output channels): a stem over one
    channel is m = O."""
    torch.manual_seed(0)
    x, wt = torch.randn(b, c, h, w), torch.randn(c * m, 1, 3, 3)
    bs = torch.randn(c * m) if bias else None
    ref = F.conv2d(x, wt, bs, padding=1, groups=c)
    y = build.load().dw_conv_t(x, wt, bs, isa)
    assert y.shape == ref.shape
    assert _rel(y, ref) < 1e-6


def test_kernel_checks_its_arguments():
    lib = build.load()
    isa = lib.available()[0]
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        lib.dw_conv_t(torch.randn(2, 3, 4, 4).transpose(2, 3), torch.randn(3, 1, 3, 3), None, isa)
    with pytest.raises(RuntimeError, match="odd kh, kw"):
        lib.dw_conv_t(torch.randn(2, 3, 4, 4), torch.randn(3, 1, 2, 2), None, isa)
    with pytest.raises(RuntimeError, match="bias"):
        lib.dw_conv_t(torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3), torch.randn(4), isa)
    with pytest.raises(RuntimeError, match="multiple of C"):
        lib.dw_conv_t(torch.randn(2, 3, 4, 4), torch.randn(4, 1, 3, 3), None, isa)
    assert lib.dw_conv_t(torch.randn(0, 3, 4, 4), torch.randn(3, 1, 3, 3), None, isa).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("conv,ok", [
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), True),
    (nn.Conv2d(8, 8, 5, padding="same", groups=8), True),
    (nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), True),
    (nn.Conv2d(8, 8, 3, padding=0, groups=8), False),              # the output is smaller than the input
    (nn.Conv2d(8, 8, 3, padding=1, stride=2, groups=8), False),
    (nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), False),
    (nn.Conv2d(8, 16, 3, padding=1, groups=8), True),              # channel multiplier 2
    (nn.Conv2d(1, 16, 3, padding=1), True),                        # a stem over one input channel
    (nn.Conv2d(2, 16, 3, padding=1), False),                       # two input channels per output
    (nn.Conv2d(8, 8, 3, padding=1, groups=4), False),
    (nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"), False),
], ids=["3x3", "5x5-same", "no-bias", "valid", "strided", "dilated", "multiplier", "stem", "two-inputs", "grouped",
        "reflect"])
def test_which_layers_take_it(conv, ok):
    q = QuantConv2d.from_float(conv, "int8")
    assert depthwise.applies(q) == ok
    assert paths.applies("conv", "native-dw", q, kernels.cpu_info(), 1) == (ok and kernels.cpu_info().isa != "none")


@pytest.mark.parametrize("mode", ["memory", "speed"])
@pytest.mark.parametrize("fmt,act", [("int8", None), ("int4:g32", None), ("int8", "int8"), ("int8", "int8:static"),
                                     ("mxfp4", "fp8_e4m3"), ("nvfp4", None)])
@pytest.mark.parametrize("cin,cout", [(12, 12), (1, 12), (4, 12)], ids=["depthwise", "stem", "multiplier"])
def test_path_matches_the_reference(fmt, act, mode, cin, cout):
    if kernels.cpu_info().isa == "none":
        pytest.skip("kernels disabled")
    torch.manual_seed(0)
    q = QuantConv2d.from_float(nn.Conv2d(cin, cout, 3, padding=1, groups=cin), fmt, act)
    if act == "int8:static":
        q.set_input_range(torch.tensor(4.0 / 255), torch.tensor(128.0))
    set_kernels(q, True, mode=mode)
    x = torch.randn(3, cin, 6, 7)
    ref = q.reference(x)
    y = kernels.run_conv(q, "native-dw", x)
    assert y.shape == ref.shape and y.is_contiguous()
    assert _rel(y, ref) < 1e-5
    yl = kernels.run_conv(q, "native-dw", x.contiguous(memory_format=torch.channels_last))  # torch's convolution
    assert _rel(yl, ref) < 1e-5
    x[1, cin - 1, 3, 4] = float("nan")  # NaN spreads over the taps that read it, as on the reference path
    y, ref = kernels.run_conv(q, "native-dw", x), q.reference(x)
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().any()
    assert _rel(y[0], ref[0]) < 1e-5
    assert paths.extra_bytes("native-dw", q) == (4 * 12 * 9 if mode == "speed" else 0)


def test_fixed_rules_pick_it_on_x86_builds():
    """Without timing (MODELPRESS_TUNE=0) a depthwise layer takes it on the x86 builds (the broadcast convolution
    product runs ~30x slower there), and the portable build puts it after torch's convolution."""
    cpu = kernels.cpu_info()
    if cpu.isa == "none":
        pytest.skip("kernels disabled")
    q = QuantConv2d.from_float(nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), "int8")
    names = [n for n in paths.CONV if paths.applies("conv", n, q, cpu, 1)]
    assert names[0] == "native-dw"
    want = "native-decode" if cpu.isa == "scalar" else "native-dw"
    assert paths.static_choice("conv", names, q, cpu, 1) == want
    set_kernels(q, True)
    x = torch.randn(1, 64, 8, 8)
    assert _rel(q(x), q.reference(x)) < 1e-5
