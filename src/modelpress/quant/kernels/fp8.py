"""fp8 weights times fp8 activations ("native-fp8" in paths.py; csrc/fp8.cpp, gemm_impl.h fp8_f32).

Every fp8 value (E4M3 or E5M2) is a normal bf16 number, and the product of two of them is exact in fp32. So the
layer keeps a copy of its weight's fp8 values as bf16 (2 bytes per weight, tiles of 32 outputs with pairs of k
interleaved), the input is fake-quantized to fp8 with one scale per tensor exactly
as on the reference path, and the kernel sums the products of the fp8 values in fp32; the two scales multiply the
sums. The result differs from the reference path's (the scaled values, each rounded to fp32, multiplied in fp32) by
fp32 roundings only (for a bf16 input, the reference quantizes and multiplies in bf16; the kernel in fp32, its
output then rounded to bf16). Two products:

- bf16 (CPUs with AVX512-BF16 and an AVX-512 build in use): `vdpbf16ps`, two products per lane and instruction;
- fp32 (every other build, the portable one included): the copy's values widened to fp32 in registers (a shift or a
  mask), the input's as fp32, one FMA per product, outputs along the vector. No faster than a good fp32 matrix product per multiply, but one native call with the
  input's quantization inside, where small layers otherwise pay float's per-call cost plus a quantization pass.

Linear layers and 2-D convolutions with groups 1 (NCHW input: the input quantized channels-last, each output pixel's
window gathered as a row, the product transposed back to NCHW). Memory mode: copies of up to MEMORY_BYTES.

Linear layers on CPUs that multiply bf16 in hardware also have "fp8-tiles" (Fp8Tiles): no copy, the codes decoded per
call, torch's bf16 product (AMX), within bf16 rounding of the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import build, native

FORMATS = ("fp8_e4m3", "fp8_e5m2")
MEMORY_BYTES = 2 << 20  # memory mode: layers whose copy takes up to this much (1M weights)


def supported(layer) -> bool:
    """Formats and shapes the kernel computes (whatever the CPU): fp8 weights with one scale per output or per tensor,
    fp8 activations; Linear, or Conv2d with groups 1 and zero padding given as numbers."""
    fmt, act = layer.weight_format, layer.act
    if fmt.kind != "float" or fmt.name not in FORMATS or fmt.granularity not in ("channel", "tensor"):
        return False
    if act is None or act.name not in FORMATS or "weight_mask" in layer._buffers:
        return False
    if hasattr(layer, "kernel_size"):
        return (len(layer.kernel_size) == 2 and layer.groups == 1 and layer.padding_mode == "zeros"
                and not isinstance(layer.padding, str))
    return True


def bf16(cpu) -> bool:
    """The bf16 product: an AVX-512 build in use on a CPU with AVX512-BF16."""
    lib = build.load()
    return lib is not None and cpu.isa in ("avx512_vnni", "avx512") and lib.fp8_bf16()


def applies(layer, cpu, speed: bool) -> bool:
    """On this CPU (any native build) and in this mode (memory mode: small layers only)."""
    if cpu.isa == "none" or not supported(layer):
        return False
    if not speed and extra_bytes(layer) > MEMORY_BYTES:
        return False
    lib = build.load()
    return lib is not None and cpu.isa in lib.available()


def _tiles(w: torch.Tensor) -> torch.Tensor:
    """[N, K] int16 -> [ceil(N / 32), ceil(K / 2), 32, 2]: tiles of 32 columns, each read front to back by the kernel
    (pairs of k interleaved; zeros beyond N and K)."""
    n, k = w.shape
    kq, np_ = -(-k // 2), -(-n // 32) * 32
    return F.pad(w, (0, 2 * kq - k, 0, np_ - n)).view(np_ // 32, 32, kq, 2).permute(0, 2, 1, 3).contiguous()


def _pad32(v: torch.Tensor) -> torch.Tensor:
    return F.pad(v, (0, -(-v.numel() // 32) * 32 - v.numel())).contiguous()


def _weight_scales(q, n: int) -> torch.Tensor:
    """The weight's scale per output, fp32 [n] (one per tensor expanded)."""
    return q.scale.float().reshape(-1).expand(n) if q.scale.numel() == 1 else q.scale.float().reshape(n)


def _act_params(layer) -> tuple[bool, float]:
    """(E5M2 activations, the static activation scale or -1 for a dynamic one), as the native calls take them."""
    act = layer.act
    return act.name == "fp8_e5m2", float(layer.input_scale) if act.static else -1.0


class Fp8State:
    """The kernel's copy of a layer's weight (its fp8 values as bf16 pairs, rows in (ky, kx, c) order for a
    convolution), its scales and bias."""

    def __init__(self, layer, cpu, isa: str | None = None, use_bf16: bool | None = None):
        from ...formats.floats import decode_float
        from ...formats.qtensor import codes_grid

        q, fmt = layer.qweight, layer.weight_format
        n = layer.weight_shape[0]
        vals = decode_float(codes_grid(q).reshape(n, -1), fmt.name)[:, : math.prod(layer.weight_shape[1:])]
        if hasattr(layer, "kernel_size"):  # (ky, kx, c): the order the channels-last windows are gathered in
            vals = vals.reshape(layer.weight_shape).permute(0, 2, 3, 1).reshape(n, -1)
        # the bf16 product where the CPU has it, else the fp32 one on the same copy (isa / use_bf16: tests choose)
        self.bf16 = bf16(cpu) if use_bf16 is None else use_bf16
        # the upper half of each fp32 pattern: exact, fp8 values are bf16 numbers
        self.w = _tiles(vals.contiguous().view(torch.int32).bitwise_right_shift(16).to(torch.int16))
        self.wscale = _pad32(_weight_scales(q, n))
        self.bias = None if layer.bias is None else _pad32(layer.bias.detach().float())
        e5m2, s_static = _act_params(layer)
        self.op = build.load().Fp8Layer(self.w.data_ptr(), self.wscale.data_ptr(),
                                        0 if self.bias is None else self.bias.data_ptr(), n, vals.shape[1],
                                        e5m2, s_static, isa or cpu.isa, self.bf16)

    def run(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """The output in x's dtype, or None where the kernel declines (NaN / Inf in x)."""
        xf = x if x.dtype == torch.float32 else x.float()
        if hasattr(layer, "kernel_size"):
            if xf.dim() != 4:
                return None
            ho, wo = (native.out_size(xf.shape[2 + i], layer.kernel_size[i], layer.stride[i], layer.padding[i],
                                      layer.dilation[i]) for i in range(2))
            if ho <= 0 or wo <= 0:  # (the reference path raises torch's error)
                return None
            geo = [*layer.kernel_size, *layer.stride, *layer.padding, *layer.dilation, ho, wo]
            y = self.op.conv_t(xf.contiguous(), geo)
        else:
            y = self.op.linear_t(xf.contiguous())
        return y if y is None or y.dtype == x.dtype else y.to(x.dtype)


class Fp8Tiles:
    """"fp8-tiles": Linear layers on CPUs that multiply bf16 in hardware (AMX, AVX512-BF16), keeping no copy: at each
    call the weight's fp8 codes are decoded natively into a bf16 temporary (exact: fp8 values are bf16 numbers), the
    input is quantized natively to its fp8 values with the reference's per-tensor scale (exact in bf16 too), torch's
    bf16 product (oneDNN: AMX) sums the exact products in fp32 and rounds the sums to bf16, and the two scales and the
    bias are applied in fp32. Timed in both modes; memory mode's path at many rows, where native-fp8's copy is not
    allowed or its vdpbf16ps product is slower than AMX. The output differs from the reference by that bf16 rounding
    (as the bf16 tiles of the integer formats)."""

    def __init__(self, layer):
        from ...formats.floats import nonfinite_codes
        from ...formats.qtensor import codes_grid

        q, fmt = layer.qweight, layer.weight_format
        self.n, self.k = layer.weight_shape[0], math.prod(layer.weight_shape[1:])
        self.codes = codes_grid(q).reshape(self.n, -1)[:, : self.k].contiguous()
        self.w_e5m2 = fmt.name == "fp8_e5m2"
        # NaN / Inf codes (a damaged file; quantization never stores them): declined, so that the reference path raises
        # naming them, as every other path does
        bad = nonfinite_codes(self.codes, fmt.name)
        self.ok = bad is None or not bool(bad.any())
        self.wscale = _weight_scales(q, self.n).contiguous()
        self.bias = None if layer.bias is None else layer.bias.detach().float()
        self.e5m2, self.s_static = _act_params(layer)

    def run(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] -> the output in x's dtype, or None where the kernel declines (NaN / Inf in x, damaged codes)."""
        if not self.ok:
            return None
        lib = build.load()
        xf = (x if x.dtype == torch.float32 else x.float()).contiguous()
        m = xf.shape[0]
        xq = torch.empty(m, self.k, dtype=torch.bfloat16)
        s = lib.quant_fp8_bf16(xf.data_ptr(), xq.data_ptr(), m, self.k, self.e5m2, self.s_static) if m else 1.0
        if s < 0:
            return None
        w = torch.empty(self.n, self.k, dtype=torch.bfloat16)
        lib.fp8_codes_bf16(self.codes.data_ptr(), self.n * self.k, self.w_e5m2, w.data_ptr())
        y = torch.mm(xq, w.t()).float().mul_(self.wscale * s)
        if self.bias is not None:
            y.add_(self.bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def tiles_apply(layer, cpu) -> bool:
    """fp8-tiles: fp8 Linears (supported) on CPUs with bf16 hardware and a native build in use."""
    if hasattr(layer, "kernel_size") or not cpu.bf16_fast or cpu.isa == "none" or not supported(layer):
        return False
    lib = build.load()
    return lib is not None and cpu.isa in lib.available()


def extra_bytes(layer) -> int:
    """The copy: 2 bytes per weight of the padded grid (pairs of k, outputs rounded up to 32), and the padded scales
    and bias."""
    n, k = layer.weight_shape[0], math.prod(layer.weight_shape[1:])
    np_ = -(-n // 32) * 32
    return 2 * (2 * -(-k // 2)) * np_ + 4 * np_ * (1 if layer.bias is None else 2)
