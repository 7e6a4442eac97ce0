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


def replay_layers(model: nn.Module, options: dict, kind: str, hint: str,
                  build: Callable[[str, nn.Module, Any], nn.Module]) -> None:
    """Rebuild the layers a structure record lists (`options["layers"]`: {name: info}) by `build(name, module, info)`,
    which returns the replacement (shapes only: values come from the saved tensors) or raises ValueError."""
    layers = options.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{kind} record needs 'layers' {{name: {hint}}}, got {layers!r}")
    swaps = Swaps(model)
    for name, info in layers.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"cannot replay {kind}: the model has no layer {name!r} (wrong architecture?)") from None
        swaps(name, build(name, m, info))


def described(m: nn.Module) -> dict[str, Any]:
    """What `inspect_saved` shows for a replacement layer (kept in its structure record)."""
    params, fmt = m.inspect_row()
    return {"type": type(m).__name__, "params": params, "format": fmt}


def warn_skipped(verb: str, skipped: dict[str, str]) -> None:
    if skipped:
        listed = "; ".join(f"{n} ({why})" for n, why in skipped.items())
        warnings.warn(f"{verb}: {len(skipped)} layer(s) left as they were: {listed}", stacklevel=3)


def _labelled(batches: list) -> bool:
    b = batches[0]
    return (isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], torch.Tensor)
            and not torch.is_floating_point(b[1]))


def finetune_batches(train: Any, calib: Any, objective: str) -> list:
    """What recovery trains on: labelled `train` batches for "labels"; for "teacher" the inputs of `train`
    (labels dropped) or else the `calib` inputs."""
    train = list(train) if train is not None else []
    if objective == "labels":
        if not train or not _labelled(train):
            raise ValueError("fine-tuning on labels needs training batches of (input, class) pairs (train=...)")
        return train
    if train:
        return [b[0] for b in train] if _labelled(train) else train
    return list(calib or [])


def finetune(model: nn.Module, params: Iterable[nn.Parameter], steps: int, lr: float, batches: list,
             objective: str = "teacher", teacher: nn.Module | None = None, progress=None,
             deadline: float | None = None, stage: str = "finetune") -> dict[str, Any] | None:
    """Recovery training of `params` for `steps` steps on `batches` (see `finetune_batches`): matching the
    `teacher`'s outputs (objective "teacher", mean squared error of the outputs, i.e. logit distillation) or
    cross-entropy on the labels ("labels"). The model runs in eval mode throughout (BatchNorm statistics and
    dropout stay as they were); other parameters are frozen meanwhile. Returns `fit`'s summary, or None when
    there is nothing to train on or steps is 0."""
    from ..train import fit, match_teacher_loss, supervised_loss

    params = [p for p in params if p.requires_grad]
    if steps <= 0 or not batches or not params:
        return None
    if objective == "labels":
        base = supervised_loss
    elif teacher is None:
        raise ValueError("fine-tuning to match the float model needs a teacher model")
    else:
        base = match_teacher_loss(teacher)

    def loss(m: nn.Module, batch) -> torch.Tensor:
        m.eval()  # fit() switches to train mode; recovery keeps BatchNorm statistics and disables dropout
        return base(m, batch)

    ids = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return fit(model, batches, loss, steps, lr=lr, params=params, progress=progress, deadline=deadline,
                   stage=stage)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def replace_then_finetune(model: nn.Module, targets: dict, done: dict, skipped: dict, process: Callable, calib,
                          weigh: bool, config, batches: list, teacher, swaps, verb: str, progress=None,
                          deadline: float | None = None) -> dict[str, Any] | None:
    """Replace the target layers with `process(name, module, inputs)`: weighed by the calibration data (the
    sequential runner) when `weigh`, then those the data never reached (and all of them otherwise) without; then
    fine-tune the new layers (every parameter with `config.train_all`). `done` / `skipped` are filled by `process`.
    On any failure the swaps are rolled back. Returns `finetune`'s summary."""
    from ..calibrate import run_sequential

    try:
        if weigh:
            run_sequential(model, calib, list(targets), process, progress)
        for name, m in targets.items():
            if name not in done and name not in skipped:
                process(name, m, None)
        params = [p for n in done for p in model.get_submodule(n).parameters()]
        return finetune(model, model.parameters() if config.train_all else params, config.finetune_steps, config.lr,
                        batches, config.finetune_on, teacher, progress=progress, deadline=deadline,
                        stage=f"{verb} finetune")
    except BaseException:
        swaps.rollback()
        raise


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached eval-mode copy of `model` (the teacher for fine-tuning on unlabelled data)."""
    t = copy.deepcopy(model).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def teacher_for(model: nn.Module, teacher: nn.Module | None, steps: int, objective: str,
                batches: list) -> nn.Module | None:
    """The model that teacher-matching fine-tuning follows: `teacher` if given, else a frozen copy of `model`
    taken now (before it changes); None when no fine-tuning will need one."""
    if teacher is not None or steps <= 0 or objective != "teacher" or not batches:
        return teacher
    return frozen_copy(model)
