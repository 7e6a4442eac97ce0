"""CPU kernel dispatch for QuantLinear. Every kernel computes what the reference path computes (dequantize
the weight, fake-quantize the input, matmul) up to float rounding; tests/quant/test_kernels.py checks each.

| weights             | activations        | kernel                                        |
| int8 per channel    | none               | aten._weight_int8pack_mm (bf16 inside), K % 16 == 0 |
| int4 groups 32..256 | none               | aten._weight_int4pack_mm_for_cpu (bf16 inside) |
| int8 per channel    | int8 dynamic, M=1  | quantized::linear_dynamic (fbgemm)            |
| int8 per channel    | int8 (M>1, static) | torch._int_mm (oneDNN), exact int32 accumulation |
| int1 per channel    | int8 (any M)       | torch._int_mm on the +-1 matrix (binary.py)     |
Decode (M=1) with dynamic int8 uses fbgemm: per-tensor and per-token quantization coincide for one row and
it was ~3x faster than _int_mm there (benchmarks/kernels.py). Layouts are built on first use and cached.
"""
from __future__ import annotations

import warnings

import torch

from ..formats import codes_grid, signed
from . import binary
from .activation import dynamic_params, quantize_uint8

INT4_GROUPS = (32, 64, 128, 256)


def _int8_channel(fmt) -> bool:
    return fmt.kind == "int" and fmt.bits == 8 and fmt.symmetric and fmt.granularity == "channel"


def select(layer, x: torch.Tensor) -> str | None:
    """Name of the kernel for this layer and 2-D input, or None for the reference path."""
    if torch.compiler.is_compiling():  # torch.export / torch.compile trace the reference path: no data pointers,
        return None  # no cached layouts, and a graph other runtimes can read
    if not layer.use_kernels or x.device.type != "cpu" or not torch.is_floating_point(x):
        return None
    fmt, act = layer.weight_format, layer.act
    n, k = layer.weight_shape
    if act is None:
        if _int8_channel(fmt) and k % 16 == 0:  # the AVX-512 kernel steps K by 16 with no tail (garbage / crash)
            return "int8pack"
        if (fmt.kind == "int" and fmt.bits == 4 and fmt.granularity == "group" and fmt.group_size in INT4_GROUPS
                and k % fmt.group_size == 0 and n % 16 == 0):
            return "int4pack"
        return None
    if act.name == "int8" and _int8_channel(fmt):
        if not act.static and x.shape[0] == 1:
            return "linear_dynamic"
        return "int_mm"
    if binary.applies(fmt, act):
        return "int1_mm"
    return None


def run(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """y [M, N] in x's dtype, bias included."""
    cache = layer._kernel_cache
    if name not in cache:
        cache[name] = _PREPARE[name](layer)
    y = _RUN[name](cache[name], layer, x)
    if layer.bias is not None and name != "linear_dynamic":
        y = y + layer.bias.to(y.dtype)
    return y.to(x.dtype)


def _prep_int8pack(layer):
    n, k = layer.weight_shape
    return layer.weight_codes.view(torch.int8).view(n, k), layer.weight_scale.reshape(n).to(torch.bfloat16)


def _run_int8pack(c, layer, x):
    w, s = c
    xb = x.to(torch.bfloat16)
    if not xb.is_contiguous() or xb.data_ptr() % 64:  # the kernel does aligned loads of x's rows: it crashes on a
        xb = xb.clone(memory_format=torch.contiguous_format)  # view that starts off a 32-byte boundary
    return torch.ops.aten._weight_int8pack_mm(xb, w, s)


def _prep_int4pack(layer):
    q = layer.qweight
    n, k = q.shape
    g = q.fmt.group_size
    u = codes_grid(q).view(n, k).to(torch.int32)
    scale = q.scale.float()  # [n, k/g]
    if q.fmt.symmetric:  # w = c * s, c = u - 8 in offset binary
        u = signed(u, 4) + 8
        zero = torch.zeros_like(scale)
    else:  # w = (u - z) * s = (u - 8) * s + (8 - z) * s
        zero = (8 - q.zero.float()) * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    sz = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()  # [k/g, n, 2]
    return packed, g, sz


def _run_int4pack(c, layer, x):
    packed, g, sz = c
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed, g, sz)


def _prep_linear_dynamic(layer):
    n, k = layer.weight_shape
    w = layer.weight_codes.view(torch.int8).view(n, k)
    s = layer.weight_scale.reshape(n).double()
    with warnings.catch_warnings():  # torch warns that the quantized-tensor API is deprecated; it is fbgemm's input
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(w, s, torch.zeros(n, dtype=torch.long), 0)
    bias = None if layer.bias is None else layer.bias.detach().float()
    return torch.ops.quantized.linear_prepack(qw, bias)


def _run_linear_dynamic(packed, layer, x):
    return torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, False)


def _prep_int_mm(layer):
    n, k = layer.weight_shape
    w = layer.weight_codes.view(torch.int8).view(n, k)
    return w.t().contiguous(), w.sum(1, dtype=torch.int32), layer.weight_scale.reshape(n).float()  # [k, n], [n], [n]


def _run_int_mm(c, layer, x):
    wt, colsum, sw = c
    if layer.act.static:
        scale, zero = layer.input_scale, layer.input_zero
    else:
        scale, zero = dynamic_params(x, per_token=True)  # [m, 1]
    xq = quantize_uint8(x, scale, zero)
    xs = (xq.to(torch.int16) - 128).to(torch.int8)  # u - 128 fits int8
    m = x.shape[0]
    if m <= 16:  # oneDNN's _int_mm wants more than 16 rows
        xs = torch.cat([xs, xs.new_zeros(17 - m, xs.shape[1])])
    acc = torch._int_mm(xs, wt)[:m]  # [m, n] int32: sum_k (u - 128) w
    acc = acc + (128 - zero.to(torch.int32)).reshape(-1, 1) * colsum  # + (128 - z) sum_k w  == sum_k (u - z) w
    return acc.float() * (scale.reshape(-1, 1) * sw)


_PREPARE = {"int8pack": _prep_int8pack, "int4pack": _prep_int4pack, "linear_dynamic": _prep_linear_dynamic,
            "int_mm": _prep_int_mm, "int1_mm": binary.prepare}
_RUN = {"int8pack": _run_int8pack, "int4pack": _run_int4pack, "linear_dynamic": _run_linear_dynamic,
        "int_mm": _run_int_mm, "int1_mm": binary.run}
