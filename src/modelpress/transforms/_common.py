"""What the replacement transforms share: swapping modules with rollback, recovery fine-tuning, stats rows."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..select import set_submodule


class Swaps:
    """Module replacements made so far, undone by `rollback()` (a failed transform leaves the model as it was)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.originals: dict[str, nn.Module] = {}

    def __call__(self, name: str, new: nn.Module) -> nn.Module:
        self.originals.setdefault(name, self.model.get_submodule(name))
        set_submodule(self.model, name, new)
        return new

    def rollback(self) -> None:
        for name, m in reversed(list(self.originals.items())):
            set_submodule(self.model, name, m)


def weight_params(m: nn.Module) -> int:
    return m.weight.numel() if isinstance(getattr(m, "weight", None), torch.Tensor) else 0


def warn_skipped(verb: str, skipped: dict[str, str]) -> None:
    if skipped:
        listed = "; ".join(f"{n} ({why})" for n, why in skipped.items())
        warnings.warn(f"{verb}: {len(skipped)} layer(s) left as they were: {listed}", stacklevel=3)


def _labelled(batches: list) -> bool:
    b = batches[0]
    return (isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], torch.Tensor)
            and not torch.is_floating_point(b[1]))


def finetune(model: nn.Module, params: Iterable[nn.Parameter], steps: int, lr: float, train: Any = None,
             calib: Any = None, teacher: nn.Module | Callable[[], nn.Module] | None = None,
             progress=None, deadline: float | None = None, stage: str = "finetune") -> dict[str, Any] | None:
    """Recovery training of `params` for `steps` steps: cross-entropy on labelled `train` batches ((input,
    class) pairs), else matching the `teacher`'s outputs (a module, or a function making one) on the `train`
    inputs or the `calib` inputs. The model runs in eval mode throughout (BatchNorm statistics and dropout stay
    as they were). Returns `fit`'s summary, or None when there is nothing to train on or steps is 0."""
    from ..train import fit, match_teacher_loss, supervised_loss

    params = [p for p in params if p.requires_grad]
    batches = list(train) if train is not None else list(calib or [])
    if steps <= 0 or not batches or not params:
        return None
    if train is not None and _labelled(batches):
        base = supervised_loss
    else:
        if teacher is None:
            raise ValueError("fine-tuning on unlabelled inputs needs a teacher model")
        base = match_teacher_loss(teacher() if callable(teacher) and not isinstance(teacher, nn.Module) else teacher)

    def loss(m: nn.Module, batch) -> torch.Tensor:
        m.eval()  # fit() switches to train mode; recovery keeps BatchNorm statistics and disables dropout
        return base(m, batch)

    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return fit(model, batches, loss, steps, lr=lr, params=params, progress=progress, deadline=deadline,
                   stage=stage)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached eval-mode copy of `model` (the teacher for fine-tuning on unlabelled data)."""
    t = copy.deepcopy(model).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def teacher_for(model: nn.Module, teacher: nn.Module | None, steps: int, train: Any, calib: Any) -> nn.Module | None:
    """The model fine-tuning on unlabelled data will match: `teacher` if given, else a copy of `model` taken
    now (before it changes); None when fine-tuning will not need one."""
    if teacher is not None or steps <= 0:
        return teacher
    if train is not None:
        train = list(train)
        if train and _labelled(train):
            return None
    return frozen_copy(model) if train or calib else None
