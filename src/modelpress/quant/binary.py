"""1-bit weights on the int8 GEMM: an `int1` weight (sign codes, one scale per output channel) with int8 dynamic or
static activations is computed as an integer product of the activation codes with the +-1 matrix.

y[m, n] = s_x[m] * s_w[n] * sum_k (u[m, k] - z[m]) * b[n, k] with b in {-1, +1}: the same int32 accumulation as the
int8 `int_mm` kernel (torch._int_mm on (u - 128) in int8, then the zero-point correction with the row sums of b),
with fewer passes over the activations and outputs around it. The layout is the +-1 matrix unpacked once from the
packed sign bits (1 byte per weight while cached, as int_mm's int8 copy; the stored codes stay 1 bit).
Group-wise int1 scales vary along K, which one GEMM cannot apply: those layers take the reference path.
"""
from __future__ import annotations

import torch

from ..formats import codes_grid


def applies(fmt, act) -> bool:
    return (fmt.kind == "binary" and fmt.granularity == "channel" and act is not None and act.name == "int8")


def prepare(layer):
    """(+-1 matrix [k, n] int8, its column sums [n] int32, the per-channel scales [n] fp32)."""
    n, k = layer.weight_shape
    signs = (codes_grid(layer.qweight).view(n, k).to(torch.int8) * 2 - 1)  # code 1 -> +1, 0 -> -1
    return signs.t().contiguous(), signs.sum(1, dtype=torch.int32), layer.weight_scale.reshape(n).float()


def run(state, layer, x: torch.Tensor) -> torch.Tensor:
    """y [M, N] (bias added by the caller). The activation codes are rounded as quantize_uint8 rounds them
    (identical codes), written directly as u - 128 in int8; the epilogue scales in place and adds the zero-point
    correction as one outer product: y = s_x s_w (acc + (128 - z) colsum)."""
    from .activation import dynamic_params

    signs_t, colsum, sw = state
    if layer.act.static:
        scale, zero = layer.input_scale.reshape(1, 1), layer.input_zero.reshape(1, 1)
    else:
        scale, zero = dynamic_params(x, per_token=True)  # [m, 1]
    m = x.shape[0]
    xs = torch.clamp(torch.round(x.float() / scale) + (zero - 128), -128, 127).to(torch.int8)
    if m <= 16:  # oneDNN's _int_mm wants more than 16 rows
        xs = torch.cat([xs, xs.new_zeros(17 - m, xs.shape[1])])
    y = torch._int_mm(xs, signs_t)[:m].float()  # sum_k (u - 128) b
    y.mul_(scale.expand(m, 1)).mul_(sw)
    return y.addr_(((128 - zero) * scale).expand(m, 1).reshape(-1), colsum.float() * sw)
