"""QuantMultiheadAttention: nn.MultiheadAttention with its input projection(s) quantized (weight-only).

The input projection (`in_proj_weight` [3E, E], or `q_proj_weight` / `k_proj_weight` / `v_proj_weight` when key
and value dimensions differ) is stored packed; `out_proj` stays a child module and is quantized on its own as a
QuantLinear. torch's own forward runs unchanged (the fast path in eval mode too) on the decoded weights, which
are decoded once per call. Biases stay float.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import QTensor, quantize_tensor
from .base import QuantMixin, materialized, new_empty


def projection_names(m: nn.MultiheadAttention) -> tuple[str, ...]:
    return ("in_proj_weight",) if m._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def _projection(name: str):
    def get(self):
        return self._read_param(name) if name in self.qshapes else None
    return property(get, doc=f"`{name}` decoded on access (None when the layer does not have it)")


class QuantMultiheadAttention(QuantMixin, nn.MultiheadAttention):
    _float = nn.MultiheadAttention

    def __init__(self, m: nn.MultiheadAttention, qweights: dict[str, QTensor]):
        nn.Module.__init__(self)
        names = projection_names(m)
        if set(qweights) != set(names):
            raise ValueError(f"MultiheadAttention quantizes {', '.join(names)}; got {', '.join(qweights)}")
        for n in names:
            if tuple(qweights[n].shape) != tuple(getattr(m, n).shape):
                raise ValueError(f"{n}: weight shape {tuple(qweights[n].shape)} does not match "
                                 f"{tuple(getattr(m, n).shape)}")
        self._init_quant({n: qweights[n] for n in names}, None, float_dtype=getattr(m, names[0]).dtype)
        self._adopt(m)  # embed_dim, num_heads, batch_first ...; biases (float); out_proj (the same child)

    in_proj_weight = _projection("in_proj_weight")
    q_proj_weight = _projection("q_proj_weight")
    k_proj_weight = _projection("k_proj_weight")
    v_proj_weight = _projection("v_proj_weight")

    @classmethod
    def from_float(cls, m: nn.MultiheadAttention, fmt, act=None, qweight: dict[str, QTensor] | None = None,
                   mse: bool | None = None) -> "QuantMultiheadAttention":
        if act is not None:
            raise ValueError("MultiheadAttention's input projections are quantized weight-only")
        if qweight is None:
            qweight = {n: quantize_tensor(getattr(m, n).detach(), fmt, mse=mse) for n in projection_names(m)}
        return cls(m, qweight)

    @classmethod
    def empty_like(cls, m: nn.MultiheadAttention, fmt, act=None) -> "QuantMultiheadAttention":
        return cls(m, {n: new_empty(fmt, getattr(m, n).shape) for n in projection_names(m)})

    @staticmethod
    def qshape_of(m: nn.Module) -> tuple[int, ...]:
        return tuple(getattr(m, projection_names(m)[0]).shape)

    @staticmethod
    def float_weights(m: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
        return {n: getattr(m, n) for n in projection_names(m)}

    def forward(self, *args, **kwargs):
        with materialized(self, self.out_proj):
            return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {self.quant_extra_repr()}"
