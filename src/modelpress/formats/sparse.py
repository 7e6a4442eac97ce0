"""Sparse storage of pruned weights: a bitmask of the kept values plus the codes of those values only.

The mask has one bit per weight (row-major over the weight's shape, packed 8 per byte); the codes of the kept
values are packed in the same order with the format's own bit width, and the scales stay those of the dense
layout (per tensor / channel / group of the original columns). So any format combines with any sparsity:
50 % unstructured fp32 takes 16 + 1 bits per weight, 2:4 + int4:g32 takes 2 + 1 + 0.5 bits. An N:M pattern is
stored as the same bitmask (1 bit per weight, never more than its index form: 2:4 indices also take 1 bit,
4:8 indices 1.5).

Pure functions here: N:M and top-k masks from scores, pattern checks, mask packing, and turning a dense QTensor
into a sparse one (and back to the dense code grid for decoding and kernels).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .packing import pack_bits, packed_nbytes, unpack_bits
from .qtensor import QTensor, byte_histogram, codes_grid, grid, pack_codes, unpack_codes
from .spec import Format


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"N:M" (N values kept in every M consecutive input columns) -> (N, M)."""
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"an N:M sparsity pattern looks like '2:4', got {pattern!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"sparsity pattern {pattern!r} must keep 0 < N < M values of every M")
    return n, m


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores of every M consecutive columns of score [rows, cols] (cols % M == 0)."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"an {n}:{m} pattern needs a multiple of {m} input columns, the weight has {cols}")
    s = score.reshape(rows, cols // m, m)
    top = s.topk(n, dim=-1).indices  # [rows, groups, n]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, cols)


def topk_mask(score: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep the highest scores: round(numel * (1 - sparsity)) of the whole tensor, or of every row."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    s = score.reshape(score.shape[0], -1) if per_row else score.reshape(1, -1)
    keep = max(1, round(s.shape[1] * (1.0 - sparsity)))
    top = s.topk(keep, dim=1).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(1, top, True).reshape(score.shape)


def choose_mask(score: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                per_row: bool = False) -> torch.Tensor:
    """Kept-values mask of score [rows, cols]: an N:M pattern, or a sparsity over the tensor (or each row)."""
    if nm is not None:
        return nm_mask(score, *nm)
    if sparsity is None:
        raise ValueError("give a sparsity or an N:M pattern")
    return topk_mask(score, sparsity, per_row)


def satisfies(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every M consecutive columns of mask [rows, cols] keep at most N values."""
    rows = mask.shape[0]
    cols = mask.numel() // max(rows, 1)
    if cols % m:
        return False
    return bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask (any shape) -> uint8 bits, row-major, 8 per byte."""
    return pack_bits(mask.reshape(-1).to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return unpack_bits(packed, 1, math.prod(shape)).view(shape).bool()


def mask_nbytes(shape: tuple[int, ...]) -> int:
    return packed_nbytes(math.prod(shape), 1)


def codes_nbytes(fmt: Format, nnz: int) -> int:
    """Bytes of `nnz` packed codes (the kept values of a sparse weight)."""
    return packed_nbytes(nnz, fmt.bits)


def grid_mask(mask: torch.Tensor, fmt: Format, shape: tuple[int, ...]) -> torch.Tensor:
    """The weight's bool mask laid on the [rows, groups, group] code grid (padding columns False)."""
    rows, groups, g = grid(fmt, shape)
    m = mask.reshape(rows, -1)
    return F.pad(m, (0, groups * g - m.shape[1])).view(rows, groups, g)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def kept_values(mask: torch.Tensor, numel: int, step: int = 1 << 22) -> int:
    """The number of set bits among the first `numel` of a packed bitmask (bits beyond them ignored, as unpacking
    does), counted from a histogram of its bytes (no bool tensor of the weight's size)."""
    full, rest = divmod(numel, 8)
    n = int((byte_histogram(mask[:full], step) * _POPCOUNT).sum())
    if rest:
        n += bin(int(mask[full]) & ((1 << rest) - 1)).count("1")
    return n


def nnz(q: QTensor) -> int:
    """Values stored: the kept ones of a sparse weight, all of a dense one."""
    if q.mask is None:
        return math.prod(q.shape)
    return kept_values(q.mask, math.prod(q.shape))


def sparsify(q: QTensor, mask: torch.Tensor) -> QTensor:
    """The sparse form of q: only the codes where `mask` (bool, q's shape) is True, plus the packed mask.
    A q that is already sparse keeps only values both masks keep."""
    mask = mask.reshape(q.shape).bool()
    if q.mask is not None:
        mask = mask & unpack_mask(q.mask, q.shape)
    keep = grid_mask(mask, q.fmt, q.shape)
    kept = codes_grid(q)[keep]
    return QTensor(q.fmt, q.shape, pack_codes(kept, q.fmt), q.scale, q.zero, q.global_scale, pack_mask(mask))


def scatter_codes(q: QTensor) -> torch.Tensor:
    """The dense code grid [rows, groups, group] of a sparse q; pruned positions hold the code of zero."""
    rows, groups, g = grid(q.fmt, q.shape)
    keep = grid_mask(unpack_mask(q.mask, q.shape), q.fmt, q.shape)
    kept = unpack_codes(q.codes, q.fmt, int(keep.sum()))
    if q.zero is not None:  # asymmetric integers: the zero point decodes to exactly 0
        out = q.zero.reshape(rows, groups, 1).expand(rows, groups, g).clone()
    else:
        out = torch.zeros(rows, groups, g, dtype=kept.dtype)
    out[keep] = kept
    return out


def dense_codes(q: QTensor) -> torch.Tensor:
    """The packed bytes a dense QTensor of q's values would store (kernels that read a dense code layout)."""
    return pack_codes(codes_grid(q).reshape(-1), q.fmt) if q.mask is not None else q.codes


def sparsity_of(q: QTensor) -> float:
    """Fraction of the weight's values that are pruned (0 for a dense QTensor)."""
    return 1.0 - nnz(q) / math.prod(q.shape)
