"""QuantConv1d / QuantConv2d: the reference path is exactly F.conv with the dequantized weight, the native kernels
match it, and both are close to the float layer."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.formats import expected_nbytes
from modelpress.quant import QuantConv1d, QuantConv2d, kernels
from modelpress.quant.kernels import build as native_build
from modelpress.quant.kernels import decode
from modelpress.quant.kernels import native as native_layer

# native kernels against the reference path (see tests/quant/test_kernels.py for the derivations)
NATIVE_WO_REL_L2 = 1e-3  # weight-only: 14-bit activations inside (measured ~1e-4)
INT_KERNEL_REL_L2 = 2e-6  # int8 activations: the same uint8 codes, exact int32 sums

# Output cosine vs the float conv (measured: int8 >= 0.99999, int8 + int8 activations >= 0.99997,
# int4:g32 0.9981-0.9992 on these random layers).
COS_INT8 = 0.999
COS_INT4_G32 = 0.99

CONVS = {  # name -> (float conv, input shape)
    "1d": (lambda: nn.Conv1d(8, 12, 3), (2, 8, 20)),
    "1d-grouped-strided": (lambda: nn.Conv1d(8, 12, 3, groups=2, stride=2, padding=1, dilation=2), (2, 8, 21)),
    "1d-depthwise-reflect": (lambda: nn.Conv1d(8, 8, 5, groups=8, padding=2, padding_mode="reflect"), (3, 8, 16)),
    "2d": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 10, 10)),
    "2d-grouped": (lambda: nn.Conv2d(6, 8, 3, groups=2, stride=2, padding=(1, 2), dilation=(2, 1)), (2, 6, 11, 9)),
    "2d-depthwise": (lambda: nn.Conv2d(8, 8, 3, groups=8, bias=False), (2, 8, 9, 9)),
    "2d-reflect": (lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="reflect"), (2, 4, 7, 7)),
    "2d-1x1": (lambda: nn.Conv2d(16, 8, 1), (2, 16, 5, 5)),
    # pointwise, packed by channel rows: 5 channels per group (padded to 8), 42 pixels (16-pixel blocks and a tail)
    "2d-1x1-grouped": (lambda: nn.Conv2d(10, 4, 1, groups=2), (3, 10, 6, 7)),
}


def build(name, fmt, act=None, seed=0):
    torch.manual_seed(seed)
    make, shape = CONVS[name]
    conv = make()
    cls = QuantConv1d if isinstance(conv, nn.Conv1d) else QuantConv2d
    return conv, cls.from_float(conv, fmt, act), torch.randn(*shape)


def with_weight(conv, q):
    """The float conv carrying the dequantized weight: F.conv with all of conv's settings."""
    ref = copy.deepcopy(conv)
    ref.weight.data = q.dequantized_weight()
    return ref


def fake_quant_uint8(x, lo, hi):
    """Independent asymmetric uint8 fake quantization of x over [min(lo, 0), max(hi, 0)]."""
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    scale = (hi - lo) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def per_sample(x):
    flat = x.reshape(x.shape[0], -1)
    lo = flat.amin(1).reshape(-1, *[1] * (x.dim() - 1))
    hi = flat.amax(1).reshape(-1, *[1] * (x.dim() - 1))
    return fake_quant_uint8(x, lo, hi)


def cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def rel_l2(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def reference(q, x):
    q.use_kernels = False
    try:
        return q(x)
    finally:
        q.use_kernels = True


@pytest.mark.parametrize("fmt", ["int8", "int4:g32", "int4:g32:asym", "int3:g32", "nvfp4", "mxfp4", "int8:tensor"])
@pytest.mark.parametrize("name", list(CONVS))
def test_weight_only_equals_conv_with_dequantized_weight(name, fmt):
    conv, q, x = build(name, fmt)
    with torch.no_grad():
        assert torch.equal(reference(q, x), with_weight(conv, q)(x))
    assert q.dequantized_weight().shape == conv.weight.shape


@pytest.mark.parametrize("name", list(CONVS))
def test_int8_dynamic_activations_are_per_sample(name):
    conv, q, x = build(name, "int8", "int8")
    with torch.no_grad():
        assert torch.equal(reference(q, x), with_weight(conv, q)(per_sample(x)))
        first = q(x[:1])
        x[1:] *= 1000  # other samples' ranges do not change sample 0's quantization
        # conv itself may pick another algorithm for another batch size: float rounding only, far below
        # the 1/255 relative step a changed activation scale would cause
        torch.testing.assert_close(q(x)[:1], first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONVS))
def test_int8_static_activations_per_tensor(name):
    conv, q, x = build(name, "int8", "int8:static")
    lo, hi = torch.tensor(-1.5), torch.tensor(2.0)  # a calibrated range; x exceeds it (clamped)
    scale, zero = (hi - lo) / 255, torch.round(1.5 / ((hi - lo) / 255))
    q.set_input_range(scale, zero)
    with torch.no_grad():
        assert torch.equal(reference(q, x), with_weight(conv, q)(fake_quant_uint8(x, lo, hi)))


NATIVE = [("int8", None), ("int8", "int8"), ("int8", "int8:static"), ("int4:g32", None), ("int4:g32:asym", None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt,act", NATIVE, ids=[f"{f}-{a}" for f, a in NATIVE])
@pytest.mark.parametrize("name", list(CONVS))
def test_native_kernel_matches_reference(name, fmt, act, dtype):
    """Every conv geometry the native kernel takes (zero padding, groups, strides, dilation, 1-D and 2-D), against
    the reference path: the same per-sample (dynamic) or per-tensor (static) uint8 codes, or 14-bit activations
    for weight-only formats."""
    conv, q, x = build(name, fmt, act)
    if act == "int8:static":
        q.set_input_range(torch.tensor(3.5 / 255), torch.tensor(100.0))
    x = x.to(dtype)
    # 4-bit convolutions: one group per row (k <= 32) or groups of 32, both taken by the broadcast product
    native = native_build.load() is not None and conv.padding_mode == "zeros"
    decoded = decode.decoder(q) is not None
    # the fixed rules: the native kernel first, except in the portable build (ARM), where torch's vectorized
    # convolution over the decoded weight comes first; the native kernel is still checked there, by name
    first = "native-decode" if kernels.cpu_info().isa == "scalar" and decoded else "native"
    assert kernels.select_conv(q, x) == (first if native else "native-decode" if decoded else None)
    path = "native" if native else "native-decode" if decoded else None
    with torch.no_grad():
        y, ref = (kernels.run_conv(q, path, x) if path else q(x)), reference(q, x.float())
    assert y.dtype == dtype and y.shape == ref.shape
    bound = (NATIVE_WO_REL_L2 if act is None else INT_KERNEL_REL_L2) if dtype == torch.float32 else 1e-2
    assert rel_l2(y, ref) <= bound


@pytest.mark.skipif(native_build.load() is None, reason="no native build on this machine")
@pytest.mark.parametrize("fmt", ["int8", "int4:g32"])
def test_native_conv_sample_of_tiny_values(fmt):
    """A weight-only sample whose largest |x| is below 1e-34 keeps its 14-bit scale at FLT_MIN (a subnormal scale's
    inverse was inf: junk codes); the outputs stay finite, within 1 % of the reference (compared in float64)."""
    torch.manual_seed(0)
    q = QuantConv2d.from_float(nn.Conv2d(6, 8, 3, padding=1, bias=False), fmt)  # (a bias would hide the product)
    x = torch.randn(2, 6, 10, 10)
    x[0] *= 1e-36
    with torch.no_grad():
        y, ref = kernels.run_conv(q, "native", x), reference(q, x)
    assert torch.isfinite(y).all()
    for b in range(len(x)):
        s = 1 / ref[b].double().abs().max()
        assert rel_l2(y[b].double() * s, ref[b].double() * s) <= (1e-2 if b == 0 else NATIVE_WO_REL_L2)


@pytest.mark.skipif(native_build.load() is None, reason="no native build on this machine")
@pytest.mark.parametrize("fmt,act", [("int8", None), ("int8", "int8"), ("int4:g32", None)])
def test_native_conv_sample_of_huge_values_takes_the_reference_path(fmt, act):
    """A sample holding |x| >= 1e30 (finite) is declined like a NaN sample (its integer sums' scaling overflowed to
    inf): it equals the reference path's output, the other sample the kernel's."""
    conv, q, x = build("2d", fmt, act)
    x = x.clone()
    x[0, 1, 2, 3] = 1e37
    with torch.no_grad():
        y = kernels.run_conv(q, "native", x)
        assert torch.isfinite(y).all()
        assert torch.equal(y[:1], reference(q, x)[:1])
        assert torch.equal(y[1:], kernels.run_conv(q, "native", x[1:]))


@pytest.mark.skipif(native_build.load() is None, reason="no native build on this machine")
def test_native_conv_nan_sample_and_batch_of_one():
    """A sample with NaN goes through the reference path (NaN out, like float); the others are unchanged."""
    conv, q, x = build("2d", "int8", "int8")
    run = lambda x: kernels.run_conv(q, "native", x)  # noqa: E731 (the path named: every build, ARM's too)
    with torch.no_grad():
        clean = run(x)
        x[0, 0, 0, 0] = float("nan")
        y = run(x)
        assert torch.isnan(y[0]).any() and torch.equal(y[1], clean[1])
        assert torch.equal(run(x[1:]), clean[1:])

@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("fmt,act,bound", [("int8", None, COS_INT8), ("int8", "int8", COS_INT8),
                                           ("int4:g32", None, COS_INT4_G32)])
def test_close_to_float(name, fmt, act, bound):
    conv, q, x = build(name, fmt, act)
    with torch.no_grad():
        assert cosine(q(x), conv(x)) >= bound


@pytest.mark.parametrize("fmt", ["int8", "int4:g32", "nvfp4"])
def test_buffers_and_state_dict_roundtrip(fmt):
    conv, q, x = build("2d-grouped", fmt)  # weight [8, 3, 3, 3]: rows of 27 values
    sd = q.state_dict()
    assert sd["weight_codes"].dtype == torch.uint8
    assert sum(t.nbytes for k, t in sd.items() if k.startswith("weight_")) == expected_nbytes(fmt, (8, 3, 3, 3))
    empty = QuantConv2d.empty_like(conv, fmt)
    empty.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(empty(x), q(x))


def test_settings_copied_and_shape_checked():
    conv, q, _ = build("2d-grouped", "int8")
    for a in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(q, a) == getattr(conv, a)
    other = QuantConv2d.from_float(nn.Conv2d(6, 8, 3), "int8").qweight
    with pytest.raises(ValueError, match="does not match"):
        QuantConv2d(conv, other)


@pytest.mark.skipif(native_build.load() is None, reason="no native build on this machine")
@pytest.mark.parametrize("fmt", ["int4:g16", "int4:g16:asym", "int4", "int4:g128:asym", "int4:g8"])
@pytest.mark.parametrize("name", ["2d", "2d-grouped", "2d-depthwise", "2d-1x1", "1d-grouped-strided"])
def test_four_bit_broadcast_convolution_with_group_scales(name, fmt):
    """4-bit convolutions run the broadcast product on int16 rows: several groups per row (the last one partial:
    rows of 54 / 9 / 27 values in groups of 16 or 8), one group per row (channel-wise, or a group longer than the
    row: then rows are gathered channels-last), symmetric and asymmetric codes."""
    conv, q, x = build(name, fmt)
    state = native_layer.NativeLayer(q, kernels.cpu_info().isa, conv=True)
    with torch.no_grad():
        y, ref = state.conv(x, q), reference(q, x)
    assert y is not None and rel_l2(y, ref) <= NATIVE_WO_REL_L2
    assert kernels.paths.extra_bytes("native", q) == 2 * math.prod(q.weight_shape)  # the int16 rows


@pytest.mark.skipif(native_build.load() is None, reason="no native build on this machine")
@pytest.mark.parametrize("act", ["int8", None])
def test_pointwise_packing_with_samples_of_different_ranges(act):
    """Pointwise layers pack channel rows directly (uint8 codes by 4 with VNNI, else int16 by 2; groups of 5 channels
    padded, a tail of pixels); samples with zero points 0 and 255 (dynamic activations) each match the reference."""
    conv, q, x = build("2d-1x1-grouped", "int8", act)
    x[0] = x[0].abs() + 0.5   # zero point 0
    x[1] = -x[1].abs() - 0.5  # zero point 255
    with torch.no_grad():
        y, ref = kernels.run_conv(q, "native", x), reference(q, x)
    bound = INT_KERNEL_REL_L2 if act else NATIVE_WO_REL_L2
    assert rel_l2(y, ref) <= bound
    for i in range(3):
        assert rel_l2(y[i], ref[i]) <= bound


NARROW_CONVS = {  # 3 x 3 and larger, groups 1, rows of at least 64 values; pixels per sample around 16
    "8x8": (lambda: nn.Conv2d(16, 24, 3, padding=1), (3, 16, 8, 8)),
    "strided-dilated": (lambda: nn.Conv2d(9, 20, 3, stride=2, padding=2, dilation=2), (2, 9, 11, 9)),
    "5x5-few-pixels": (lambda: nn.Conv2d(8, 33, 5, padding=1), (2, 8, 7, 6)),      # 4 x 3 = 12 pixels: broadcast
    "no-padding-tail": (lambda: nn.Conv2d(12, 17, 3), (2, 12, 7, 9)),                # 5 x 7 = 35 pixels
    "strided": (lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 9, 9)),   # 5 x 5 pixels
    "4-wide": (lambda: nn.Conv2d(16, 20, (3, 4), padding=(1, 2)), (2, 16, 6, 7)),
    "7x7-long-rows": (lambda: nn.Conv2d(4, 20, 7, padding=3), (2, 4, 5, 19)),       # runs of 19: 8 pixels a step
    "dilated": (lambda: nn.Conv2d(8, 16, 3, padding=2, dilation=2), (2, 8, 6, 10)),
}


NARROW_FORMATS = [("int8", None), ("int8", "int8"), ("int8", "int8:static"), ("int4:g32", None),
                  ("int4:g16:asym", None), ("int4", None), ("nvfp4", None)]


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx512", "avx2_vnni", "avx2"])
@pytest.mark.parametrize("fmt,act", NARROW_FORMATS, ids=[f"{f}-{a}" for f, a in NARROW_FORMATS])
@pytest.mark.parametrize("name", list(NARROW_CONVS))
def test_narrow_convolution_matches_broadcast_and_reference(name, fmt, act, isa, monkeypatch):
    """Convolutions keep their filters interleaved (int8 by 4 with int8 activations on VNNI, else int16 by 2; 4-bit
    filters as their integers with the group scales), and nothing else, and run the narrow Linear products with the
    pixels as rows, then transpose into NCHW: the broadcast product's exact integer sums, for any number of pixels
    and for bf16 inputs (bf16 out) too."""
    if native_build.load() is None or isa not in native_build.load().available() or \
            isa not in kernels.cpu.ISAS[kernels.cpu.ISAS.index(kernels.cpu_info().isa):]:
        pytest.skip(f"native {isa} build not runnable here")
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    torch.manual_seed(0)
    make, shape = NARROW_CONVS[name]
    q = QuantConv2d.from_float(make(), fmt, act)
    if act == "int8:static":
        q.set_input_range(torch.tensor(3.5 / 255), torch.tensor(100.0))
    state = native_layer.NativeLayer(q, isa, conv=True)
    broadcast = native_layer.NativeLayer(q, isa, conv=True, narrow_copy=False)
    assert state.narrow and not broadcast.narrow
    x = torch.randn(*shape)
    x[1] *= 5  # another range per sample
    with torch.no_grad():
        y, ref = state.conv(x, q), reference(q, x)
        assert rel_l2(y, broadcast.conv(x, q)) <= 1e-6
    assert rel_l2(y, ref) <= (INT_KERNEL_REL_L2 if act else NATIVE_WO_REL_L2)
    xb = x.bfloat16()
    with torch.no_grad():
        yb, yb_broadcast = state.conv(xb, q), broadcast.conv(xb, q)
    assert yb.dtype == torch.bfloat16 and rel_l2(yb.float(), yb_broadcast.float()) <= 1e-2
    n = math.prod(q.weight_shape)
    assert kernels.paths.extra_bytes("native", q) == (1 if act and isa.endswith("vnni") and fmt == "int8" else 2) * n
    # what the state holds besides the codes: the interleaved copy alone (k in steps of j, channels padded to 16)
    width = 1 if act and isa.endswith("vnni") and fmt == "int8" else 2
    j, o, k = (4 if width == 1 else 2), q.weight_shape[0], n // q.weight_shape[0]
    copies = [t for t in state.keep if t.dtype in (torch.int8, torch.int16) and t.dim() >= 2]
    assert [tuple(t.shape) for t in copies] == [(-(-k // j), -(-o // 16) * 16, j)]


def test_small_or_grouped_convolutions_keep_the_broadcast_product():
    isa = kernels.cpu_info().isa
    for conv in (nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.Conv2d(64, 8, 1)):
        q = QuantConv2d.from_float(conv, "int8")
        assert native_layer.narrow_conv(q, isa) == 0


@pytest.mark.parametrize("fmt,act", [("int8", "int8"), ("int4:g32", None), ("int8", None)])
def test_wrong_input_channels_get_torchs_message_with_kernels_on(fmt, act):
    """The kernels decline an input of the wrong channel count; the reference path raises torch's own error."""
    q = QuantConv2d.from_float(nn.Conv2d(3, 8, 3), fmt, act)
    q.use_kernels = True
    for x in (torch.randn(1, 5, 8, 8), torch.randn(4, 5, 8, 8)):
        with pytest.raises(RuntimeError, match="expected input.* to have 3 channels, but got 5"):
            q(x)
