"""Export shims: stand-ins for quantized layers during ONNX export. Each holds its weights in the layout its
ONNX node reads (built from the packed codes, nothing dequantized to float) and calls the ops of onnx_ops.py.

- QuantLinear, weight-only integers of any width with tensor / channel scales or power-of-two blocks -> MatMulNBits
  (`linear="nbits"`; 4-bit codes up to int4, 8-bit above), else (groups without such a block, `linear="qdq"`) ->
  DequantizeLinear + MatMul;
- QuantLinear, int8 weights + dynamic int8 activations (per token) -> MatMulInteger with per-row quantization;
- static int8 activations -> QuantizeLinear/DequantizeLinear with the calibrated range (QDQ);
- QuantConv1d/2d -> DequantizeLinear weights (+ QDQ / per-sample activations) + Conv;
- QuantEmbedding -> DequantizeLinear table + Gather.
Integer-valued formats only (int2..int8, int1, ternary); the rest is refused, naming the layer and format.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...formats import codes_grid, grid, signed
from ...quant import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, QuantMixin
from ...quant.conv import _CONV_ATTRS
from .onnx_ops import dequantize, int8_matmul_rows, matmul_nbits, qdq_rows, qdq_static

NBITS_BLOCKS = (16, 32, 64, 128, 256)


class NotExportable(ValueError):
    """A layer that has no ONNX form here."""


def refuse(name: str, m: QuantMixin, why: str) -> None:
    raise NotExportable(f"layer {name!r} ({type(m).__qualname__}, weights {m.weight_format}"
                        f"{'' if m.act is None else ', activations ' + str(m.act)}) cannot be exported to ONNX: {why}")


def int_codes(name: str, m: QuantMixin) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """(codes [rows, cols] int8 — or uint8 when there is a zero point —, zero [rows, G] uint8 or None,
    scale [rows, G] float32 or [] per tensor, group) of an integer-valued weight, without grid padding."""
    q = m.qweight
    fmt = q.fmt
    if fmt.kind not in ("int", "binary", "ternary"):
        refuse(name, m, "ONNX export holds integer-valued formats (int2..int8, int1, ternary)")
    rows, groups, g = grid(fmt, q.shape)
    n = q.shape[0]
    cols = math.prod(q.shape) // n
    u = codes_grid(q).reshape(-1)[: n * cols] if fmt.granularity == "tensor" else codes_grid(q).reshape(rows, -1)[:, :cols]
    u = u.reshape(n, cols)
    zero = None
    if fmt.kind == "int" and not fmt.symmetric:
        codes, zero = u.clone(), q.zero.clone()
    elif fmt.kind == "int":
        codes = signed(u, fmt.bits).to(torch.int8)
    elif fmt.kind == "binary":
        codes = (u.to(torch.int8) * 2 - 1)
    else:
        codes = signed(u, 2).to(torch.int8)
    scale = q.scale.float()
    if fmt.granularity == "tensor":
        scale = scale.reshape(())
        zero = None if zero is None else zero.reshape(())
    return codes, zero, scale, (cols if fmt.granularity == "channel" else g)


class _Shim(nn.Module):
    def _init_weight(self, m: QuantMixin) -> None:
        """`weight` for model code that reads its dtype or shape (ViT's patch embedding, T5's feed-forward), as on
        the quantized layer. A meta tensor: a real Tensor (T5 checks isinstance) holding no data, and a plain
        attribute, not a parameter or buffer, so the export never writes a dense float copy; computing with it
        fails loudly instead of tracing float weights into the graph."""
        self.weight = torch.empty(m.weight_shape, dtype=m.float_dtype, device="meta")

    def _act(self, x2: torch.Tensor) -> torch.Tensor:
        """Fake-quantized activations (2-D, one row per token / sample)."""
        if self.act is None:
            return x2
        if self.act.static:
            return qdq_static(x2, self.input_scale, self.input_zero_u8)
        return qdq_rows(x2)

    def _init_act(self, name: str, m: QuantMixin) -> None:
        self.act = m.act
        if self.act is not None and self.act.name != "int8":
            refuse(name, m, "ONNX export holds int8 activations (fp8 activations have no ONNX Runtime kernels here)")
        if self.act is not None and self.act.static:
            self.register_buffer("input_scale", m.input_scale.float().reshape(()).clone())
            self.register_buffer("input_zero_u8", m.input_zero.round().to(torch.uint8).reshape(()).clone())

    def _weight(self, shape) -> torch.Tensor:
        """Dequantized weight [rows, cols] via DequantizeLinear (per tensor / channel / block)."""
        axis, block = (0, 0) if self.scale.dim() < 2 or self.scale.shape[1] == 1 else (1, self.group)
        scale = self.scale.reshape(-1) if self.scale.dim() == 2 and block == 0 else self.scale
        zero = None if self.zero is None else (self.zero.reshape(-1) if self.zero.dim() == 2 and block == 0 else self.zero)
        return dequantize(self.codes, scale, zero, axis, block).reshape(shape)


def _nbits_layout(codes, zero, scale, group, bits, k):
    """MatMulNBits buffers from [N, K] codes: (B uint8 [N, blocks, blob], scales [N*blocks], zero points, block)."""
    n = codes.shape[0]
    if scale.shape[1] == 1:  # per channel: any block, the scale repeated
        block = 128 if k >= 128 else 32
    else:
        block = next((b for b in reversed(NBITS_BLOCKS) if group % b == 0), None)
    if block is None:
        return None
    nb = -(-k // block)
    reps = 1 if scale.shape[1] != 1 else nb
    s = scale.repeat_interleave(group // block if scale.shape[1] != 1 else 1, 1).repeat(1, reps)[:, :nb]
    if zero is None:
        u = codes.to(torch.int32) + 2 ** (bits - 1)
        z = None
    else:
        u = codes.to(torch.int32)
        z = zero.to(torch.int32).repeat_interleave(group // block if zero.shape[1] != 1 else 1, 1).repeat(1, reps)[:, :nb]
    pad = nb * block - k
    fill = 2 ** (bits - 1) if z is None else 0
    u = F.pad(u, (0, pad), value=fill).to(torch.uint8)
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
        if z is not None:
            z = F.pad(z, (0, nb % 2)).to(torch.uint8)
            z = z[:, 0::2] | (z[:, 1::2] << 4)
    b = u.reshape(n, nb, -1).contiguous()
    return b, s.reshape(-1).contiguous(), None if z is None else z.to(torch.uint8).reshape(-1).contiguous(), block


class LinearShim(_Shim):
    def __init__(self, name: str, m: QuantLinear, linear: str = "nbits"):
        super().__init__()
        self.in_features, self.out_features = m.in_features, m.out_features
        self._init_weight(m)
        self._init_act(name, m)
        codes, zero, scale, group = int_codes(name, m)
        fmt = m.weight_format
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
        if hasattr(m, "input_smooth"):
            self.register_buffer("input_smooth", m.input_smooth.detach().float().clone())
        self.mode = "qdq"
        if self.act is not None and not self.act.static and fmt.kind == "int" and fmt.bits == 8 and \
                fmt.symmetric and fmt.granularity == "channel":
            self.mode = "int8_rows"  # W8A8 dynamic: integer matmul, as modelpress's kernel computes it
            w = codes.to(torch.int8)
            self.register_buffer("w_t", w.t().contiguous())
            self.register_buffer("colsum", w.to(torch.int32).sum(1, dtype=torch.int32))
            self.register_buffer("w_scale", scale.reshape(-1).contiguous())
            return
        if linear == "nbits":  # (int8 activations first, fake-quantized as below, when the layer has them)
            # every integer width fits MatMulNBits' 4-bit (int1..int4, ternary) or 8-bit (int5..int8) codes exactly;
            # a per-tensor scale is the same scale in every row. (DequantizeLinear + MatMul, the other form, is fused
            # by ONNX Runtime's default optimizations into a MatMulNBits that quantizes the activations to int8.)
            bits = 4 if fmt.bits <= 4 else 8
            rows = codes.shape[0]
            sc = scale.expand(rows, 1) if scale.dim() == 0 else scale.reshape(rows, -1)
            z = zero.expand(rows, 1) if zero is not None and zero.dim() == 0 else zero
            lay = _nbits_layout(codes, z, sc, group, bits, m.in_features)
            if lay is not None:
                self.mode, self.bits = "nbits", bits
                b, s, z, self.block = lay
                self.register_buffer("b", b)
                self.register_buffer("scales", s)
                self.register_buffer("zero_points", z)
                return
        # QDQ: weights transposed to [K, N] so that DequantizeLinear feeds MatMul directly
        self.group = group
        self.register_buffer("codes", codes.t().contiguous())
        self.register_buffer("scale", scale.t().contiguous() if scale.dim() == 2 else scale)
        self.register_buffer("zero", None if zero is None else (zero.t().contiguous() if zero.dim() == 2 else zero))

    def _weight_t(self) -> torch.Tensor:
        if self.scale.dim() < 2:  # per tensor
            return dequantize(self.codes, self.scale, self.zero, 1, 0)
        if self.scale.shape[0] == 1:  # per channel: a scale per column of [K, N]
            zero = None if self.zero is None else self.zero.reshape(-1)
            return dequantize(self.codes, self.scale.reshape(-1), zero, 1, 0)
        return dequantize(self.codes, self.scale, self.zero, 0, self.group)  # blocks along K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if hasattr(self, "input_smooth"):
            x2 = x2 / self.input_smooth
        if self.mode == "int8_rows":
            y = int8_matmul_rows(x2, self.w_t, self.colsum, self.w_scale, self.bias)
        elif self.mode == "nbits":
            y = matmul_nbits(self._act(x2), self.b, self.scales, self.zero_points, self.bias, self.in_features,
                             self.out_features, self.bits, self.block)
        else:
            y = self._act(x2) @ self._weight_t()
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)


class OutProjShim(LinearShim):
    """The `out_proj` of a float nn.MultiheadAttention: the attention reads `out_proj.weight` itself (it never calls
    the layer), so here `weight` is the dequantized weight, DequantizeLinear in the graph (weight-only QDQ)."""

    def __init__(self, name: str, m: QuantLinear):
        super().__init__(name, m, "qdq")

    def _init_weight(self, m: QuantMixin) -> None:
        pass

    @property
    def weight(self) -> torch.Tensor:
        return self._weight_t().t()


class ConvShim(_Shim):
    def __init__(self, name: str, m: QuantConv1d | QuantConv2d):
        super().__init__()
        for a in _CONV_ATTRS:
            setattr(self, a, getattr(m, a))
        self._float = m._float
        self.weight_shape = tuple(m.weight_shape)
        self._init_weight(m)
        self._init_act(name, m)
        codes, zero, scale, self.group = int_codes(name, m)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:  # per sample (dynamic) or per tensor (static), as the layer computes it
            x = self._act(x.reshape(x.shape[0], -1)).reshape(x.shape)
        return self._float._conv_forward(self, x, self._weight(self.weight_shape), self.bias)


class EmbeddingShim(_Shim):
    def __init__(self, name: str, m: QuantEmbedding):
        super().__init__()
        self.padding_idx, self.act = m.padding_idx, None
        self.shape = tuple(m.weight_shape)
        self._init_weight(m)
        codes, zero, scale, self.group = int_codes(name, m)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self._weight(self.shape), self.padding_idx)


def _plain(m: nn.Module, cls: type) -> bool:
    """`m` is a `cls` whose forward is cls's own (a quantized twin of a float subclass that overrides forward,
    e.g. OPT's learned positions, computes more than the shim would)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


def make_shim(name: str, m: QuantMixin, linear: str = "nbits", parent: nn.Module | None = None) -> nn.Module:
    """The export form of quantized layer `m` (at `name`, child of `parent`)."""
    if _plain(m, QuantLinear) and isinstance(parent, nn.MultiheadAttention):
        return OutProjShim(name, m)
    if _plain(m, QuantLinear):  # also MultiheadAttention's out_proj and transformers' Conv1D ([out, in] codes)
        return LinearShim(name, m, linear)
    if _plain(m, QuantConv1d) or _plain(m, QuantConv2d):
        return ConvShim(name, m)
    if _plain(m, QuantEmbedding):
        return EmbeddingShim(name, m)
    base = next((c for c in (QuantLinear, QuantConv1d, QuantConv2d, QuantEmbedding) if isinstance(m, c)), None)
    if base is not None:  # a quantized twin of a subclass with its own forward (OPT's learned positions ...)
        refuse(name, m, f"{m._float.__name__} computes more than a plain {base._float.__name__} "
                        f"(its own forward), which the ONNX form of a quantized layer does not; keep it float to "
                        f"export (quantize with exclude={name!r}, `--exclude '{name}'`)")
    refuse(name, m, f"{type(m).__name__} has no ONNX form here")
