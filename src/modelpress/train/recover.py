"""`recover_`: short fine-tuning after pruning (a few hundred steps on CPU), with the pruned weights kept at zero.

Labelled (input, target) batches train on the task loss; unlabelled inputs train the model to match the float
reference's outputs (the teacher). Layers pruned to sparse storage are trained as float layers whose gradient is
masked, then stored sparsely again with the same mask; quantized layers stay frozen (their float parameters,
such as norms, still train). Distillation can replace the loss later (`loss_fn=`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..quant import QuantMixin
from ..quant.kernels import note_model
from ..select import set_submodule
from .loop import LossFn, fit, match_teacher_loss, supervised_loss


def is_labelled(batch: Any) -> bool:
    """An (input, target) pair: two items, the second a tensor."""
    return isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor)


def _unmask_sparse(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module, torch.Tensor]]:
    """Swap pruned float layers (sparse storage) for float layers whose gradient is zero where pruned."""
    from ..prune import float_of

    swapped = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantMixin) and m.weight_format.kind == "raw" and hasattr(m, "weight_mask"):
            f, keep = float_of(m)
            f.weight.requires_grad_(True)
            f.weight.register_hook(lambda g, k=keep: g * k.to(g.dtype))
            set_submodule(model, name, f)
            swapped[name] = (m, f, keep)
    return swapped


def recover_(model: nn.Module, batches: Iterable[Any], steps: int = 200, lr: float = 1e-4,
             teacher: nn.Module | None = None, loss_fn: LossFn | None = None, optimizer: str = "adam",
             progress: Callable[[str, int, int], None] | None = None, deadline: float | None = None) -> dict[str, Any]:
    """Fine-tune `model` in place for `steps` steps on `batches`; returns fit's statistics and the loss used.

    The loss: `loss_fn` if given, the task loss for (input, target) batches, else matching `teacher`'s outputs.
    A failure leaves the model as it was."""
    from ..prune import sparse_module

    batches = list(batches)
    if not batches:
        raise ValueError("recovery needs data: the batches are empty")
    if loss_fn is None:
        if is_labelled(batches[0]):
            loss_fn, kind = supervised_loss, "task"
        elif teacher is not None:
            loss_fn, kind = match_teacher_loss(teacher), "match_reference"
        else:
            raise ValueError("recovery on unlabelled inputs needs the float reference (teacher=...)")
    else:
        kind = "custom"
    swapped = _unmask_sparse(model)
    try:
        stats = fit(model, batches, loss_fn, steps, lr=lr, optimizer=optimizer, progress=progress,
                    deadline=deadline, stage="recover")
    except BaseException:
        for name, (sparse, _, _) in swapped.items():
            set_submodule(model, name, sparse)
        raise
    for name, (_, f, keep) in swapped.items():
        set_submodule(model, name, sparse_module(f, f.weight.detach(), keep))
    if swapped:
        note_model(model)
    if not math.isfinite(stats["last_loss"]):
        raise FloatingPointError("recovery produced a non-finite loss")
    return {**stats, "loss": kind}
