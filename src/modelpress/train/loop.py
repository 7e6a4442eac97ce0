"""`fit`: a plain training loop (cycled batches, Adam/SGD, progress, a deadline, rollback on failure).

A loss function takes (model, batch) and returns a scalar tensor; `supervised_loss` (batches of
(input, target)) and `match_teacher_loss` (unlabelled inputs, the float model's outputs as targets) cover
the common cases, and distillation or QAT add theirs.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import call_model

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output: itself, `.logits`, `.last_hidden_state`, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


def task_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer class targets (logits [..., C] with targets [...]; or, as torch's convention for
    images, logits [N, C, H, W, ...] with targets [N, H, W, ...]: segmentation), binary cross-entropy on logits for
    boolean targets (clicks), MSE for float targets."""
    if target.dtype == torch.bool:
        if output.reshape(-1).shape != target.reshape(-1).shape:
            raise ValueError(f"binary targets of shape {tuple(target.shape)} do not fit logits {tuple(output.shape)}")
        return F.binary_cross_entropy_with_logits(output.reshape(-1).float(), target.reshape(-1).float())
    if target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        first = output.dim() >= 3 and output.shape[:1] + output.shape[2:] == target.shape  # [N, C, ...] / [N, ...]
        if first and (output.dim() >= 4 or output.shape[:-1] != target.shape):  # (3-D both ways: [N, L, C] first)
            return F.cross_entropy(output.float(), target.long())
        if output.shape[:-1] != target.shape:
            raise ValueError(f"class targets of shape {tuple(target.shape)} do not fit logits {tuple(output.shape)} "
                             "(classes along the last dimension, or along dim 1 of [N, C, H, W, ...] logits)")
        return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1).long())
    if output.shape != target.shape:
        raise ValueError(f"targets of shape {tuple(target.shape)} do not fit outputs {tuple(output.shape)}")
    return F.mse_loss(output.float(), target.float())


def supervised_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Loss for an (input, target) batch."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("supervised training needs (input, target) batches")
    x, y = batch
    return task_loss(output_tensor(call_model(model, x)), y)


def match_teacher_loss(teacher: nn.Module) -> LossFn:
    """Loss for unlabelled inputs: mean squared error to the (frozen) teacher's outputs."""
    teacher.eval()

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            target = output_tensor(call_model(teacher, batch)).float()
        return F.mse_loss(output_tensor(call_model(model, batch)).float(), target)

    return loss


def check_optimizer(clip_grad: float | None, weight_decay: float, unset: str = "None") -> None:
    """fit's clip_grad and weight_decay (the train step checks its options with it when a recipe is read)."""
    if clip_grad is not None and not 0 < clip_grad < math.inf:  # a negative max norm flips every gradient
        raise ValueError(f"clip_grad must be > 0 and finite (or {unset}), got {clip_grad}")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be >= 0 and finite, got {weight_decay}")


def fit(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, steps: int, lr: float = 1e-3,
        optimizer: str = "adam", weight_decay: float = 0.0, params: Iterable[torch.nn.Parameter] | None = None,
        clip_grad: float | None = None, progress: Callable[[str, int, int], None] | None = None,
        deadline: float | None = None, stage: str = "train", schedule: str = "constant", start_step: int = 0,
        optimizer_state: dict[str, Any] | None = None, warmup: int = 0,
        on_step: Callable[[int, float, torch.optim.Optimizer], None] | None = None) -> dict[str, Any]:
    """Train `model` in place for `steps` optimizer steps over `batches` (cycled: step i uses batch i mod n).
    Stops early when time.monotonic() passes `deadline`. On any failure (or Ctrl-C) the parameters are restored.
    `params` may also be torch parameter groups (dicts with "params" and their own "lr").

    schedule: "constant" or "cosine" (learning rate decayed to 0 at `steps`, a function of the step index);
    `warmup` first steps raise the rate linearly (step i at (i + 1) / warmup of it), the cosine then decays over the
    remaining steps.
    Resuming: `start_step` steps already done, `optimizer_state` the optimizer's state_dict at that point.
    on_step(step, loss, optimizer) runs after each step (checkpoints, time estimates).
    Returns {steps (done in this call), first_loss, last_loss, seconds, seconds_per_step, stopped_early}."""
    batches = list(batches)
    if not batches:
        raise ValueError("training needs data: the batches are empty")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'constant' or 'cosine'")
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup must be in [0, {steps - 1}] (fewer steps than training), got {warmup}")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, {steps}], got {start_step}")
    check_optimizer(clip_grad, weight_decay)
    groups = _groups(model.parameters() if params is None else params, lr)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: the model has no parameters that require gradients")
    opt = _optimizer(optimizer, groups, lr, weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    t0, losses, done, stopped = time.perf_counter(), [], 0, False
    model.train()
    try:
        for i in range(start_step, steps):
            if deadline is not None and time.monotonic() > deadline:
                stopped = True
                break
            factor = lr_factor(i, steps, schedule, warmup)
            for group, group_lr in zip(opt.param_groups, base):
                group["lr"] = group_lr * factor
            loss = loss_fn(model, batches[i % len(batches)])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged: the loss is {loss.item()} at step {i + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            opt.step()
            losses.append(loss.item())
            done += 1
            if on_step:
                on_step(i + 1, losses[-1], opt)
            if progress:
                progress(stage, i + 1, steps)
    except BaseException:
        model.load_state_dict(saved)
        raise
    finally:
        model.train(was_training)
    tail = losses[-10:]
    seconds = time.perf_counter() - t0
    return {"steps": done, "first_loss": losses[0] if losses else math.nan,
            "last_loss": sum(tail) / len(tail) if tail else math.nan,
            "seconds": seconds, "seconds_per_step": seconds / done if done else math.nan, "stopped_early": stopped}


def lr_factor(step: int, steps: int, schedule: str = "cosine", warmup: int = 0) -> float:
    """The share of the base learning rate at step index `step` (0-based) of `steps`: a linear warm-up over the
    first `warmup` steps, then constant or a cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def _groups(params: Iterable[Any], lr: float) -> list[dict[str, Any]]:
    """Parameter groups (each with its learning rate) from parameters and/or groups; frozen ones dropped."""
    plain, groups = [], []
    for p in params:
        if isinstance(p, Mapping):
            kept = [q for q in p["params"] if q.requires_grad]
            if kept:
                groups.append({**p, "params": kept, "lr": p.get("lr", lr)})
        elif p.requires_grad:
            plain.append(p)
    return ([{"params": plain, "lr": lr}] if plain else []) + groups


def _optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    if name == "adam":  # the fused CPU kernel: several times faster than the per-tensor loop on large models
        fused = all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use 'adam' or 'sgd'")
