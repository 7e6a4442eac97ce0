"""Magnitude pruning: keep the weights of largest |W| (over the whole layer, or within every N:M group). No data.

The baseline the data-driven methods (wanda, sparsegpt) are measured against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats.sparse import choose_mask


@dataclass(frozen=True)
class Config:
    method: ClassVar[str] = "magnitude"
    per_row: bool = False  # the same sparsity in every output row instead of one threshold for the layer


def magnitude_mask(w: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                   per_row: bool = False) -> torch.Tensor:
    """Kept-values mask (bool, w's shape) of w [N, ...] by |w| (seen as [N, K])."""
    score = w.detach().float().reshape(w.shape[0], -1).abs()
    return choose_mask(score, sparsity, nm, per_row).reshape(w.shape)


def apply(model, plans, calib, config: Config, ctx) -> None:
    for p in plans:
        w = p.module.weight.detach()
        ctx.commit(p, w, magnitude_mask(w, p.sparsity, p.nm, config.per_row))
