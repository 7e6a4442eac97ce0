"""Channels-last convolution paths (kernels/layout.py, csrc/layout.cpp): the native NCHW <-> NHWC transpose is an
exact copy, and "dense-cl" / "decode-cl" give the reference path's output to float rounding, in the input's layout."""
import pytest
import torch
from torch import nn

from modelpress.quant import QuantConv1d, QuantConv2d, kernels
from modelpress.quant.kernels import build

pytestmark = pytest.mark.skipif(build.load() is None, reason="no native build on this machine")


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2-blocks", "portable"])
@pytest.mark.parametrize("b,r,c", [(1, 8, 8), (3, 13, 21), (2, 32, 64), (4, 5, 3), (1, 1, 17)])
def test_transpose_is_an_exact_copy(b, r, c, avx2):
    x = torch.randn(b, r, c)
    y = torch.empty(b, c, r)
    build.load().transpose_batched(x.data_ptr(), y.data_ptr(), b, r, c, avx2)
    assert torch.equal(y, x.transpose(1, 2))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("path", ["dense-cl", "decode-cl"])
@pytest.mark.parametrize("fmt,act", [("int8", None), ("int4:g32", None), ("int8", "int8"), ("mxfp4", "fp8_e4m3")])
@pytest.mark.parametrize("cin,cout,groups,stride", [(6, 12, 1, 1), (8, 8, 8, 1), (6, 9, 3, 2), (1, 5, 1, 1)],
                         ids=["dense", "depthwise", "grouped-strided", "one-channel"])
def test_channels_last_paths_match_the_reference(path, fmt, act, cin, cout, groups, stride):
    torch.manual_seed(0)
    q = QuantConv2d.from_float(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups), fmt, act)
    x = torch.randn(3, cin, 9, 11)
    ref = q.reference(x)
    y = kernels.run_conv(q, path, x)
    assert y.shape == ref.shape and y.is_contiguous()  # NCHW in, NCHW out, as the float layer
    assert _rel(y, ref) < 1e-5
    xl = x.contiguous(memory_format=torch.channels_last)  # an NHWC input gives an NHWC output, as float does
    yl = kernels.run_conv(q, path, xl)
    assert _rel(yl, ref) < 1e-5
    assert yl.is_contiguous(memory_format=torch.channels_last) == nn.functional.conv2d(
        xl, q.dequantized_weight(torch.float32), None, stride, 1, 1, groups).is_contiguous(memory_format=torch.channels_last)


def test_only_two_dimensional_convolutions_take_them():
    conv1d = QuantConv1d.from_float(nn.Conv1d(4, 4, 3), "int8")
    conv2d = QuantConv2d.from_float(nn.Conv2d(4, 4, 3), "int8")
    cpu = kernels.cpu_info()
    assert not kernels.paths.applies("conv", "dense-cl", conv1d, cpu, 1)
    assert kernels.paths.applies("conv", "dense-cl", conv2d, cpu, 1)
    assert kernels.paths.applies("conv", "decode-cl", conv2d, cpu, 1)


@pytest.mark.parametrize("fmt", ["int8", "int4:g32", "mxfp4", "int4:asym"])
@pytest.mark.parametrize("conv", [nn.Conv2d(6, 12, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                  nn.Conv1d(6, 10, 3, bias=False)], ids=["conv2d", "depthwise", "conv1d"])
def test_decode_bf16_matches_the_reference_to_bf16_rounding(fmt, conv):
    """Weight-only layers: the weight decoded at each call and torch's bf16 convolution (bf16 inside, as the dense bf16
    copy of speed mode, without keeping it), the output in the input's dtype. Offered on CPUs with bf16 hardware;
    computed (and checked here) on any."""
    torch.manual_seed(0)
    cls = QuantConv1d if isinstance(conv, nn.Conv1d) else QuantConv2d
    q = cls.from_float(conv, fmt)
    x = torch.randn(3, conv.in_channels, 9) if isinstance(conv, nn.Conv1d) else torch.randn(3, conv.in_channels, 9, 11)
    ref = q.reference(x)
    cpu = kernels.cpu_info()
    assert kernels.paths.applies("conv", "decode-bf16", q, cpu, 3) == cpu.bf16_fast
    y = kernels.run_conv(q, "decode-bf16", x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert 1e-4 < _rel(y, ref) < 1e-2  # bf16 inside: not the fp32 result, within bf16 rounding of it
    xb = x.bfloat16()
    yb = kernels.run_conv(q, "decode-bf16", xb)
    assert yb.dtype == torch.bfloat16 and _rel(yb.float(), q.reference(xb.float())) < 1e-2
    assert kernels.paths.display("conv", "decode-bf16", q, cpu) == "native decode, bf16 product"
    assert kernels.paths.extra_bytes("decode-bf16", q) == 0


def test_decode_bf16_is_weight_only_and_needs_bf16_hardware():
    """Layers that quantize their activations keep their exact (or fp32-rounded) paths in memory mode."""
    import dataclasses

    cpu = kernels.cpu_info()
    q = QuantConv2d.from_float(nn.Conv2d(4, 4, 3), "int8")
    assert not kernels.paths.applies("conv", "decode-bf16", q, dataclasses.replace(cpu, bf16_fast=False), 1)
    for act in ("int8", "fp8_e4m3"):
        w8a8 = QuantConv2d.from_float(nn.Conv2d(4, 4, 3), "int8" if act == "int8" else "mxfp4", act)
        assert not kernels.paths.applies("conv", "decode-bf16", w8a8, dataclasses.replace(cpu, bf16_fast=True), 1)
