"""The `train` recipe step: optional QAT (prepare, train, convert), distillation from the float model the recipe
started from (`ctx.reference`), on CPU, with progress, a time estimate, an early stop on the run's budget and a
resumable checkpoint.

    - train:
        steps: 300                      # or epochs: 2 (passes over the training batches)
        lr: 0.001                       # schedule: cosine (default) or constant; warmup: 20 (linear warm-up steps)
        ema: 0.998                      # optional: end with the moving average of the trained weights (Polyak)
        qat: {weights: int4, activations: int4:static}      # QuantConfig options (omit: no QAT)
        qat_options: {scales: learned, method: fst}          # QATConfig options
        distill: {task: 1.0, output: 1.0, temperature: 2.0, feature: 0.5, layers: {top.0: top.0}}
        checkpoint: ckpt/train.ckpt     # resumed when it exists (same options and starting weights), rewritten
                                        # every checkpoint_every steps (the CLI refuses one inside --out)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from torch import nn

from ..config import QuantConfig
from ..recipe.context import NO_CLI_TRAIN, Context
from ..recipe.options import build, non_default
from ..recipe.steps import Step
from ..select import matches_any
from .average import WeightAverage
from .checkpoint import check_fits, read_checkpoint, restore, save_checkpoint, state_fingerprint
from .distill import DistillConfig, Distiller
from .loop import check_optimizer, fit, supervised_loss
from .qat import QATConfig, abwr_penalty, convert_, prepare_qat_, set_observing

NESTED = {"qat": QuantConfig, "qat_options": QATConfig, "distill": DistillConfig}


@dataclass(frozen=True)
class TrainStep(Step):
    kind: ClassVar[str] = "train"
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    scale_lr: float | None = None  # learning rate of learned QAT scales / ranges (LSQ); default: lr
    optimizer: str = "adam"
    schedule: str = "cosine"
    warmup: int = 0  # steps of linear learning-rate warm-up before the schedule
    weight_decay: float = 0.0
    clip_grad: float | None = None
    ema: float | None = None  # decay of a moving average of the trained weights, swapped in at the end (average.py)
    qat: QuantConfig | None = None
    qat_options: QATConfig = QATConfig()
    convert: bool = True  # swap QAT layers for packed ones at the end
    distill: DistillConfig = DistillConfig()
    freeze: tuple[str, ...] | None = None  # parameter-name patterns kept fixed (e.g. "re:.*embeddings.*")
    dropout: bool = True  # False: dropout off while training (closer to the teacher's eval-mode outputs)
    freeze_ranges_after: int | None = None  # steps after which activation ranges stop moving
    checkpoint: str | None = None
    checkpoint_every: int = 50

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("recipe step 'train' needs exactly one of `steps` or `epochs`")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not 0 < self.epochs < math.inf:
            raise ValueError(f"epochs must be > 0 and finite, got {self.epochs}")
        if not (0 < self.lr < math.inf) or (self.scale_lr is not None and not 0 < self.scale_lr < math.inf):
            raise ValueError(f"lr and scale_lr must be > 0 and finite, got {self.lr} / {self.scale_lr}")
        check_optimizer(self.clip_grad, self.weight_decay, unset="omitted")
        if self.optimizer not in ("adam", "sgd") or self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optimizer must be adam or sgd and schedule constant or cosine, got "
                             f"{self.optimizer!r} / {self.schedule!r}")
        if self.warmup < 0 or (self.steps is not None and self.warmup >= self.steps):
            raise ValueError(f"warmup must be >= 0 and below steps, got {self.warmup}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be in (0, 1), got {self.ema}")
        if self.freeze_ranges_after is not None and self.freeze_ranges_after < 0:
            raise ValueError(f"freeze_ranges_after must be >= 0, got {self.freeze_ranges_after}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    @classmethod
    def from_options(cls, opts: Mapping[str, Any] | None) -> "TrainStep":
        if opts is not None and not isinstance(opts, Mapping):
            raise ValueError(f"options of recipe step 'train' must be a mapping, got {opts!r}")
        opts = dict(opts or {})
        nested = {k: build(c, opts.pop(k), f"option {k!r} of recipe step 'train'")
                  for k, c in NESTED.items() if opts.get(k) is not None}
        opts.pop("qat", None)
        step = build(cls, opts, "recipe step 'train'")
        return dataclasses.replace(step, **nested)

    def to_dict(self) -> dict[str, Any]:
        d = non_default(dataclasses.replace(self, qat=None, qat_options=QATConfig(), distill=DistillConfig()))
        if self.qat is not None:
            d["qat"] = {k: v for k, v in self.qat.to_dict().items() if v != getattr(QuantConfig, k, None) or k == "weights"}
        for key in ("qat_options", "distill"):
            sub = non_default(getattr(self, key))
            if sub:
                d[key] = sub
        return {"train": d}

    def total_steps(self, n_batches: int) -> int:
        return self.steps if self.steps is not None else max(1, math.ceil(self.epochs * n_batches))

    def run(self, model: nn.Module, ctx: Context) -> dict[str, Any]:
        if not ctx.train:
            raise ValueError(f"recipe step 'train' needs training data (compress(..., train=batches); {NO_CLI_TRAIN})")
        data = list(ctx.train)
        teacher = ctx.reference if self.distill.needs_teacher else None
        if self.distill.needs_teacher and teacher is None:
            raise ValueError("distillation needs the float teacher (ctx.reference); compress() keeps it")
        backup = copy.deepcopy(model)  # a failed step leaves the model as it was
        distiller = None
        dropouts = {m: m.p for m in model.modules() if isinstance(m, nn.Dropout)} if not self.dropout else {}
        try:
            for m in dropouts:
                m.p = 0.0
            if self.qat is not None:
                calib = ctx.calib or [_inputs(b) for b in data[:8]]
                prepare_qat_(model, self.qat, self.qat_options, calib=calib)
            if teacher is not None:
                distiller = Distiller(teacher, model, self.distill, example=_inputs(data[0]))
            result = self._fit(model, data, distiller, ctx)
            converted = self.qat is not None and self.convert
            if converted:
                convert_(model)
        except BaseException:
            model.__dict__.clear()
            model.__dict__.update(backup.__dict__)
            raise
        finally:
            if distiller is not None:
                distiller.close()
            for m, p in dropouts.items():
                m.p = p
        ctx.report("train", **result, converted=converted)
        return result

    def _loss(self, distiller: Distiller | None):
        task = self.distill.task
        abwr = self.qat_options.abwr if self.qat is not None else 0.0

        def loss(model, batch):
            out = distiller.loss(model, batch) if distiller is not None else task * supervised_loss(model, batch)
            return out + abwr * abwr_penalty(model) if abwr else out

        return loss

    def _fit(self, model: nn.Module, data: list, distiller: Distiller | None, ctx: Context) -> dict[str, Any]:
        steps = self.total_steps(len(data))
        names = [n for n, _ in model.named_parameters()]
        unmatched = [p for p in self.freeze or () if not any(matches_any(n, [p]) for n in names)]
        if unmatched:
            raise ValueError(f"freeze pattern(s) {unmatched} match no parameter of the model")
        params = [p for n, p in model.named_parameters() if p.requires_grad and not matches_any(n, self.freeze)]
        if self.scale_lr is not None:  # quantizer step sizes get their own (usually much smaller) learning rate
            ids = {id(p) for n, p in model.named_parameters() if _quantizer_param(n)}
            params = [p for p in params if id(p) not in ids] + [
                {"params": [p for p in params if id(p) in ids], "lr": self.scale_lr}]
        extra = {"distiller": distiller} if distiller is not None else {}
        average = None
        if self.ema is not None:  # the model's trained parameters only (not the distiller's projections)
            trained = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
            average = extra["average"] = WeightAverage(trained, self.ema)
        if distiller is not None:
            params += list(distiller.parameters())
        start, opt_state = 0, None
        path = Path(self.checkpoint) if self.checkpoint else None
        if path is not None and path.is_dir():
            raise ValueError(f"checkpoint {path} is a folder; give the path of a file (e.g. {path / 'train.ckpt'})")
        # the model this step starts from: a checkpoint resumes only the same start (an earlier step that changed,
        # e.g. other channels pruned, gives another)
        info = {"config": self.to_dict(), "steps": steps, "start": state_fingerprint(model) if path else None}
        if path is not None and path.exists():
            meta, tensors = read_checkpoint(path)
            if "start" not in meta["info"] and {**meta["info"], "start": info["start"]} == info:
                warnings.warn(f"checkpoint {path} was written before checkpoints recorded their starting weights: "
                              "resumed without that check", stacklevel=2)
            elif meta["info"] != info:
                options = meta["info"].get("config") != info["config"] or meta["info"].get("steps") != steps
                if not options:
                    check_fits(tensors, model, extra, path)  # another model altogether: says which tensors differ
                raise ValueError(f"checkpoint {path} was written by a train step with other "
                                 f"{'options' if options else 'starting weights (a step before it changed)'}; remove "
                                 "it or use another checkpoint path")
            if meta["step"] > steps:
                raise ValueError(f"checkpoint {path} is at step {meta['step']}, past the {steps} steps of this run")
            opt_state = restore(meta, tensors, model, extra, path)
            start = meta["step"]
        if self.freeze_ranges_after is not None:
            set_observing(model, start < self.freeze_ranges_after)
        estimate = Estimate(start, steps, time.perf_counter())

        def on_step(step: int, loss: float, opt) -> None:
            if average is not None:
                average.update()
            if self.freeze_ranges_after is not None and step == self.freeze_ranges_after:
                set_observing(model, False)
            estimate.update(step, time.perf_counter(), ctx.time_left())
            if path is not None and (step % self.checkpoint_every == 0 or step == steps):
                save_checkpoint(path, model, opt, step, info, extra)

        last_opt = {}
        result = fit(model, data, self._loss(distiller), steps, lr=self.lr, optimizer=self.optimizer,
                     weight_decay=self.weight_decay, params=params, clip_grad=self.clip_grad, progress=ctx.progress,
                     deadline=ctx.deadline, schedule=self.schedule, warmup=self.warmup, start_step=start,
                     optimizer_state=opt_state,
                     on_step=lambda s, l, o: (last_opt.update(opt=o, step=s), on_step(s, l, o)))
        if path is not None and result["stopped_early"] and last_opt:
            save_checkpoint(path, model, last_opt["opt"], last_opt["step"], info, extra)  # resume from here
        if average is not None:
            average.copy_to_params()
        result = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}  # JSON-safe
        return {**result, "total_steps": steps, "resumed_from": start, **estimate.out}


class Estimate:
    """The projected seconds of a run's steps (`estimated_seconds`) and, under a budget that is too short, the steps
    it allows (`budget_allows_steps`), refreshed at every step from the recent step rate: the first STARTUP steps
    (first forward / backward, optimizer state, kernel builds) are left out once there are more, then the rate is
    measured since a mark that moves on at 5, 10, 20, 40... steps done, so it follows a change of speed."""

    STARTUP = 5

    def __init__(self, start: int, steps: int, t0: float):
        self.start, self.steps, self.t0 = start, steps, t0
        self.ref = self.mark = (0, t0)  # (steps done, time): the rate is measured since `ref`
        self.out: dict[str, Any] = {}

    def update(self, step: int, now: float, left: float | None) -> None:
        done = step - self.start
        per = (now - self.ref[1]) / (done - self.ref[0])
        if done >= max(self.STARTUP, 2 * self.mark[0]):
            self.ref, self.mark = self.mark if self.mark[0] else (done, now), (done, now)
        self.out["estimated_seconds"] = now - self.t0 + per * (self.steps - step)
        allows = step + int(max(left, 0.0) / per) if left is not None and per > 0 else self.steps
        if allows < self.steps:
            self.out["budget_allows_steps"] = allows
        else:
            self.out.pop("budget_allows_steps", None)


def _quantizer_param(name: str) -> bool:
    """A learned QAT scale, zero point or activation range (named by the fake quantizers of QAT layers)."""
    owner, _, leaf = name.rpartition(".")
    return owner.split(".")[-1] in ("weight_quant", "input_quant") and leaf in ("scale", "zero", "lo", "hi")


def _inputs(batch: Any) -> Any:
    """The model input of a training batch: the first element of an (input, target) pair."""
    return batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
