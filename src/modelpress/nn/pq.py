"""Product-quantized layers (PQ weights, as in PECAN, DATE 2023, and "And the Bit Goes Down"): the weight is cut
into sub-vectors of `dim` numbers, each stored as the index of its nearest entry in a small codebook.

Storage: the indices, bit-packed at ceil(log2(entries)) bits each (`formats.packing`), plus the codebook
[entries, dim] (float32, trainable: centroid fine-tuning) and the bias. A Linear's sub-vectors run along its
inputs (row o, inputs j*dim ... j*dim + dim - 1); a convolution's along its input channels at one kernel position
(the weight read as [out, kh, kw, in/groups]). The forward looks every index up in the codebook (one gather) to
rebuild the weight, then runs the dense op; for a single input row a Linear instead looks up partial products:
T = x_j . codebook^T for each input slice j, y[o] = sum_j T[j, index[o, j]], which needs in * entries
multiplications instead of in * out.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..formats.packing import pack_bits, packed_nbytes, unpack_bits
from .factorized import filled


def index_bits(entries: int) -> int:
    return max(1, math.ceil(math.log2(entries)))


class _PQBase(nn.Module):
    """Packed `codes` (buffer) + `codebook` [entries, dim] (parameter) + `bias`; rows x slots indices."""

    def _init_pq(self, rows: int, slots: int, dim: int, entries: int, bias: int | None, dtype) -> None:
        if not 2 <= entries <= 256:
            raise ValueError(f"a PQ codebook has 2..256 entries, got {entries}")
        self.dim, self.entries, self.bits = dim, entries, index_bits(entries)
        self._rows, self._slots = rows, slots  # indices: [rows, slots]
        self.register_buffer("codes", torch.zeros(packed_nbytes(rows * slots, self.bits), dtype=torch.uint8))
        self.codebook = nn.Parameter(torch.zeros(entries, dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(bias, dtype=dtype)) if bias else None

    def indices(self) -> torch.Tensor:
        """The codebook index of every sub-vector, int64 [rows, slots]."""
        return unpack_bits(self.codes, self.bits, self._rows * self._slots).long().view(self._rows, self._slots)

    def set_codes(self, indices: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None):
        if tuple(indices.shape) != (self._rows, self._slots):
            raise ValueError(f"PQ indices of shape {tuple(indices.shape)}, expected {(self._rows, self._slots)}")
        with torch.no_grad():
            self.codes.copy_(pack_bits(indices.to(torch.uint8), self.bits))
            self.codebook.copy_(codebook)
            if self.bias is not None:
                self.bias.copy_(bias)
        return self

    def _rows_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[rows, slots * dim]: the codebook entries looked up (differentiable in the codebook)."""
        cb = self.codebook if dtype is None else self.codebook.to(dtype)
        return cb.index_select(0, self.indices().reshape(-1)).reshape(self._rows, self._slots * self.dim)

    def rebuilt_numel(self) -> int:
        """Numbers of the dense weight a forward pass rebuilds from the codebook (what it reads besides its own
        tensors: the speed guard's count of the weight bytes a model's pass reads, kernels.note_model)."""
        return self._rows * self._slots * self.dim

    def inspect_row(self) -> tuple[int, str]:
        """(logical parameters, format) for `mp.inspect`; bytes are counted from the stored tensors."""
        bias = self.bias.numel() if self.bias is not None else 0
        return self.rebuilt_numel() + bias, f"pq d{self.dim} k{self.entries}"


class PQLinear(_PQBase):
    def __init__(self, in_features: int, out_features: int, dim: int, entries: int, bias: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if in_features % dim:
            raise ValueError(f"PQ sub-vectors of {dim} do not divide the {in_features} inputs")
        self.in_features, self.out_features = in_features, out_features
        self._init_pq(out_features, in_features // dim, dim, entries, out_features if bias else None, dtype)

    @classmethod
    def empty_like(cls, m: nn.Linear, dim: int, entries: int) -> "PQLinear":
        new = cls(m.in_features, m.out_features, dim, entries, m.bias is not None, m.weight.dtype)
        return new.train(m.training).to(m.weight.device)

    @staticmethod
    def sub_vectors(w: torch.Tensor, dim: int) -> torch.Tensor:
        """A Linear weight [out, in] as [out, in / dim, dim] sub-vectors (the layout the indices follow)."""
        return w.reshape(w.shape[0], -1, dim)

    @property
    def weight(self) -> torch.Tensor:
        return self._rows_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.use_table(x2.shape[0]):
            y = self.table_forward(x2)
        else:
            y = F.linear(x2, self._rows_weight(x2.dtype), None if self.bias is None else self.bias.to(x2.dtype))
        return y.reshape(*lead, self.out_features)

    def use_table(self, rows: int) -> bool:
        """Look up partial products for one input row (decoding a token) when that takes fewer operations than
        rebuilding the weight; measured faster only there (the gathers grow with rows * slots * out)."""
        table = self.in_features * self.entries + self._slots * self.out_features
        return rows == 1 and table < 2 * self.in_features * self.out_features

    def table_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """y [N, out] = sum_j (x_j . codebook^T)[index[o, j]] + bias, for x2 [N, in]."""
        n = x2.shape[0]
        t = x2.reshape(n, self._slots, self.dim) @ self.codebook.to(x2.dtype).T  # [N, slots, entries]
        idx = self.indices().T.unsqueeze(0).expand(n, self._slots, self.out_features)
        y = t.gather(2, idx).sum(1)  # [N, out]
        return y if self.bias is None else y + self.bias.to(x2.dtype)

    def to_float(self) -> nn.Linear:
        f = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return filled(f, self.weight, self.bias, self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, "
                f"entries={self.entries}")


class PQConv2d(_PQBase):
    """A Conv2d whose weight, read as [out, kh, kw, in/groups], is product-quantized along the channels."""

    def __init__(self, conv: nn.Conv2d, dim: int, entries: int):
        super().__init__()
        cin = conv.in_channels // conv.groups
        if cin % dim:
            raise ValueError(f"PQ sub-vectors of {dim} do not divide the {cin} input channels per group")
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.padding_mode = conv.dilation, conv.padding_mode
        self._pad = conv._reversed_padding_repeated_twice
        kh, kw = conv.kernel_size
        self._init_pq(conv.out_channels, kh * kw * cin // dim, dim, entries,
                      conv.out_channels if conv.bias is not None else None, conv.weight.dtype)
        self.train(conv.training)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, dim: int, entries: int) -> "PQConv2d":
        return cls(conv, dim, entries).to(conv.weight.device)

    @staticmethod
    def sub_vectors(w: torch.Tensor, dim: int) -> torch.Tensor:
        """A Conv2d weight [out, in, kh, kw] as [out, kh * kw * in / dim, dim] sub-vectors along the channels."""
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1, dim)

    def _weight(self, dtype=None) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = self._rows_weight(dtype).reshape(self.out_channels, kh, kw, self.in_channels // self.groups)
        return w.permute(0, 3, 1, 2)

    @property
    def weight(self) -> torch.Tensor:
        return self._weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            return F.conv2d(F.pad(x, self._pad, mode=self.padding_mode), w, b, self.stride, 0, self.dilation,
                            self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def to_float(self) -> nn.Conv2d:
        f = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                      padding=self.padding, dilation=self.dilation, groups=self.groups,
                      bias=self.bias is not None, padding_mode=self.padding_mode)
        return filled(f, self.weight, self.bias, self.training)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, dim={self.dim}, entries={self.entries}")
