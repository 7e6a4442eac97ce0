"""Channels-last 2-D convolutions for the per-call paths ("dense-cl", "decode-cl" in paths.py).

oneDNN's convolution on channels-last (NHWC) tensors ran 2-20x faster than on NCHW ones on the machines in
benchmarks/README.md at the zoo's shapes (a depthwise 3x3 layer over 256 x 32 x 8 x 8: 0.13 ms vs 0.5-2.6 ms, one
thread), but torch's own NCHW <-> NHWC copies are slow (a strided copy at ~4x a plain copy's time). These paths
move a contiguous NCHW input to NHWC with the native blocked transpose (csrc/layout.cpp), convolve, and move the
output back, so the layer's output has the layout the float layer's would have: NCHW for an NCHW input, NHWC for
an NHWC one (no moves then). The numbers are a float convolution's: the same products, summed in oneDNN's order for
that layout (relative difference ~1e-7 to the reference path; bit-identical only by chance).
"""
from __future__ import annotations

import torch

from . import build
from .cpu import X86_ISAS, cpu_info

CL = torch.channels_last


def applies(layer) -> bool:
    return len(layer.kernel_size) == 2 and build.load() is not None


def weight(w: torch.Tensor) -> torch.Tensor:
    """A filter [O, C/g, kh, kw] in the layout the channels-last convolution reads."""
    return w.contiguous(memory_format=CL)


def _transpose(x: torch.Tensor, out: torch.Tensor, rows: int, cols: int) -> None:
    build.load().transpose_batched(x.data_ptr(), out.data_ptr(), x.shape[0], rows, cols, cpu_info().isa in X86_ISAS)


def conv2d(layer, x: torch.Tensor, w_cl: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """layer's convolution of x [B, C, H, W] with the channels-last filter w_cl; output in x's layout."""
    conv = layer._float._conv_forward
    b, c, h, wd = x.shape
    if x.dtype != torch.float32 or c == 1 or h * wd == 1 or not x.is_contiguous():
        return conv(layer, x, w_cl, bias)  # already NHWC (or either: one channel / one pixel), or not fp32
    xl = torch.empty_like(x, memory_format=CL)
    _transpose(x, xl, c, h * wd)  # [B, C, HW] -> [B, HW, C]
    yl = conv(layer, xl, w_cl, bias)
    o, ho, wo = yl.shape[1:]
    if yl.is_contiguous() or not yl.is_contiguous(memory_format=CL):  # one channel / pixel: the layouts agree
        return yl.contiguous()
    y = torch.empty(yl.shape, dtype=yl.dtype)
    _transpose(yl, y, ho * wo, o)  # [B, HW, O] -> [B, O, HW]
    return y
