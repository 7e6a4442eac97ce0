"""Activation fake quantization on the per-call paths (dense copies in speed mode): the native version of
`QuantMixin.quantize_input` / `quantize_conv_input` (csrc/actq.cpp), bit-identical to them, one pass over the
input instead of the half-dozen temporary tensors of the torch version. Anything it does not cover (no native
build, a non-fp32 or non-contiguous (NCHW or NHWC) input, NaN/Inf in the input) goes to the torch version."""
from __future__ import annotations

import torch

from . import build


def quantize_input(layer, x: torch.Tensor, conv: bool = False) -> torch.Tensor:
    """`layer.quantize_input(x)` (`quantize_conv_input` for a convolution), computed natively where it can be."""
    act = layer.act
    if act is None:
        return x
    # an NHWC input (4-D, channels-last) keeps each sample's values in one block too: per-sample and per-tensor
    # ranges read the memory as it lies, and empty_like keeps the layout
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    lib = build.load() if x.dtype == torch.float32 and dense and x.numel() else None
    if lib is not None:
        y = torch.empty_like(x)
        if act.name.startswith("fp8"):
            scale = float(layer.input_scale) if act.static else -1.0
            ok = lib.fake_quant_fp8(x.data_ptr(), y.data_ptr(), x.numel(), act.name == "fp8_e5m2", scale)
        else:
            rows = 1 if act.static else x.shape[0]
            scale, zero = (float(layer.input_scale), float(layer.input_zero)) if act.static else (1.0, 0.0)
            ok = lib.fake_quant_uint(x.data_ptr(), y.data_ptr(), rows, x.numel() // rows, act.bits, not act.static,
                                     scale, zero)
        if ok:
            return y
    return layer.quantize_conv_input(x) if conv else layer.quantize_input(x)
