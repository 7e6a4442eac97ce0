"""QuantEmbedding / QuantEmbeddingBag: row-wise quantized tables; a lookup decodes only the rows it asks for
(in the "speed" kernel mode, the decoded table is also kept, and looked up as the float layer does wherever that
measured faster than decoding: kernels.speed_table).

Lookups have no data-dependent shapes (traceable by torch.export / torch.compile) and refuse negative or
out-of-range ids with nn.Embedding's IndexError. Outputs are in the float model's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QTensor, dequantize_rows, quantize_tensor
from . import kernels
from .base import QuantMixin, new_empty


def _check_supported(m: nn.Module) -> None:
    if getattr(m, "max_norm", None) is not None:
        raise ValueError(f"{type(m).__name__} with max_norm renormalises its weights at lookup; not supported")


class _QuantTable(QuantMixin):
    _ATTRS: tuple[str, ...] = ()

    def __init__(self, m: nn.Module, qweight: QTensor):
        nn.Module.__init__(self)
        _check_supported(m)
        for a in self._ATTRS:
            setattr(self, a, getattr(m, a))
        self._init_quant(qweight, None, float_dtype=m.weight.dtype)
        self._adopt(m)

    @classmethod
    def from_float(cls, m: nn.Module, fmt, act=None, qweight: QTensor | None = None):
        if act is not None:
            raise ValueError("embeddings take integer indices: activation quantization does not apply")
        return cls(m, qweight if qweight is not None else quantize_tensor(m.weight.detach(), fmt))

    @classmethod
    def empty_like(cls, m: nn.Module, fmt, act=None):
        return cls(m, new_empty(fmt, m.weight.shape))

    @property
    def weight(self) -> torch.Tensor:
        return self._read_param("weight")

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Decoded rows [idx.numel(), dim] in the float dtype (IndexError for ids outside [0, num_embeddings)): by
        the native decoder where it applies (kernels/decode.py: the same values), else by the reference decoding."""
        rows = kernels.table_rows(self, idx)
        if rows is None:
            rows = dequantize_rows(self.qweight, idx, torch.float32)
        return rows.to(self.float_dtype)


class QuantEmbedding(_QuantTable, nn.Embedding):
    _float = nn.Embedding
    _ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = kernels.speed_table(self, idx, lambda table: F.embedding(idx, table, self.padding_idx),
                                  lambda: self._native_rows(idx))  # speed mode: the decoded table (or the decoder)
        return out if out is not None else self.rows(idx).reshape(*idx.shape, self.embedding_dim)

    def _native_rows(self, idx: torch.Tensor) -> torch.Tensor | None:
        rows = kernels.table_rows(self, idx)
        return None if rows is None else rows.to(self.float_dtype).reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.quant_extra_repr()}"


class QuantEmbeddingBag(_QuantTable, nn.EmbeddingBag):
    _float = nn.EmbeddingBag
    _ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
              "sparse", "mode", "include_last_offset")

    def forward(self, idx: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        out = kernels.speed_table(self, idx, lambda table: self._dense_bags(table, idx, offsets, per_sample_weights),
                                  lambda: kernels.table_bags(self, idx, offsets, per_sample_weights))
        if out is not None:  # speed mode: the decoded table (or the decoder, where it measured faster)
            return out
        out = kernels.table_bags(self, idx, offsets, per_sample_weights)  # decoded and summed in one native pass
        if out is not None:
            return out
        n = idx.numel()
        rows = self.rows(idx)  # [n, dim]: a small table of just the rows used, in lookup order
        local = torch.arange(n, device=idx.device).reshape(idx.shape)
        pad = None
        if self.padding_idx is not None:  # padding entries point at an extra row that the bag skips
            rows = torch.cat([rows, rows.new_zeros(1, self.embedding_dim)])
            local = torch.where(idx == self.padding_idx, torch.full_like(local, n), local)
            pad = n
        return F.embedding_bag(local, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset, padding_idx=pad)

    def _dense_bags(self, table: torch.Tensor, idx: torch.Tensor, offsets, per_sample_weights) -> torch.Tensor:
        try:  # the bag checks the ids itself (no extra pass here); its error becomes nn.Embedding's IndexError
            return F.embedding_bag(idx, table, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                                   include_last_offset=self.include_last_offset, padding_idx=self.padding_idx)
        except RuntimeError as e:
            lo, hi = idx.aminmax()
            if int(lo) < 0 or int(hi) >= self.num_embeddings:
                raise IndexError(f"index out of range in self (ids must lie in [0, {self.num_embeddings}))") from e
            raise

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode}, {self.quant_extra_repr()}"
