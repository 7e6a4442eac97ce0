"""torch's own CPU kernels as QuantLinear paths. Each computes what the reference path computes (dequantize the
weight, fake-quantize the input, matmul) up to float rounding; tests/quant/test_kernels.py checks each.

| weights             | activations        | kernel                                        |
| int8 per channel    | none               | aten._weight_int8pack_mm (bf16 inside), K % 16 == 0 |
| int4 groups 32..256 | none               | aten._weight_int4pack_mm_for_cpu (bf16 inside) |
| int8 per channel    | int8 dynamic, M=1  | quantized::linear_dynamic (fbgemm)            |
| int8 per channel    | int8 (M>1, static) | torch._int_mm (oneDNN), exact int32 accumulation |
| int1 per channel    | int8 (any M)       | torch._int_mm on the +-1 matrix (int1.py)       |
fbgemm and oneDNN multiply uint8 x int8 exactly only with VNNI (cpu.py); elsewhere they are never used.
"""
from __future__ import annotations

import warnings

import torch

from ...formats import codes_grid, signed
from ..activation import dynamic_params, quantize_uint8
from . import int1

INT4_GROUPS = (32, 64, 128, 256)


def int8_channel(fmt) -> bool:
    return fmt.kind == "int" and fmt.bits == 8 and fmt.symmetric and fmt.granularity == "channel"


def applies(name: str, layer, cpu, m: int) -> bool:
    """Whether torch kernel `name` computes this layer's format, exactly, on this CPU (for M rows)."""
    fmt, act = layer.weight_format, layer.act
    n, k = layer.weight_shape
    if name == "int8pack":  # the AVX-512 kernel steps K by 16 with no tail (garbage / crash)
        return act is None and int8_channel(fmt) and k % 16 == 0
    if name == "int4pack":
        return (act is None and fmt.kind == "int" and fmt.bits == 4 and fmt.granularity == "group"
                and fmt.group_size in INT4_GROUPS and k % fmt.group_size == 0 and n % 16 == 0)
    int8_act = act is not None and act.name == "int8" and int8_channel(fmt)
    if name == "linear_dynamic":  # one row: its per-tensor activation scale is the per-token one
        return int8_act and not act.static and m == 1 and cpu.fbgemm_exact
    if name == "int_mm":
        return int8_act and cpu.onednn_exact
    if name == "int1_mm":  # without VNNI, oneDNN's int8 GEMM is a slow fallback: never chosen there
        return int1.applies(fmt, act) and cpu.onednn_exact
    return False


def run(state, name: str, layer, x: torch.Tensor) -> torch.Tensor | None:
    """y [M, N] in x's dtype, bias included; None when x holds NaN or Inf on an int8-activation kernel (integer
    codes cannot carry them: the caller runs the reference path, which propagates them as float does)."""
    if layer.act is not None and not _finite(x):
        return None
    y = _RUN[name](state, layer, x)
    b = layer._parameters.get("bias")
    if b is not None and name != "linear_dynamic":
        y = y + b.to(y.dtype)
    return y.to(x.dtype)


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.amax() + x.amin())) if x.numel() else True


def prepare(name: str, layer):
    return _PREPARE[name](layer)


def _codes_int8(layer) -> torch.Tensor:
    """[n, k] int8 codes (a sparse weight's pruned positions as 0)."""
    n, k = layer.weight_shape
    return codes_grid(layer.qweight).view(torch.int8).view(n, k)


def _prep_int8pack(layer):
    n, k = layer.weight_shape
    return _codes_int8(layer), layer.weight_scale.reshape(n).to(torch.bfloat16)


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
    w = _codes_int8(layer)
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
    w = _codes_int8(layer)
    return k_by_n(w), w.sum(1, dtype=torch.int32), layer.weight_scale.reshape(n).float()  # [k, n], [n], [n]


def k_by_n(w: torch.Tensor) -> torch.Tensor:
    """w [n, k] as a row-major [k, n] matrix with strides (n, 1) also when k = 1: `w.t().contiguous()` keeps a
    [1, n] view's strides (1, 1) (contiguous for torch: a dimension of size 1 has any stride), which oneDNN's
    integer product (_int_mm) misreads: garbage for Linear(1, n)."""
    out = torch.empty((w.shape[1], w.shape[0]), dtype=w.dtype, device=w.device)
    return out.copy_(w.t())


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
            "int_mm": _prep_int_mm, "int1_mm": int1.prepare_mm}
_RUN = {"int8pack": _run_int8pack, "int4pack": _run_int4pack, "linear_dynamic": _run_linear_dynamic,
        "int_mm": _run_int_mm, "int1_mm": int1.run_mm}
