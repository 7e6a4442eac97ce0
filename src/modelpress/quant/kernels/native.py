"""The native kernels (csrc/) as paths of QuantLinear and QuantConv1d/2d.

| weights                               | activations          | product (per instruction set)                    |
| int8 per channel, symmetric           | none                 | int16 activations x int8, exact int32 lanes;     |
|                                       |                      | or (VNNI, "native-planes") as two uint8 planes   |
| int4 groups (multiple of 16) / channel | none                | int16 activations x 4-bit codes, per-group scale;
|                                       |                      | or (VNNI, "native-planes") as two int8 planes    |
| int8 per channel, symmetric           | int8 dynamic/static  | VNNI: uint8 x int8 (vpdpbusd); else (u - z) int16 x int8 |
| FP4 E2M1 groups (MXFP4, NVFP4, fp4)   | none                 | int16 activations x 2 x the code's value (a 16-entry     |
|                                       |                      | table, pshufb), per-group scale halved                   |

Convolutions run a broadcast-style product on pixels packed per sample (NCHW output written directly); they keep a
padded int8 and int16 copy of their (small) filters (8-bit weights) or an int16 copy of code - zero with fp32 group
scales (4-bit weights: each group's exact int32 sum is scaled and summed in fp32), rows in (ky, kx, c) order for 2-D
kernels with one scale per row so that each pixel's row is a few channels-last copies.

Weight-only paths quantize each activation row to 14-bit integers (scale max|x| / 8128): relative error below
1e-4 of the row's largest value, far inside the bf16 rounding of torch's own kernels. The int8-activation paths
quantize exactly as the reference path does (same per-token uint8 codes), so they match it to float rounding.
The kernels read the stored codes as they are: no repacked copy of the weight is made (only fp32 group scales,
zero points and int32 column sums, a few bytes per row); a pruned (sparse) weight is the exception, its codes
are scattered once into a dense copy. A row with NaN or Inf makes the call return None: the
caller then runs the reference path, which propagates them as float does; so does a row holding a value of |x| >=
HUGE_ABS (1e30), whose integer sums' scaling could overflow where float's does not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import build
from .cpu import X86_ISAS

_ACT = {None: 0, "dynamic": 1, "static": 2}
# decoded weight per tile: 1 MB of bf16 (oneDNN: the same speed from 1 to 16 MB), 4 MB of fp32 (MKL's product on
# taller tiles: 8 x Linear(4096, 4096) at M=256, one thread, AMD EPYC: 85.5 ms at 1 MB, 80.9 at 4 MB, fp32 79.8)
TILE_BYTES = {torch.bfloat16: 1 << 20, torch.float32: 4 << 20}
# 4-bit Linears off the chunk layout run as 1 x 1 convolutions up to this many weights: that product keeps an int16
# copy (2 bytes per weight) and reads all of it for every row
AS_CONV_MAX = 1 << 20
NARROW_MAX = 1 << 20  # int8 Linears up to this many weights keep an interleaved copy for the narrow products
NARROW_CONV_K = 64  # 8-bit 3 x 3 (and larger) convolutions with rows of at least this many values: narrow products
NARROW16_K = 512  # the int16 one for rows of up to this many values (longer: the tiles were as fast, AVX2 and AVX-512)


def _chunk_ok(isa: str, gsize: int) -> bool:
    return gsize % 2 == 0 if isa == "scalar" else gsize % 16 == 0  # x86: steps of 16, 32 or 64 values


def supports(layer, isa: str, conv: bool = False) -> bool:
    """Whether a native kernel computes this layer's format (on build `isa`)."""
    if isa == "none":
        return False
    fmt, act = layer.weight_format, layer.act
    n, k = layer.weight_shape[0], math.prod(layer.weight_shape[1:])
    if n == 0 or k == 0 or not (fmt.kind == "int" or is_fp4(fmt)):  # FP4: 4-bit codes through a table, as int4
        return False
    if is_fp4(fmt) and k > 16384:
        return False
    if act is not None:
        if act.name != "int8" or not (fmt.bits == 8 and fmt.symmetric and fmt.granularity == "channel"):
            return False
        return k < 65536  # exact int32 sums of uint8 x int8 products
    if fmt.bits == 8:
        return fmt.symmetric and fmt.granularity == "channel"
    if fmt.bits == 4:
        if not conv and _chunks_ok(layer, isa):  # the matrix kernels
            return True
        if not conv and n * k > AS_CONV_MAX:  # off the chunk layout and too large for a kept int16 copy: decoded
            return False
        groups, gsize = _grid(layer)  # broadcast product on int16 rows: one group per row, or groups of an even size
        return fmt.granularity in ("group", "channel") and k <= 16384 and (groups == 1 or gsize % 2 == 0)
    return False


def as_conv(layer, isa: str) -> bool:
    """A 4-bit Linear the native kernel runs as a 1 x 1 convolution (its rows do not fit the chunk layout; small
    layers only: larger ones decode per call instead)."""
    return layer.weight_format.bits == 4 and not hasattr(layer, "kernel_size") and not _chunks_ok(layer, isa)


def _narrow_width(layer, isa: str) -> int:
    """Bytes per weight of the interleaved copy the narrow products read for this layer's formats on this build, or 0:
    int8 activations with VNNI, the uint8 product (an int8 copy, 4 values of k together); weight-only or int8
    activations without VNNI, the int16 product (an int16 copy, 2 values of k together; 4-bit weights as their
    integers, with a scale per group of an even size). x86 builds, layers of up to NARROW_MAX weights."""
    fmt = layer.weight_format
    if fmt.bits not in (4, 8) or isa not in X86_ISAS or math.prod(layer.weight_shape) > NARROW_MAX:
        return 0
    if fmt.bits == 4:
        groups, gsize = _grid(layer)
        return 2 if (groups == 1 or gsize % 2 == 0) and (fmt.kind == "int" or is_fp4(fmt)) else 0
    return 1 if layer.act is not None and isa in ("avx512_vnni", "avx2_vnni") else 2


def narrow(layer, isa: str) -> int:
    """Bytes per weight of the interleaved copy a Linear keeps for the narrow products (csrc gemm_impl.h: outputs
    along the vector, from 16 rows on), or 0 (_narrow_width; the int16 product only for rows of up to NARROW16_K
    values)."""
    width = 0 if hasattr(layer, "kernel_size") else _narrow_width(layer, isa)
    return width if width == 1 or layer.weight_shape[-1] <= NARROW16_K else 0


def narrow_conv(layer, isa: str) -> int:
    """Bytes per weight of the interleaved copy a 2-D convolution (groups 1, kernel larger than 1 x 1) keeps for the
    narrow products (pixels as rows, output channels along the vector; csrc bind.cpp conv_narrow) instead of the
    broadcast product's copies, or 0 (_narrow_width). Rows of fewer than NARROW_CONV_K values (a stem over one or a
    few channels) keep the broadcast product, faster there."""
    shape = layer.weight_shape
    if (not hasattr(layer, "kernel_size") or len(shape) != 4 or layer.groups != 1 or tuple(shape[2:]) == (1, 1)
            or math.prod(shape[1:]) < NARROW_CONV_K):
        return 0
    return _narrow_width(layer, isa)


def _interleave(w: torch.Tensor, j: int) -> torch.Tensor:
    """[N, K] -> [ceil(K / j), N rounded up to 16, j]: element [q, n, i] = w[n, j q + i] (zeros beyond)."""
    n, k = w.shape
    kq, np_ = -(-k // j), -(-n // 16) * 16
    return F.pad(w, (0, j * kq - k, 0, np_ - n)).view(np_, kq, j).permute(1, 0, 2).contiguous()


def _chunks_ok(layer, isa: str) -> bool:
    """A 4-bit Linear's rows fit the u4 chunk layout of the matrix kernels (else it runs the convolutions' product)."""
    fmt, k = layer.weight_format, math.prod(layer.weight_shape[1:])
    if fmt.granularity == "group":
        return _chunk_ok(isa, min(fmt.group_size, k))
    return fmt.granularity == "channel" and _chunk_ok(isa, k) and k <= 16384


def is_fp4(fmt) -> bool:
    """Formats whose 4-bit codes are FP4 E2M1 values: twice each is an integer in [-12, 12], so they run the 4-bit
    integer products through a 16-entry table (s16l4), with the group scale halved."""
    return fmt.kind in ("mx", "nvfp4", "float") and fmt.element == "fp4_e2m1" and fmt.granularity == "group"


def _fp4_table(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(table int8 [16]: 2 x the E2M1 value of each code, group scales fp32 [N, G] halved): the reference's
    value x scale, exactly (the halving and doubling are exact in fp32)."""
    from ...formats.floats import decode_float

    q, fmt = layer.qweight, layer.weight_format
    table = decode_float(torch.arange(16, dtype=torch.uint8), "fp4_e2m1") * 2
    if fmt.kind == "mx":
        s = torch.exp2(q.scale.float() - 127)
    elif fmt.kind == "nvfp4":
        s = decode_float(q.scale, "fp8_e4m3") * q.global_scale.float()
    else:
        s = q.scale.float()
    return table.to(torch.int8), (s * 0.5).reshape(layer.weight_shape[0], -1).contiguous()


def _grid(layer) -> tuple[int, int]:
    """(groups, group size) of a 4-bit layer's rows."""
    fmt, k = layer.weight_format, math.prod(layer.weight_shape[1:])
    gsize = min(fmt.group_size, k) if fmt.granularity == "group" else k
    return -(-k // gsize), gsize


HUGE_ABS = 1e30  # csrc bind.cpp kHugeAbs: rows with a larger |x| are declined (reference path)


def planes_ok(layer, isa: str) -> bool:
    """Weight-only integer layers the planes product computes (VNNI only; csrc gemm_impl.h): int8 rows (tile_p8s8), or
    4-bit ones (P8U4) in groups of a multiple of 128 (AVX-512 VNNI) or 64 (AVX-VNNI)."""
    fmt = layer.weight_format
    if isa not in ("avx512_vnni", "avx2_vnni") or fmt.kind != "int" or fmt.bits not in (4, 8) or layer.act is not None:
        return False
    return fmt.bits == 8 or _grid(layer)[1] % (128 if isa == "avx512_vnni" else 64) == 0


def product(layer, isa: str, planes: bool = False) -> str:
    """The integer product a native layer runs: u8s8 (VNNI, int8 activations), p8u4 / p8s8 (4-bit / 8-bit, planes),
    s16u4, s16s8."""
    if layer.act is not None and isa in ("avx512_vnni", "avx2_vnni", "scalar"):
        return "u8s8"
    if layer.weight_format.bits == 4:
        return "s16l4" if is_fp4(layer.weight_format) else "p8u4" if planes else "s16u4"
    return "p8s8" if planes else "s16s8"


def _int_rows(layer, hwc: bool, table: torch.Tensor | None = None) -> torch.Tensor:
    """A 4-bit layer's weight as integers (code - zero, or table[code] for FP4: _fp4_table), int16 [N, K]; rows in
    (ky, kx, c) order when `hwc`."""
    from ...formats.qtensor import codes_grid, signed

    q, fmt = layer.qweight, layer.weight_format
    u = codes_grid(q)  # [N, groups, group]
    if table is not None:
        w = table.to(torch.int32)[u.long()]
    else:
        w = signed(u, 4) if fmt.symmetric else u.to(torch.int32) - q.zero.unsqueeze(-1).to(torch.int32)
    n, k = layer.weight_shape[0], math.prod(layer.weight_shape[1:])
    w = w.reshape(n, -1)[:, :k].to(torch.int16)
    return w.view(layer.weight_shape).permute(0, 2, 3, 1).reshape(n, k) if hwc else w


def bf16_supported(layer) -> bool:
    """bf16 / fp32 tiles: 8-bit integer rows, or 4-bit rows (integers, FP4) in groups of a multiple of 16 values (the
    decoder's step: csrc gemm_impl.h deq_rows)."""
    if not (layer.weight_format.kind == "int" or is_fp4(layer.weight_format)):
        return False
    if layer.weight_format.bits == 8:
        return True
    return _grid(layer)[1] % 16 == 0


class NativeLayer:
    """Kernel state built from a layer's buffers (they are referenced, not copied)."""

    def __init__(self, layer, isa: str, conv: bool = False, planes: bool = True, narrow_copy: bool = True):
        lib = build.load()
        if lib is None:
            raise RuntimeError("native kernels are not built")
        fmt, act = layer.weight_format, layer.act
        # a 4-bit Linear whose rows do not fit the chunk layout: the convolutions' product, as a 1 x 1 convolution
        self.as_conv = not conv and as_conv(layer, isa)
        conv = conv or self.as_conv
        n, k = layer.weight_shape[0], math.prod(layer.weight_shape[1:])
        codes = layer.weight_codes
        if "weight_mask" in layer._buffers:  # a pruned weight: the kernels read a dense copy of its codes
            from ...formats.sparse import dense_codes

            codes = dense_codes(layer.qweight)
        scale = layer.weight_scale
        groups, gsize = _grid(layer) if fmt.bits == 4 else (1, 1)
        self.hwc = conv and groups == 1 and len(layer.weight_shape) == 4 and layer.weight_shape[2:] != (1, 1)
        if self.hwc and fmt.bits == 8:  # 2-D convolutions: rows reordered (ky, kx, c) for a channels-last gather
            codes = codes.view(torch.int8).view(layer.weight_shape).permute(0, 2, 3, 1).contiguous().view(torch.uint8)
        self.keep = [codes]
        wscale = gscale = gzero = colsum = None
        if fmt.bits == 8:
            wscale = scale.reshape(n).float().contiguous()
            if act is not None or (planes and not conv and planes_ok(layer, isa)):  # (the planes' correction too)
                colsum = codes.reshape(-1).view(torch.int8).view(n, k).sum(1, dtype=torch.int32)
        table = None
        if fmt.bits == 4:
            if is_fp4(fmt):
                table, gscale = _fp4_table(layer)
                planes = False
            else:
                gscale = scale.float().reshape(n, groups).contiguous()
            if not fmt.symmetric:
                gzero = layer.weight_zero.reshape(n, groups).contiguous()
        bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        s_scale = s_zero = 0.0
        mode = 0
        if act is not None:
            mode = 2 if act.static else 1
            if act.static:
                s_scale, s_zero = float(layer.input_scale), float(layer.input_zero)
        self.keep += [t for t in (wscale, gscale, gzero, colsum, bias, table) if t is not None]
        self.bias = bias
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        self.op = lib.Layer(ptr(codes), ptr(wscale), ptr(gscale), ptr(gzero), ptr(colsum), ptr(bias), n, k, fmt.bits,
                            gsize, fmt.symmetric, mode, s_scale, s_zero, isa, planes, conv)
        if table is not None:
            self.op.set_lut(table.data_ptr())
        self.narrow = False  # a narrow product from 16 rows on (an interleaved copy of the weight kept)
        # (as_conv: narrow rows from 16 on; narrow_copy False: the states of the other native paths, which never
        # run the narrow product and keep no copy for it)
        width = 0 if not narrow_copy else narrow_conv(layer, isa) if conv and not self.as_conv else narrow(layer, isa)
        if width and fmt.bits == 4:  # the integers and the group scales [G, N rounded up to 16]
            wp = _interleave(_int_rows(layer, self.hwc, table), 2)  # (the order the activation rows are gathered in)
            gsp = F.pad(gscale.t(), (0, wp.shape[1] - n)).contiguous()
            self.narrow = self.op.set_narrow16_groups(wp.data_ptr(), gsp.data_ptr())
            if self.narrow:
                self.keep += [wp, gsp]
        elif width:
            w8 = codes.reshape(-1).view(torch.int8).view(n, k)
            wp = _interleave(w8, 4) if width == 1 else _interleave(w8.to(torch.int16), 2)
            self.narrow = (self.op.set_narrow if width == 1 else self.op.set_narrow16)(wp.data_ptr())
            if self.narrow:
                self.keep.append(wp)
        kp = -(-k // 4) * 4
        if conv and not self.as_conv and self.narrow:  # a convolution with narrow products keeps no other copy
            pass
        elif conv and fmt.bits == 8:  # broadcast-style convolution: rows padded to a multiple of 4, int8 and int16
            w8 = F.pad(codes.reshape(-1).view(torch.int8).view(n, k), (0, kp - k)).contiguous()
            w16 = w8.to(torch.int16)
            self.keep += [w8, w16]
            self.op.set_conv_weights(w8.data_ptr(), w16.data_ptr(), kp)
        elif conv:  # 4-bit: the same product on int16 rows (code - zero), a scale per group of k
            w16 = F.pad(_int_rows(layer, self.hwc, table), (0, kp - k)).contiguous()
            self.keep += [w16]
            self.op.set_conv_weights(0, w16.data_ptr(), kp)
            self.op.set_conv_groups(gscale.data_ptr(), groups, gsize)
        self.n, self.k, self.isa = n, k, isa
        # row length of the dequantized tiles: 4-bit rows over their padded grid (csrc: deq_rows), in k order
        self.tile_k = groups * gsize if fmt.bits == 4 else k
        self.name = f"native {isa} {product(layer, isa, self.op.planes)}"

    def linear(self, x2: torch.Tensor) -> torch.Tensor | None:
        x = x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()
        return self.op.linear_t(x.contiguous(), self.as_conv)  # (one native call: the per-call cost of small layers)

    def linear_tiles(self, x2: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Weight-only formats: tiles of weight rows (TILE_BYTES) dequantized to `dtype` (in cache), each multiplied by
        the input in that dtype with torch's matrix product: bf16 (oneDNN: AMX / AVX512-BF16 where the CPU has them;
        bf16 inside, as torch's own int4/int8 kernels) or fp32 (MKL, any CPU: the float layer's own product on
        weights read from cache). One native call (csrc bind.cpp: linear_tiles). The layer keeps no copy of its
        weight; each calling thread keeps one tile buffer for all layers (about TILE_BYTES) until it ends.
        The output is in x's dtype (fp32 for other dtypes), the bias added in it."""
        x = x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()
        return self.op.linear_tiles(x.contiguous(), dtype == torch.bfloat16, TILE_BYTES[dtype])

    def conv(self, x: torch.Tensor, layer) -> torch.Tensor | None:
        """x [B, C, H, W] (Conv2d) or [B, C, L] (Conv1d) -> output of the same rank."""
        one_d = x.dim() == 3
        x4 = x.unsqueeze(2) if one_d else x
        x4 = (x4 if x4.dtype in (torch.float32, torch.bfloat16) else x4.float()).contiguous()
        b, c, h, w = x4.shape
        kh, kw = (1, layer.kernel_size[0]) if one_d else layer.kernel_size
        sh, sw = (1, layer.stride[0]) if one_d else layer.stride
        ph, pw = (0, layer.padding[0]) if one_d else layer.padding
        dh, dw = (1, layer.dilation[0]) if one_d else layer.dilation
        ho, wo = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
        out = torch.empty(b, self.n, ho, wo, dtype=x4.dtype)
        if b and ho > 0 and wo > 0:
            geo = [kh, kw, sh, sw, ph, pw, dh, dw, layer.groups, ho, wo, int(self.hwc)]
            if not self.op.conv(x4.data_ptr(), b, c, h, w, x4.dtype == torch.bfloat16, out.data_ptr(),
                                out.dtype == torch.bfloat16, geo):
                return None
        return out.squeeze(2) if one_d else out


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """A convolution's output length along one axis (input `size`, kernel k, stride s, padding p, dilation d)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_supported(layer) -> bool:
    """Geometries the native convolution handles: zero padding given as numbers, groups that split evenly."""
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return False
    return layer.groups >= 1 and layer.in_channels % layer.groups == 0 and layer.out_channels % layer.groups == 0
