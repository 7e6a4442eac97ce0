"""Magnitude pruning: keep the weights of largest |W| (over the whole layer, or within every N:M group). No data.

The baseline the data-driven methods (wanda, sparsegpt) are measured against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

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


def in_execution_order(model, plans, calib, ctx,
                       prune: Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The glue of the data-driven methods (wanda, sparsegpt): each layer the calibration runner reaches, in execution
    order (so it sees the already-pruned layers' outputs), commits `prune(plan, rows)` -> (weight, kept mask), rows
    its inputs at real tokens (gptq.data_rows: padded positions left out); grouped convolutions and layers the
    calibration data never reaches fall back to magnitude."""
    from ..calibrate import layer_masks, run_sequential
    from .gptq import data_rows, gptq_able

    todo = {p.name: p for p in plans if gptq_able(p.module)}
    done: set[str] = set()
    masks = layer_masks(model, calib) if todo else (lambda name: [])

    def process(name, module, inputs) -> None:
        ctx.commit(todo[name], *prune(todo[name], data_rows(module, inputs, masks(name))))
        done.add(name)

    if todo:
        run_sequential(model, calib, list(todo), process, ctx.progress)
    for p in plans:
        if p.name not in done:
            ctx.commit(p, p.module.weight.detach(), magnitude_mask(p.module.weight, p.sparsity, p.nm))
