"""QuantEmbedding / QuantEmbeddingBag: row-wise quantized tables; a lookup decodes only the rows it needs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QTensor, dequantize_rows, quantize_tensor
from .base import QuantMixin, new_empty


def _check_supported(m: nn.Module) -> None:
    if getattr(m, "max_norm", None) is not None:
        raise ValueError(f"{type(m).__name__} with max_norm renormalises its weights at lookup; not supported")


def _rows(m: QuantMixin, uniq: torch.Tensor) -> torch.Tensor:
    """Decoded rows `uniq` [U, dim]; an empty lookup (U = 0) decodes nothing."""
    if uniq.numel() == 0:
        return torch.zeros(0, m.embedding_dim)
    return dequantize_rows(m.qweight, uniq)


class QuantEmbedding(QuantMixin, nn.Module):
    def __init__(self, m: nn.Embedding, qweight: QTensor):
        super().__init__()
        _check_supported(m)
        self.num_embeddings, self.embedding_dim, self.padding_idx = m.num_embeddings, m.embedding_dim, m.padding_idx
        self._init_quant(qweight, None)

    @classmethod
    def from_float(cls, m: nn.Embedding, fmt, act=None, qweight: QTensor | None = None):
        if act is not None:
            raise ValueError("embeddings take integer indices: activation quantization does not apply")
        return cls(m, qweight if qweight is not None else quantize_tensor(m.weight.detach(), fmt))

    @classmethod
    def empty_like(cls, m: nn.Embedding, fmt, act=None):
        return cls(m, new_empty(fmt, m.weight.shape))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(idx, return_inverse=True)
        rows = _rows(self, uniq)  # [U, dim]
        return rows[inv]  # [*idx.shape, dim]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.quant_extra_repr()}"


class QuantEmbeddingBag(QuantMixin, nn.Module):
    def __init__(self, m: nn.EmbeddingBag, qweight: QTensor):
        super().__init__()
        _check_supported(m)
        self.num_embeddings, self.embedding_dim = m.num_embeddings, m.embedding_dim
        self.mode, self.padding_idx, self.include_last_offset = m.mode, m.padding_idx, m.include_last_offset
        self._init_quant(qweight, None)

    from_float = classmethod(QuantEmbedding.from_float.__func__)
    empty_like = classmethod(QuantEmbedding.empty_like.__func__)

    def forward(self, idx: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        uniq, inv = torch.unique(idx, return_inverse=True)
        rows = _rows(self, uniq)  # [U, dim]: a small table of just the rows used
        pad = None
        if self.padding_idx is not None:
            hit = (uniq == self.padding_idx).nonzero()
            pad = int(hit[0, 0]) if hit.numel() else None
        return F.embedding_bag(inv.reshape(idx.shape), rows, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights, include_last_offset=self.include_last_offset,
                               padding_idx=pad)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode}, {self.quant_extra_repr()}"
