"""Native decoding of integer weights (csrc/rows.cpp) to fp32 with exactly the values of the reference decoding
(formats.qtensor.dequantize_tensor), for two uses:

- embedding lookups in memory mode: only the rows asked for (`Decoder.rows`);
- the "native-decode" path of Linear / Conv layers: the whole weight decoded into a temporary for each call, then
  the float layer's own product (the reference path's computation, bit for bit, without its Python-level
  unpacking; nothing is kept between calls). It serves the layers no integer kernel takes (odd widths, 2-bit and
  asymmetric 8-bit codes, activation formats the kernels lack).

Integer formats of 8, 4, 2 or 1 bits per code (rows may start inside a byte), per channel or per group; not pruned.
"""
from __future__ import annotations

import math

import torch

from . import build


class Decoder:
    def __init__(self, layer, lib):
        from ...formats import grid

        fmt, shape = layer.weight_format, layer.weight_shape
        rows, groups, g = grid(fmt, shape)
        scale, zero = layer.weight_scale, layer._buffers.get("weight_zero")
        self.lib, self.n, self.cols = lib, rows, math.prod(shape[1:])
        self.args = (layer.weight_codes.data_ptr(), scale.data_ptr(), scale.dtype == torch.bfloat16,
                     0 if zero is None else zero.data_ptr(), rows, groups * g, groups, g, self.cols,
                     fmt.bits)
        self.keep = (layer.weight_codes, scale, zero)
        self.all = None

    def rows(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Rows `idx` as fp32 [idx.numel(), cols]; None if an id lies outside the table."""
        ids = idx.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(ids.numel(), self.cols)
        return out if self.lib.decode_rows(*self.args, ids.data_ptr(), ids.numel(), out.data_ptr()) else None

    def bags(self, idx: torch.Tensor, offsets: torch.Tensor, mean: bool) -> torch.Tensor | None:
        """Sum (or mean) of the rows of each bag [len(offsets) - 1, cols]: bag b holds idx[offsets[b]:offsets[b+1]];
        None if an id lies outside the table or the offsets do not start at 0 or decrease."""
        ids, offs = idx.to(torch.int64).contiguous(), offsets.to(torch.int64).contiguous()
        out = torch.empty(offs.numel() - 1, self.cols)
        ok = self.lib.bag_rows(*self.args, ids.data_ptr(), ids.numel(), offs.data_ptr(), offs.numel() - 1, mean,
                               out.data_ptr())
        return out if ok else None

    def weight(self) -> torch.Tensor:
        """The whole weight as fp32 [rows, cols]."""
        if self.all is None:
            self.all = torch.arange(self.n, dtype=torch.int64)
        out = torch.empty(self.n, self.cols)
        self.lib.decode_rows(*self.args, self.all.data_ptr(), self.n, out.data_ptr())
        return out


def decoder(layer) -> Decoder | None:
    """The layer's decoder, or None where the native decoder does not apply."""
    fmt, lib = layer.weight_format, build.load()
    if (lib is None or fmt.kind != "int" or fmt.bits not in (1, 2, 4, 8) or fmt.granularity == "tensor"
            or "weight_mask" in layer._buffers or layer.weight_scale.dtype not in (torch.float32, torch.bfloat16)
            or len(layer.qnames) != 1):
        return None
    return Decoder(layer, lib)
