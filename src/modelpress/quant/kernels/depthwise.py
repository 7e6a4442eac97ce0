"""Depthwise 2-D convolutions in fp32 for the per-call paths ("native-dw" in paths.py; csrc/dw_impl.h).

oneDNN runs a depthwise layer over small planes at a fixed cost of ~40 us per call on the machines in
benchmarks/README.md (digits-dwcnn's 3 x 3 layers over 32-128 planes of 8 x 8 or 4 x 4 at batch 1), more than the
arithmetic. The native kernel treats each plane as one flat vector of H x W values and sums the taps as masked
loads (lanes whose tap falls outside the plane read zero) times the tap's weight: a few microseconds at batch 1,
about oneDNN's time at batch 256. With 512-bit registers, planes of up to 4 vectors (3 x 3 or 5 x 5 taps, each
within one vector of its output) are loaded once and each tap's values permuted out of the registers instead:
2.2-2.9x oneDNN's speed at batch 256 (AMD EPYC, Zen 5, one thread: 256 x 32 planes of 8 x 8 87 us vs 217, 256 x 128
planes of 4 x 4 96 us vs 216). With 256-bit registers (AVX2) the masked loads stay: faster than oneDNN on 4 x 4
planes (118 us vs 176 for 256 x 64), slower on 8 x 8 (396 vs 293 for 256 x 32), where the speed guard keeps torch's.
Layers whose output channels each read one input channel with a channel multiplier (weight [O, 1, kh, kw], groups
C < O) take the same kernel; with 512-bit registers each input plane is permuted once for blocks of its outputs: a
stem Conv2d(1, 16, 3) over 256 x 8 x 8 40 us vs oneDNN's 87. The weight is the layer's decoded weight and the input
the fake-quantized one (int8 / fp8 activations) exactly as on the reference path: only the order of the fp32 sums
can differ.
"""
from __future__ import annotations

import torch

from . import build


def applies(layer) -> bool:
    """Each output channel reads one input channel (weight [O, 1, kh, kw]: depthwise, with any channel multiplier, a
    stem over one input channel included), stride 1, dilation 1, zero padding that keeps H x W (odd kernels)."""
    ks = tuple(layer.kernel_size)
    if len(ks) != 2 or any(k % 2 == 0 for k in ks) or layer.padding_mode != "zeros":
        return False
    cg = layer.weight_shape[1]
    if cg != 1 or tuple(layer.stride) != (1, 1) or tuple(layer.dilation) != (1, 1):
        return False
    same = tuple((k - 1) // 2 for k in ks)
    return (layer.padding == "same" or tuple(layer.padding) == same) and build.load() is not None


def conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, isa: str) -> torch.Tensor | None:
    """x [B, C, H, W] fp32 NCHW-contiguous convolved with w [O, 1, kh, kw] (O a multiple of C; output channel o reads
    input channel o // (O / C)); None for any other input."""
    if x.dtype != torch.float32 or x.dim() != 4 or not x.is_contiguous():
        return None
    w = w.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    return build.load().dw_conv_t(x, w, bias, isa)
