"""Wanda (Sun et al., 2024): prune by |W_ij| * ||x_j||, the weight times the norm of its input column over the
calibration tokens, compared within each output row (unstructured) or each N:M group. No weight update.
Padded positions of the calibration batches (a dict batch's `attention_mask`) are left out of the norms.

Inputs come from the calibration runner (layers in execution order, each seeing the already-pruned layers'
outputs); Linear and Conv1d/Conv2d with groups=1 (unfolded input patches). Grouped convolutions and layers
the calibration data never reaches fall back to magnitude.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats.sparse import choose_mask
from .magnitude import in_execution_order


@dataclass(frozen=True)
class Config:
    method: ClassVar[str] = "wanda"
    needs_calib: ClassVar[bool] = True


def input_norms(rows: Iterable[torch.Tensor]) -> torch.Tensor:
    """||x_j||_2 [K] over all rows of the inputs (each [T, K]), accumulated in float64."""
    acc = None
    for x in rows:
        s = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).double()
        acc = s if acc is None else acc + s
    if acc is None:
        raise ValueError("wanda needs at least one input row")
    return acc.sqrt().float()


def wanda_mask(w: torch.Tensor, norms: torch.Tensor, sparsity: float | None = None,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Kept-values mask (bool, w's shape) of w [N, ...] (seen as [N, K]) given input column norms [K]."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    if norms.numel() != w2.shape[1]:
        raise ValueError(f"{norms.numel()} input norms do not fit a weight with {w2.shape[1]} input columns")
    score = w2.abs() * norms.reshape(1, -1)
    return choose_mask(score, sparsity, nm, per_row=True).reshape(w.shape)


def apply(model, plans, calib, config: Config, ctx) -> None:
    in_execution_order(model, plans, calib, ctx, lambda p, rows: (
        p.module.weight.detach(), wanda_mask(p.module.weight, input_norms(rows), p.sparsity, p.nm)))
