"""QTensor: a weight quantized to a Format, held as packed codes plus scales; encode, decode, byte counts.

A weight of any rank is seen as a matrix [rows, cols] (rows = output channels / embedding rows, cols = the
rest flattened). Scales are per tensor, per row, or per group of `group_size` consecutive columns; a row
whose length is not a multiple of the group is zero-padded to one (the padding is stored and counted); a row
shorter than a group forms a single group of its own length. A pruned weight also holds a bitmask of its kept
values (`mask`) and the codes of those values only (formats/sparse.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import integer, mx
from .floats import decode_float, encode_float, max_value
from .packing import pack_bits, packed_nbytes, unpack_bits
from .spec import Format, parse_format


@dataclass
class QTensor:
    fmt: Format
    shape: tuple[int, ...]
    codes: torch.Tensor  # uint8 [packed bytes]
    scale: torch.Tensor  # [rows, groups]: fp32 / bf16, MX: uint8 biased exponent, NVFP4: uint8 e4m3 code
    zero: torch.Tensor | None = None  # uint8 [rows, groups] for asymmetric integers
    global_scale: torch.Tensor | None = None  # fp32 [] for NVFP4
    mask: torch.Tensor | None = None  # uint8 bitmask of the kept values (sparse); `codes` then holds only theirs

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        if self.global_scale is not None:
            out["global_scale"] = self.global_scale
        if self.mask is not None:
            out["mask"] = self.mask
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_tensor(self, dtype)


def grid(fmt: Format, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, groups, group) of the padded code grid for a weight of `shape`."""
    rows = shape[0] if len(shape) > 1 else 1
    cols = math.prod(shape) // max(rows, 1) if shape else 1
    if fmt.granularity == "tensor":
        return 1, 1, rows * cols
    if fmt.granularity == "channel":
        return rows, 1, cols
    g = min(fmt.group_size, cols)  # a row shorter than a group is one group (no padding to the group size)
    return rows, -(-cols // g), g


RAW_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BITS_DTYPE = {32: torch.int32, 16: torch.int16}  # raw values are handled as integer bit patterns (codes)


def pack_codes(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes (uint8 < 2**bits; raw formats: int16/int32 bit patterns) as the flat uint8 bytes stored."""
    if fmt.kind == "raw":
        return codes.reshape(-1).contiguous().view(torch.uint8).clone()
    return pack_bits(codes.to(torch.uint8), fmt.bits)


def unpack_codes(packed: torch.Tensor, fmt: Format, n: int) -> torch.Tensor:
    """The first `n` codes of the stored bytes (inverse of pack_codes)."""
    if fmt.kind == "raw":
        if packed.numel() != n * fmt.bits // 8:
            raise ValueError(f"{n} {fmt.name} values need {n * fmt.bits // 8} bytes, got {packed.numel()}")
        return packed.view(_BITS_DTYPE[fmt.bits])
    return unpack_bits(packed, fmt.bits, n)


def _scale_dtype(fmt: Format) -> torch.dtype:
    if fmt.kind in ("mx", "nvfp4"):
        return torch.uint8
    return torch.bfloat16 if fmt.granularity == "group" else torch.float32


def expected_nbytes(fmt: "Format | str", shape: tuple[int, ...]) -> int:
    """Bytes a QTensor of this format and shape holds: codes + scales (+ zero points, + tensor scale)."""
    fmt = parse_format(fmt)
    rows, groups, g = grid(fmt, tuple(shape))
    n = packed_nbytes(rows * groups * g, fmt.bits)
    n += rows * groups * torch.empty((), dtype=_scale_dtype(fmt)).element_size()
    if fmt.kind == "int" and not fmt.symmetric:
        n += rows * groups
    if fmt.kind == "nvfp4":
        n += 4
    return n


def bits_per_param(fmt: "Format | str", shape: tuple[int, ...]) -> float:
    """Stored bits per weight, scales and zero points included (e.g. int4:g32 -> 4.5, mxfp4 -> 4.25)."""
    return 8 * expected_nbytes(fmt, shape) / math.prod(shape)


def _to_grid(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    rows, groups, g = grid(fmt, tuple(w.shape))
    w2 = w.detach().float().reshape(rows, -1).contiguous()  # a transposed view (Conv1D) too
    pad = groups * g - w2.shape[1]
    return F.pad(w2, (0, pad)).view(rows, groups, g)


def quantize_tensor(w: torch.Tensor, fmt: "Format | str", mse: bool | None = None) -> QTensor:
    """Quantize a float tensor by round-to-nearest. `mse` forces (or disables) the clipping search for ints."""
    fmt = parse_format(fmt)
    if not torch.is_floating_point(w):
        raise TypeError(f"can only quantize floating-point tensors, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(f"tensor of shape {tuple(w.shape)} has NaN or infinite values; refusing to quantize it")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if fmt.kind == "raw":  # stored as it is (scale 1)
        bits = w.detach().to(RAW_DTYPES[fmt.name]).reshape(-1).view(_BITS_DTYPE[fmt.bits])
        return QTensor(fmt, tuple(w.shape), pack_codes(bits, fmt), torch.ones(1, 1))
    wg = _to_grid(w, fmt)  # [rows, groups, g]
    sd = _scale_dtype(fmt)
    zero = gscale = None
    mask = 2**fmt.bits - 1
    if fmt.kind == "int":
        q, scale, z = integer.quantize_int(wg, fmt.bits, fmt.symmetric, mse=mse, scale_dtype=sd)
        codes = q & mask
        if not fmt.symmetric:
            zero = z.squeeze(-1).to(torch.uint8)
    elif fmt.kind == "binary":
        codes, scale = integer.quantize_binary(wg, scale_dtype=sd)
    elif fmt.kind == "ternary":
        q, scale = integer.quantize_ternary(wg, scale_dtype=sd)
        codes = q & mask
    elif fmt.kind == "float":
        amax = wg.abs().amax(-1, keepdim=True)
        scale = (amax / max_value(fmt.name)).to(sd).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = encode_float(wg / scale, fmt.name)
    elif fmt.kind == "mx":
        codes, scale = mx.mx_quantize(wg, fmt.element)
    else:  # nvfp4
        codes, scale, gscale = mx.nvfp4_quantize(wg)
    return QTensor(fmt, tuple(w.shape), pack_bits(codes.to(torch.uint8), fmt.bits),
                   scale.squeeze(-1).to(sd).contiguous(), zero, gscale)


def codes_grid(q: QTensor) -> torch.Tensor:
    """Unpacked codes (uint8; raw formats: int bit patterns) on the [rows, groups, group] grid. A sparse weight's
    pruned positions get the code of zero (the zero point for asymmetric integers)."""
    if q.mask is not None:
        from .sparse import scatter_codes

        return scatter_codes(q)
    rows, groups, g = grid(q.fmt, q.shape)
    return unpack_codes(q.codes, q.fmt, rows * groups * g).view(rows, groups, g)


def signed(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's complement `bits`-bit codes (uint8) to signed int32."""
    if bits == 8:
        return u.view(torch.int8).to(torch.int32)  # a reinterpretation: no comparisons needed
    u = u.to(torch.int32)
    return torch.where(u >= 2 ** (bits - 1), u - 2**bits, u)


def dequantize_tensor(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    fmt = q.fmt
    u = codes_grid(q)
    scale = q.scale.unsqueeze(-1)
    if fmt.kind == "int":
        if fmt.symmetric:
            w = signed(u, fmt.bits).float() * scale.float()
        else:
            w = (u.float() - q.zero.unsqueeze(-1).float()) * scale.float()
    elif fmt.kind == "binary":
        w = (u.float() * 2 - 1) * scale.float()
    elif fmt.kind == "ternary":
        w = signed(u, 2).float() * scale.float()
    elif fmt.kind == "float":
        w = decode_float(u, fmt.name) * scale.float()
    elif fmt.kind == "mx":
        w = mx.mx_dequantize(u, scale, fmt.element)
    elif fmt.kind == "raw":
        w = u.view(RAW_DTYPES[fmt.name]).float()
    else:
        w = mx.nvfp4_dequantize(u, scale, q.global_scale)
    rows = w.shape[0]
    n = math.prod(q.shape)
    w = w.reshape(rows, -1)[:, : n // rows].reshape(q.shape)
    if q.mask is not None:  # pruned values are exactly zero, whatever code the format has for zero
        from .sparse import unpack_mask

        w = torch.where(unpack_mask(q.mask, q.shape), w, 0.0)
    return w.to(dtype)


def fake_quantize(w: torch.Tensor, fmt: "Format | str") -> torch.Tensor:
    """Quantize then dequantize (same dtype as w)."""
    return dequantize_tensor(quantize_tensor(w, fmt), w.dtype)


def dequantize_rows(q: QTensor, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `idx` of the weight as a [len(idx), cols] float tensor, decoding only those rows' bytes (falls back to
    decoding everything when a row does not end on a packing-chunk boundary). Rows are gathered with index_select,
    which refuses negative and out-of-range ids as nn.Embedding does (IndexError), eagerly and in traced graphs."""
    from .packing import _chunk

    rows = q.shape[0]
    cols = math.prod(q.shape[1:])
    idx = idx.reshape(-1).long()
    if idx.numel() == 0:
        return torch.zeros(0, cols, dtype=dtype, device=q.codes.device)
    _, groups, g = grid(q.fmt, q.shape)
    row_codes = cols if q.fmt.granularity == "tensor" else groups * g
    per, nb = _chunk(q.fmt.bits)
    if row_codes % per or q.mask is not None:
        return dequantize_tensor(q, dtype).reshape(rows, cols).index_select(0, idx)
    codes = q.codes.view(rows, row_codes // per * nb).index_select(0, idx).reshape(-1)  # whole bytes per row
    per_row = q.fmt.granularity != "tensor"
    sub = QTensor(q.fmt, (idx.numel(), *q.shape[1:]), codes,
                  q.scale.index_select(0, idx) if per_row else q.scale,
                  None if q.zero is None else (q.zero.index_select(0, idx) if per_row else q.zero), q.global_scale)
    return dequantize_tensor(sub, dtype).reshape(idx.numel(), cols)


def byte_histogram(b: torch.Tensor, step: int = 1 << 24) -> torch.Tensor:
    """How often each of the 256 byte values occurs in uint8 `b` (int64 [256]), a slice at a time."""
    out = torch.zeros(256, dtype=torch.int64)
    for i in range(0, b.numel(), step):
        out += torch.bincount(b[i:i + step], minlength=256)
    return out


def stored_problem(q: QTensor, nnz: int | None = None) -> str | None:
    """What a QTensor read from a file holds that no quantization writes, or None: a non-finite scale (an E8M0
    exponent of 255, a NaN fp8 block scale), a zero point beyond the format's codes, NaN/inf codes of a float
    format, a bitmask that keeps another number of values than the codes stored. The byte counts were checked
    before (io/validate.py); these are the values; `nnz`: the kept values a sparse weight's record says. One pass
    over the codes of 8-bit float formats and over a bitmask (a byte histogram), the rest is small."""
    from .floats import nonfinite_codes
    from .sparse import kept_values

    fmt = q.fmt
    if q.mask is not None:
        kept = kept_values(q.mask, math.prod(q.shape))
        if packed_nbytes(kept, fmt.bits) != q.codes.numel() or nnz is not None and kept != nnz:
            return (f"its bitmask keeps {kept} values, the codes stored are those of "
                    f"{nnz if nnz is not None else 'another number of'} values")
    if fmt.kind == "mx":
        if bool((q.scale == 255).any()):
            return "a block scale is 255, the NaN of E8M0"
    elif fmt.kind == "nvfp4":
        if bool(nonfinite_codes(q.scale, "fp8_e4m3").any()):
            return "a block scale is a NaN fp8_e4m3 code"
        if not bool(torch.isfinite(q.global_scale).all()):
            return "its tensor scale is not finite"
    elif not bool(torch.isfinite(q.scale.float()).all()):
        return "a scale is NaN or infinite"
    if q.zero is not None and bool((q.zero.to(torch.int32) >= 2**fmt.bits).any()):  # (uint8: 256 wraps)
        return f"a zero point is beyond the {2**fmt.bits} codes of {fmt.name}"
    if fmt.kind in ("float", "mx") and fmt.bits == 8 and fmt.element != "int8":  # (only the 8-bit floats have
        bad = nonfinite_codes(torch.arange(256, dtype=torch.uint8), fmt.element)  # NaN / inf codes; nvfp4 is 4-bit)
        if bool(byte_histogram(q.codes)[bad].any()):
            return f"codes outside the finite range of {fmt.element}"
    return None
