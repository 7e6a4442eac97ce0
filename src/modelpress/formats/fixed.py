"""Encoding with given scales: round a tensor onto the grid of an existing QTensor's parameters.

Algorithms that choose codes themselves (GPTQ) fix the scales (zero points, global scale) first and then
round weights one column at a time against them. `encode_values` does that on any broadcastable piece;
`quantize_with_params` does it for a whole weight and returns a QTensor that stores exactly those codes.
With `like = quantize_tensor(w, fmt)`, `quantize_with_params(w, fmt, like)` reproduces like's codes.
"""
from __future__ import annotations

import torch

from . import mx
from .floats import decode_float, encode_float
from .integer import int_range
from .packing import pack_bits
from .qtensor import QTensor, _to_grid, grid
from .spec import Format, parse_format


def encode_values(w: torch.Tensor, fmt: Format, scale: torch.Tensor, zero: torch.Tensor | None = None,
                  global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, decoded float32 values) of `w` rounded with fixed parameters.

    scale / zero: stored tensors (scale dtype as in QTensor: fp32/bf16, MX biased exponent, NVFP4 e4m3 code)
    broadcastable to w; global_scale: NVFP4's fp32 tensor scale. Codes are those a QTensor stores."""
    w = w.float()
    mask = 2**fmt.bits - 1
    if fmt.kind == "int":
        qmin, qmax = int_range(fmt.bits, fmt.symmetric)
        s = scale.float()
        z = zero.float() if zero is not None else torch.zeros((), dtype=torch.float32)
        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
        return (q.to(torch.int32) & mask).to(torch.uint8), (q - z) * s
    if fmt.kind == "binary":
        c = (w >= 0).to(torch.uint8)
        return c, (c.float() * 2 - 1) * scale.float()
    if fmt.kind == "ternary":
        q = torch.clamp(torch.round(w / scale.float()), -1, 1)
        return (q.to(torch.int32) & mask).to(torch.uint8), q * scale.float()
    if fmt.kind == "float":
        c = encode_float(w / scale.float(), fmt.name)
        return c, decode_float(c, fmt.name) * scale.float()
    if fmt.kind == "mx":
        v = w / torch.exp2(scale.to(torch.int32).float() - 127)
        if fmt.element == "int8":
            c = (torch.clamp(torch.round(v * 64), -128, 127).to(torch.int32) & 0xFF).to(torch.uint8)
        else:
            c = encode_float(v, fmt.element)
        return c, mx.mx_dequantize(c, scale, fmt.element)
    if fmt.kind == "nvfp4":
        s = decode_float(scale, "fp8_e4m3") * global_scale.float()
        v = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))
        c = encode_float(v, "fp4_e2m1")
        return c, mx.nvfp4_dequantize(c, scale, global_scale)
    raise ValueError(f"unsupported format kind {fmt.kind!r}")


def nvfp4_block_scales(w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """e4m3 block-scale codes (uint8) for blocks w [..., 16] under a fixed fp32 tensor scale."""
    block = w.float().abs().amax(-1) / 6.0 / global_scale.float()  # fp4_e2m1 max is 6
    return encode_float(block, "fp8_e4m3")


def quantize_with_params(w: torch.Tensor, fmt: Format | str, like: QTensor) -> QTensor:
    """Encode `w` (shape like.shape) with like's scale / zero point / global scale held fixed."""
    fmt = parse_format(fmt)
    if tuple(w.shape) != tuple(like.shape):
        raise ValueError(f"tensor of shape {tuple(w.shape)} does not match the parameters' shape {tuple(like.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"tensor of shape {tuple(w.shape)} has NaN or infinite values; refusing to quantize it")
    wg = _to_grid(w, fmt)  # [rows, groups, g]
    rows, groups, _ = grid(fmt, tuple(w.shape))
    if tuple(like.scale.shape) != (rows, groups):
        raise ValueError(f"scales of shape {tuple(like.scale.shape)} do not fit {fmt} on a {tuple(w.shape)} tensor")
    zero = like.zero.unsqueeze(-1) if like.zero is not None else None
    codes, _ = encode_values(wg, fmt, like.scale.unsqueeze(-1), zero, like.global_scale)
    return QTensor(fmt, tuple(w.shape), pack_bits(codes, fmt.bits), like.scale.clone(),
                   None if like.zero is None else like.zero.clone(),
                   None if like.global_scale is None else like.global_scale.clone())


def round_to_grid(w: torch.Tensor, fmt: Format | str, like: QTensor) -> torch.Tensor:
    """`w` rounded onto like's grid: dequantize(quantize_with_params(w, fmt, like)), float32."""
    return quantize_with_params(w, fmt, like).dequantize()
