"""SparseGPT (Frantar & Alistarh, 2023): prune a layer column by column and spread each removed weight's error
over the columns still to do (the optimal brain surgeon update), so as to minimise the output error
||X W^T - X W'^T||^2 on calibration data, through the same Hessian H = 2/n X^T X and inverse Cholesky factor
GPTQ uses.

Masks are chosen block by block (`block_size` columns) from the scores w^2 / U_jj^2 (U the upper Cholesky
factor of H^-1, so U_jj^2 is the inverse Hessian's diagonal at the time column j is reached): the lowest
`sparsity` of the block's scores are pruned, or for an N:M pattern the M-N lowest of every M columns of a row,
chosen when the group's first column comes up (with the weights as updated so far). Padded positions of the
calibration batches (a dict batch's `attention_mask`) are left out of the Hessian.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats.sparse import choose_mask
from .gptq import hessian, inverse_cholesky
from .magnitude import in_execution_order


@dataclass(frozen=True)
class Config:
    method: ClassVar[str] = "sparsegpt"
    needs_calib: ClassVar[bool] = True
    damp: float = 0.01  # added to diag(H): this fraction of its mean
    block_size: int = 128  # columns whose masks are chosen together (rounded down to a multiple of M for N:M)

    def __post_init__(self):
        if not self.damp >= 0:
            raise ValueError(f"sparsegpt damp must be >= 0, got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"sparsegpt block_size must be >= 1, got {self.block_size}")


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, config: Config = Config(),
                    keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune w [N, ...] (seen as [N, K]) given the Hessian h [K, K] of its input.

    Returns (w', kept-values mask), both of w's shape; w' is exactly zero where the mask is False and the
    kept weights carry the error compensation. `keep`: values an earlier pruning removed stay removed."""
    shape = tuple(w.shape)
    w0 = w.detach().float().reshape(shape[0], -1).clone()  # [N, K], updated in place
    n, k = w0.shape
    if tuple(h.shape) != (k, k):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not fit a weight with {k} input columns")
    prior = None if keep is None else keep.reshape(n, k).bool()
    bs = config.block_size
    if nm is not None:
        if k % nm[1]:
            raise ValueError(f"an {nm[0]}:{nm[1]} pattern needs a multiple of {nm[1]} input columns, got {k}")
        bs = max(nm[1], bs // nm[1] * nm[1])
    u = inverse_cholesky(h, config.damp).float()  # [K, K] upper
    d = torch.diagonal(u)  # [K]
    mask = torch.ones(n, k, dtype=torch.bool)  # kept
    for b0 in range(0, k, bs):
        b1 = min(b0 + bs, k)
        err = torch.zeros(n, b1 - b0)  # [N, B] scaled errors of this block's columns
        if nm is None:
            score = w0[:, b0:b1].pow(2) / d[b0:b1].pow(2)[None, :]  # [N, B]
            if prior is not None:
                score = torch.where(prior[:, b0:b1], score, -1.0)  # removed before: removed first
            mask[:, b0:b1] = choose_mask(score, sparsity)
        for j in range(b0, b1):
            if nm is not None and (j - b0) % nm[1] == 0:
                score = w0[:, j:j + nm[1]].pow(2) / d[j:j + nm[1]].pow(2)[None, :]  # [N, M]
                if prior is not None:
                    score = torch.where(prior[:, j:j + nm[1]], score, -1.0)
                mask[:, j:j + nm[1]] = choose_mask(score, nm=nm)
            col = w0[:, j]
            q = torch.where(mask[:, j], col, 0.0)
            e = (col - q) / u[j, j]  # [N]
            w0[:, j] = q
            w0[:, j + 1:b1] -= e[:, None] * u[j, j + 1:b1][None, :]
            err[:, j - b0] = e
        w0[:, b1:] -= err @ u[b0:b1, b1:]
    if prior is not None:
        mask &= prior
        w0 = torch.where(mask, w0, 0.0)
    return w0.reshape(shape).to(w.dtype), mask.reshape(shape)


def apply(model, plans, calib, config: Config, ctx) -> None:
    in_execution_order(model, plans, calib, ctx, lambda p, rows: sparsegpt_prune(
        p.module.weight, hessian(rows), p.sparsity, p.nm, config, p.keep))
