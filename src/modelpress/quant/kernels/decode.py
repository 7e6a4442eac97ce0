"""Native decoding of quantized weights (csrc/rows.cpp) to fp32 with exactly the values of the reference decoding
(formats.qtensor.dequantize_tensor: the same fp32 products, element values and scales taken from the same
functions), for two uses:

- embedding lookups and bags in memory mode: only the rows asked for (`Decoder.rows`, `Decoder.bags`);
- the "native-decode" path of Linear / Conv layers: the whole weight decoded into a temporary for each call, then
  the float layer's own product (the reference path's computation, bit for bit, without its Python-level
  unpacking; nothing is kept between calls). It serves the layers no integer kernel takes (odd widths, 2-bit and
  asymmetric 8-bit codes, fp8 / MXFP / NVFP4 weights, activation formats the kernels lack).

Formats: integers of 8, 4, 2 or 1 bits per code, fp8 and fp4 elements (per channel or group), MXFP8 / MXFP4 /
MXINT8 and NVFP4; rows may start inside a byte. Not: tensor-wide scales, 3/5/6/7-bit codes, pruned weights.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from . import build
from .cpu import X86_ISAS, cpu_info


@lru_cache(maxsize=None)
def _values(name: str, bits: int) -> torch.Tensor:
    """decode_float of every `bits`-bit code of element format `name`; NaN where it refuses the code."""
    from ...formats.floats import decode_float

    out = torch.full((1 << bits,), float("nan"))
    for c in range(1 << bits):
        try:
            out[c] = decode_float(torch.tensor([c], dtype=torch.uint8), name)[0]
        except ValueError:
            pass
    return out


def _tables(layer) -> tuple[torch.Tensor | None, torch.Tensor | None, int, float] | None:
    """(element values by code or None for integers, scale values by code or None, scale kind, global scale)."""
    fmt, scale = layer.weight_format, layer.weight_scale
    codes = torch.arange(1 << fmt.bits, dtype=torch.int32).to(torch.uint8)
    if fmt.kind == "int":
        lut = None
    elif fmt.kind == "float":
        lut = _values(fmt.name, fmt.bits)
    elif fmt.kind in ("mx", "nvfp4"):
        lut = codes.to(torch.int8).float() / 64 if fmt.element == "int8" else _values(fmt.element, fmt.bits)
    else:
        return None
    if fmt.kind == "mx":
        return lut, torch.exp2(torch.arange(256, dtype=torch.float32) - 127), 2, 1.0
    if fmt.kind == "nvfp4":
        return lut, _values("fp8_e4m3", 8), 2, float(layer.weight_global_scale)
    if scale.dtype not in (torch.float32, torch.bfloat16):
        return None
    return lut, None, int(scale.dtype == torch.bfloat16), 1.0


class Decoder:
    def __init__(self, layer, lib, lut, slut, scale_kind: int, gscale: float):
        from ...formats import grid

        fmt, shape = layer.weight_format, layer.weight_shape
        rows, groups, g = grid(fmt, shape)
        scale, zero = layer.weight_scale, layer._buffers.get("weight_zero")
        self.n, self.cols = rows, math.prod(shape[1:])
        self.shape = tuple(shape)  # weight() returns this shape: a .view per call would cost ~0.5-0.9 us
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        x86 = cpu_info().isa in X86_ISAS  # the build this process runs
        self.op = lib.RowTable(layer.weight_codes.data_ptr(), scale.data_ptr(), scale_kind, ptr(zero), ptr(lut),
                               ptr(slut), gscale, rows, groups * g, groups, g, self.cols, fmt.bits, x86)
        self.keep = (layer.weight_codes, scale, zero, lut, slut)
        self.all = None

    def rows(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Rows `idx` as fp32 [idx.numel(), cols]; None if an id lies outside the table."""
        return self.op.rows_t(idx)

    def bags(self, idx: torch.Tensor, offsets: torch.Tensor | None, include_last: bool, mean: bool) -> torch.Tensor | None:
        """Sum (or mean) of the rows of each bag, as F.embedding_bag: `idx` 1-D with `offsets` (starts of the bags;
        with `include_last`, the last entry ends the last bag) or 2-D [bags, ids] with offsets None. None if an id
        lies outside the table or the offsets are invalid."""
        return self.op.bags_t(idx, offsets, include_last, mean)

    def weight(self) -> torch.Tensor:
        """The whole weight as fp32, in the layer's weight shape (rows first: [rows, cols] in memory)."""
        if self.all is None:
            self.all = torch.arange(self.n, dtype=torch.int64)
        out = torch.empty(self.shape)
        self.op.decode(self.all.data_ptr(), self.n, out.data_ptr())
        return out


def supports(layer) -> bool:
    """Whether the native decoder reads this layer's format (a check of the format only: cheap)."""
    fmt = layer.weight_format
    if (build.load() is None or fmt.bits not in (1, 2, 4, 8) or fmt.granularity == "tensor"
            or "weight_mask" in layer._buffers or len(layer.qnames) != 1):
        return False
    return _tables(layer) is not None


def decoder(layer) -> Decoder | None:
    """The layer's decoder, or None where the native decoder does not apply or the stored codes include NaN/inf
    codes (a damaged file: the reference decoding names the problem). The codes are read once, here."""
    if not supports(layer):
        return None
    lut, slut, kind, gscale = _tables(layer)
    if lut is not None and not torch.isfinite(lut[_codes(layer)]).all():
        return None
    if slut is not None and not torch.isfinite(slut[layer.weight_scale.long()]).all():
        return None
    return Decoder(layer, build.load(), lut, slut, kind, gscale)


def _codes(layer) -> torch.Tensor:
    from ...formats.packing import unpack_bits

    fmt, codes = layer.weight_format, layer.weight_codes
    return unpack_bits(codes, fmt.bits, codes.numel() * 8 // fmt.bits).long()
