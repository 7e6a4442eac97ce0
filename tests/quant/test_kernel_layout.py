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


@pytest.mark.skipif(not kernels.cpu_info().bf16_fast, reason="decode-bf16: a CPU that multiplies bf16 in hardware")
@pytest.mark.parametrize("fmt,act", [("int8", None), ("int4:g32", None), ("int8", "int8"), ("mxfp4", "fp8_e4m3")])
@pytest.mark.parametrize("conv", [nn.Conv2d(6, 12, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                  nn.Conv1d(6, 10, 3, bias=False)], ids=["conv2d", "depthwise", "conv1d"])
def test_decode_bf16_matches_the_reference_to_bf16_rounding(fmt, act, conv):
    """The weight decoded at each call and torch's bf16 convolution: bf16 inside, as the dense bf16 copy of speed
    mode, without keeping it; the output in the input's dtype."""
    torch.manual_seed(0)
    cls = QuantConv1d if isinstance(conv, nn.Conv1d) else QuantConv2d
    q = cls.from_float(conv, fmt, act)
    x = torch.randn(3, conv.in_channels, 9) if isinstance(conv, nn.Conv1d) else torch.randn(3, conv.in_channels, 9, 11)
    ref = q.reference(x)
    cpu = kernels.cpu_info()
    assert kernels.paths.applies("conv", "decode-bf16", q, cpu, 3)
    y = kernels.run_conv(q, "decode-bf16", x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert _rel(y, ref) < 1e-2
    assert kernels.run_conv(q, "decode-bf16", x.bfloat16()).dtype == torch.bfloat16
    assert kernels.paths.display("conv", "decode-bf16", q, cpu) == "native decode, bf16 product"
    assert kernels.paths.extra_bytes("decode-bf16", q) == 0


def test_decode_bf16_needs_bf16_hardware():
    import dataclasses

    q = QuantConv2d.from_float(nn.Conv2d(4, 4, 3), "int8")
    cpu = dataclasses.replace(kernels.cpu_info(), bf16_fast=False)
    assert not kernels.paths.applies("conv", "decode-bf16", q, cpu, 1)
