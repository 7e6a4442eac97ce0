"""Microscaling block formats: OCP MX v1.0 (MXFP8/6/4, MXINT8) and NVIDIA's NVFP4.

MX: blocks of 32 share an E8M0 scale X = 2**(floor(log2(amax)) - emax_elem) (spec section 6.3); elements
are w / X rounded to the element format with saturation. The scale is stored as its biased exponent
(uint8, bias 127). MXINT8 elements are int8 with an implicit scale of 2**-6 (emax_elem = 0).
NVFP4: blocks of 16, fp4_e2m1 elements, an fp8_e4m3 block scale and one fp32 scale per tensor chosen so
that the largest block scale maps to 448.
"""
from __future__ import annotations

import torch

from .floats import decode_float, emax, encode_float, max_value


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(x)) for x > 0 (frexp gives x = m * 2**e with m in [0.5, 1))."""
    return torch.frexp(x).exponent.to(torch.int32) - 1


def mx_quantize(w: torch.Tensor, element: str):
    """w: [rows, blocks, 32] -> (codes uint8 [rows, blocks, 32], biased scale exponent uint8 [rows, blocks, 1])."""
    amax = w.abs().amax(-1, keepdim=True)
    e_elem = 0 if element == "int8" else emax(element)
    exp = torch.where(amax > 0, _floor_log2(amax.clamp(min=2.0**-140)) - e_elem, torch.full_like(amax, -127, dtype=torch.int32))
    exp = exp.clamp(-127, 127)
    v = w / torch.exp2(exp.float())
    if element == "int8":
        codes = torch.clamp(torch.round(v * 64), -128, 127).to(torch.int32) & 0xFF  # two's complement byte
        codes = codes.to(torch.uint8)
    else:
        codes = encode_float(v, element)
    return codes, (exp + 127).to(torch.uint8)


def mx_dequantize(codes: torch.Tensor, scale_exp: torch.Tensor, element: str) -> torch.Tensor:
    x = torch.exp2(scale_exp.float() - 127)
    if element == "int8":
        v = codes.to(torch.int8).float() / 64
    else:
        v = decode_float(codes, element)
    return v * x


def nvfp4_quantize(w: torch.Tensor):
    """w: [rows, blocks, 16] -> (codes uint8, block scale as fp8_e4m3 code uint8 [rows, blocks, 1], global fp32 [])."""
    fp4_max, e4m3_max = max_value("fp4_e2m1"), max_value("fp8_e4m3")
    amax_t = w.abs().amax()
    g = amax_t / (fp4_max * e4m3_max) if amax_t > 0 else torch.tensor(1.0)
    g = g.float()
    block = w.abs().amax(-1, keepdim=True) / fp4_max / g  # ideal block scale, in [0, 448]
    s_code = encode_float(block, "fp8_e4m3")
    s = decode_float(s_code, "fp8_e4m3") * g
    v = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))
    return encode_float(v, "fp4_e2m1"), s_code, g.reshape(())


def nvfp4_dequantize(codes, s_code, g) -> torch.Tensor:
    return decode_float(codes, "fp4_e2m1") * (decode_float(s_code, "fp8_e4m3") * g.float())
