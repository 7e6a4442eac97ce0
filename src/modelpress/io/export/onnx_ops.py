"""Torch custom ops that stand for quantized computations during ONNX export, and their ONNX translations.

During export each quantized layer is swapped for a shim (onnx_shims.py) whose forward calls these ops on its
buffers (already in ONNX Runtime's layouts). torch.export sees them as opaque (the fake impls give shapes), the
buffers become initializers, and the dynamo exporter's `custom_translation_table` maps each op to ONNX nodes:

| op                 | ONNX                                                                      |
| matmul_nbits       | com.microsoft MatMulNBits (4/8-bit blocks, ONNX Runtime contrib op)       |
| dequantize         | DequantizeLinear (per tensor, per axis, or blocked: opset 21)             |
| qdq_static         | QuantizeLinear -> DequantizeLinear, uint8, calibrated scale / zero point  |
| qdq_rows           | per-row dynamic uint8 range, QuantizeLinear on axis 0, then (q - zero) scale |
| int8_matmul_rows   | per-row dynamic int8 quantization + MatMulInteger (exact int32 sums) + rescale |
The eager impls compute the same numbers in torch, so a shimmed model can be checked without ONNX Runtime.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from ...quant.activation import dynamic_params, quantize_uint8

NS = "modelpress_onnx"


def _unpack_nbits(b: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """MatMulNBits' B [N, blocks, blob] -> unsigned codes [N, k]."""
    n = b.shape[0]
    flat = b.reshape(n, -1)
    if bits == 4:
        flat = torch.stack([flat & 0xF, flat >> 4], -1).reshape(n, -1)
    return flat[:, :k].to(torch.int32)


@torch.library.custom_op(f"{NS}::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], K: int, N: int, bits: int, block_size: int) -> torch.Tensor:
    q = _unpack_nbits(b, bits, K)  # [N, K]
    nb = -(-K // block_size)
    if zero_points is None:
        z = torch.full((N, nb), 2 ** (bits - 1), dtype=torch.int32)
    else:
        z = _unpack_nbits(zero_points.reshape(N, -1), bits, nb)
    s = scales.reshape(N, nb).repeat_interleave(block_size, 1)[:, :K]
    w = (q - z.repeat_interleave(block_size, 1)[:, :K]).to(x.dtype) * s.to(x.dtype)
    y = x @ w.t()
    return y if bias is None else y + bias


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, K, N, bits, block_size):
    return x.new_empty(*x.shape[:-1], N)


@torch.library.custom_op(f"{NS}::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], axis: int,
               block_size: int) -> torch.Tensor:
    """codes (int8, or uint8 with `zero`) times scale: per tensor (scale []), per axis, or in blocks along axis."""
    c = codes.to(torch.float32)
    if zero is not None:
        z = zero.to(torch.float32)
    s = scale.float()
    if scale.dim() and block_size:
        s = s.repeat_interleave(block_size, axis).narrow(axis, 0, codes.shape[axis])
        if zero is not None:
            z = z.repeat_interleave(block_size, axis).narrow(axis, 0, codes.shape[axis])
    elif scale.dim():
        shape = [1] * codes.dim()
        shape[axis] = -1
        s = s.reshape(shape)
        if zero is not None:
            z = z.reshape(shape)
    return (c - z) * s if zero is not None else c * s


@dequantize.register_fake
def _(codes, scale, zero, axis, block_size):
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.custom_op(f"{NS}::qdq_static", mutates_args=())
def qdq_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Static uint8 fake quantization (scale float [], zero uint8 [])."""
    z = zero.float()
    return ((quantize_uint8(x, scale, z).float() - z) * scale).to(x.dtype)


@qdq_static.register_fake
def _(x, scale, zero):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NS}::qdq_rows", mutates_args=())
def qdq_rows(x: torch.Tensor) -> torch.Tensor:
    """Dynamic uint8 fake quantization of a 2-D [M, K] input, one range per row (modelpress's per token)."""
    scale, zero = dynamic_params(x, per_token=True)
    return ((quantize_uint8(x, scale, zero).float() - zero) * scale).to(x.dtype)


@qdq_rows.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NS}::int8_matmul_rows", mutates_args=())
def int8_matmul_rows(x: torch.Tensor, w_t: torch.Tensor, colsum: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] quantized per row to uint8 (held as u - 128 in int8), times int8 weights w_t [K, N]."""
    scale, zero = dynamic_params(x, per_token=True)
    xs = (quantize_uint8(x, scale, zero).to(torch.int32) - 128)
    acc = xs @ w_t.to(torch.int32) + (128 - zero.to(torch.int32)) * colsum
    y = acc.float() * (scale * w_scale)
    return (y if bias is None else y + bias).to(x.dtype)


@int8_matmul_rows.register_fake
def _(x, w_t, colsum, w_scale, bias):
    return x.new_empty(x.shape[0], w_t.shape[1])


@lru_cache(maxsize=None)
def translation_table(opset: int) -> dict:
    """{torch op: onnxscript function} for torch.onnx.export(..., custom_translation_table=...)."""
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript.values import Op

    if opset < 21:
        raise ValueError(f"ONNX export needs opset 21 or later (blocked DequantizeLinear), got {opset}")
    op = getattr(onnxscript, f"opset{opset}", None)
    if op is None:
        raise ValueError(f"this onnxscript has no opset {opset}")
    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(  # ONNX Runtime's contrib op, described here (onnx itself does not know it)
        "MatMulNBits", "com.microsoft", 1,
        inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1"), fp("zero_points", "T3", param_option=opt),
                fp("g_idx", "T4", param_option=opt), fp("bias", "T1", param_option=opt)],
        outputs=[fp("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ("K", "N", "bits", "block_size")])
    matmul_nbits_op = Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", schema)

    def t_matmul_nbits(x, b, scales, zero_points, bias, K: int, N: int, bits: int, block_size: int):
        return matmul_nbits_op(x, b, scales, zero_points, None, bias, K=K, N=N, bits=bits, block_size=block_size)

    def t_dequantize(codes, scale, zero, axis: int, block_size: int):
        if block_size:
            return op.DequantizeLinear(codes, scale, zero, axis=axis, block_size=block_size)
        return op.DequantizeLinear(codes, scale, zero, axis=axis)

    def t_qdq_static(x, scale, zero):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)

    def _row_params(x):
        """Per-row uint8 scale [M] and zero point [M] (float) as modelpress computes them."""
        zero_f = op.Constant(value_float=0.0)
        lo = op.Min(op.ReduceMin(x, op.Constant(value_ints=[1]), keepdims=0), zero_f)
        hi = op.Max(op.ReduceMax(x, op.Constant(value_ints=[1]), keepdims=0), zero_f)
        scale = op.Div(op.Sub(hi, lo), op.Constant(value_float=255.0))
        scale = op.Where(op.Greater(scale, zero_f), scale, op.Constant(value_float=1.0))
        zero = op.Clip(op.Round(op.Div(op.Neg(lo), scale)), zero_f, op.Constant(value_float=255.0))
        return scale, zero

    def t_qdq_rows(x):
        scale, zero = _row_params(x)
        q = op.QuantizeLinear(x, scale, op.Cast(zero, to=2), axis=0)  # uint8 codes
        # (q - zero) * scale as DequantizeLinear computes it, written out: ONNX Runtime fuses a per-row
        # DequantizeLinear feeding MatMul with dequantized weights into MatMulIntegerToFloat, whose kernel takes one
        # activation zero point only and fails at run time (int4 weights with int8 activations)
        one = op.Constant(value_ints=[1])
        return op.Mul(op.Sub(op.Cast(q, to=1), op.Unsqueeze(zero, one)), op.Unsqueeze(scale, one))

    def t_int8_matmul_rows(x, w_t, colsum, w_scale, bias):
        scale, zero = _row_params(x)
        zp = op.Cast(op.Sub(zero, op.Constant(value_float=128.0)), to=3)  # int8: u - 128 = q(x; zero - 128)
        xs = op.QuantizeLinear(x, scale, zp, axis=0)
        acc = op.MatMulInteger(xs, w_t)  # [M, N] int32
        corr = op.Mul(op.Unsqueeze(op.Cast(op.Sub(op.Constant(value_float=128.0), zero), to=6),
                                   op.Constant(value_ints=[1])), colsum)
        y = op.Mul(op.Cast(op.Add(acc, corr), to=1), op.Mul(op.Unsqueeze(scale, op.Constant(value_ints=[1])), w_scale))
        return y if bias is None else op.Add(y, bias)

    ops = torch.ops.modelpress_onnx
    return {ops.matmul_nbits.default: t_matmul_nbits, ops.dequantize.default: t_dequantize,
            ops.qdq_static.default: t_qdq_static, ops.qdq_rows.default: t_qdq_rows,
            ops.int8_matmul_rows.default: t_int8_matmul_rows}
