"""1-bit weights on the int8 GEMMs: an `int1` weight (sign codes, one scale per output channel) with int8 dynamic or
static activations is the W8A8 product of the activation codes with the +-1 matrix.

y[m, n] = s_x[m] * s_w[n] * sum_k (u[m, k] - z[m]) * b[n, k] with b in {-1, +1}: the same int32 accumulation as an
int8 per-channel layer whose codes are all +-1. Two paths compute it (paths.py chooses among those correct here):

- `native-int1`: the native W8A8 kernel (native.py, every instruction set: u8s8 with VNNI, s16s8 without) fed the
  +-1 matrix as int8 codes;
- `int1_mm`: torch._int_mm (oneDNN) on (u - 128) in int8, then the zero-point correction with the row sums of b.
  Only where oneDNN runs VNNI (cpu.onednn_exact, and the int_mm probe): without it, oneDNN's int8 GEMM is a slow
  fallback (measured ~0.01x fp32 on AVX2).

Both keep the +-1 matrix unpacked from the sign bits while cached (1 byte per weight, as int_mm's int8 copy; the
stored codes stay 1 bit). Group-wise int1 scales vary along K, which one GEMM cannot apply: those layers take the
reference path.
"""
from __future__ import annotations

import torch

from ...formats import codes_grid
from . import build, native


def applies(fmt, act) -> bool:
    return fmt.kind == "binary" and fmt.granularity == "channel" and act is not None and act.name == "int8"


def signs(layer) -> torch.Tensor:
    """The +-1 matrix [n, k] int8 (code 1 -> +1, code 0 -> -1)."""
    n, k = layer.weight_shape
    return codes_grid(layer.qweight).view(n, k).to(torch.int8) * 2 - 1


def native_ok(layer, cpu) -> bool:
    if cpu.isa == "none" or layer.weight_shape[1] >= 65536:  # exact int32 sums of uint8 x int8 products
        return False
    lib = build.load()
    return lib is not None and cpu.isa in lib.available()


class NativeInt1(native.NativeLayer):
    """The native W8A8 kernel state over the +-1 matrix (its `linear` is NativeLayer's)."""

    def __init__(self, layer, isa: str):  # not NativeLayer.__init__, which reads int codes: the same state, +-1 codes
        lib = build.load()
        if lib is None:
            raise RuntimeError("native kernels are not built")
        n, k = layer.weight_shape
        b = signs(layer).contiguous()
        codes = b.view(torch.uint8)
        wscale = layer.weight_scale.reshape(n).float().contiguous()
        colsum = b.sum(1, dtype=torch.int32)
        bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        act = layer.act
        mode, s_scale, s_zero = (2, float(layer.input_scale), float(layer.input_zero)) if act.static else (1, 0.0, 0.0)
        self.keep = [t for t in (codes, wscale, colsum, bias) if t is not None]
        self.bias, self.hwc, self.tile_k, self.as_conv = bias, False, k, False
        self.op = lib.Layer(codes.data_ptr(), wscale.data_ptr(), 0, 0, colsum.data_ptr(),
                            0 if bias is None else bias.data_ptr(), n, k, 8, 1, True, mode, s_scale, s_zero, isa)
        self.n, self.k, self.isa = n, k, isa
        vnni = isa in ("avx512_vnni", "avx2_vnni", "scalar")
        self.name = f"native {isa} int1 {'u8s8' if vnni else 's16s8'}"


def prepare_mm(layer):
    """int1_mm's state: (+-1 matrix [k, n] int8, its column sums [n] int32, the per-channel scales [n] fp32)."""
    n, _ = layer.weight_shape
    from .torch_ops import k_by_n

    b = signs(layer)
    return k_by_n(b), b.sum(1, dtype=torch.int32), layer.weight_scale.reshape(n).float()


def run_mm(state, layer, x: torch.Tensor) -> torch.Tensor:
    """y [M, N] (bias added by the caller). The activation codes are rounded as quantize_uint8 rounds them
    (identical codes), written directly as u - 128 in int8; the epilogue scales in place and adds the zero-point
    correction as one outer product: y = s_x s_w (acc + (128 - z) colsum)."""
    from ..activation import dynamic_params

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
