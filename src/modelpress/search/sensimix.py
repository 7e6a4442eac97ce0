"""SensiMix (Piao et al., 2022) for BERT-like models: the sensitive part in 8-bit, the rest in 1-bit.

The sensitive part is the lower encoder blocks (`select="lower"`, as in the paper: the first blocks in 8-bit, the
upper ones in 1-bit) or the layers a sensitivity analysis ranks highest (`select="sensitivity"`: an exact-bytes
knapsack between the two formats, costs measured on held-out calibration batches). How much is 8-bit is given
(`high_blocks`) or follows from a target `ratio` (as much 8-bit as fits). Embedding tables get their own row-wise
format (`embeddings`), layers outside the blocks (pooler, heads) the high one. Activations are int8 (dynamic,
per token) by default, so 1-bit layers with per-channel scales run on the int8 GEMM over their +-1 matrix
(quant/kernels/int1.py) and 8-bit ones on the int8 kernel, not through dequantization.

With `train_steps` (and training batches), the plan is not rounded once: the model gets QAT layers in the plan's
formats (int1 layers with SensiMix's abs-mean scale and clipped straight-through gradient, modelpress.train.qat),
is trained that many steps distilling the float model's outputs (cosine for embeddings, KL for logits) on the
training split, then converted to the same packed layers.

`- sensimix: {ratio: 8}` in a recipe; the plan is recorded for the report like a target's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..calibrate import find_blocks
from ..evaluate import model_bytes
from ..formats import parse_format
from ..recipe.context import NO_CLI_TRAIN, Context
from ..recipe.steps import Step
from .allocate import Plan, allocate
from .target import TargetError, apply_plan, units_of
from .units import Unit

SELECT = ("lower", "sensitivity")


@dataclass(frozen=True)
class SensiMix(Step):
    kind: ClassVar[str] = "sensimix"
    high: str = "int8"
    low: str = "int1"
    embeddings: str | None = "int4"
    ratio: float | None = None
    high_blocks: int | None = None
    select: str = "lower"
    activations: str | None = "int8"
    method: str = "rtn"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    train_steps: int = 0
    train_lr: float = 1e-4

    def __post_init__(self):
        for f in (self.high, self.low) + ((self.embeddings,) if self.embeddings else ()):
            parse_format(f)
        if self.select not in SELECT:
            raise ValueError(f"sensimix select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.ratio is None and (self.high_blocks is None or self.select != "lower"):
            raise ValueError("sensimix needs a ratio (or high_blocks with select='lower')")
        if self.ratio is not None and self.ratio < 1:
            raise ValueError(f"sensimix ratio must be >= 1, got {self.ratio}")
        if self.high_blocks is not None and self.high_blocks < 0:
            raise ValueError(f"sensimix high_blocks must be >= 0, got {self.high_blocks}")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                object.__setattr__(self, name, (v,))
        if self.train_steps < 0 or self.train_lr <= 0:
            raise ValueError(f"sensimix train_steps must be >= 0 and train_lr > 0, got {self.train_steps}, "
                             f"{self.train_lr}")

    def run(self, model: nn.Module, ctx: Context):
        t0 = time.perf_counter()
        if self.train_steps and not ctx.train:
            raise ValueError(f"sensimix train_steps needs training data (compress(..., train=batches); {NO_CLI_TRAIN})")
        reference = ctx.reference if ctx.reference is not None else model
        ref_bytes = model_bytes(reference)
        units, fixed = units_of(model, self)
        plan = self.plan(model, units, fixed, ref_bytes, ctx)
        trained = None
        if self.train_steps:
            trained = self._train(model, plan, reference, ctx)
        else:
            apply_plan(model, plan, ctx.calib, ctx.progress)
        ctx.report("sensimix", plan=plan.to_dict(), recipe=plan.to_recipe().to_dict(), plan_yaml=plan.to_yaml(),
                   high=self.high, low=self.low, select=self.select, train=trained, seconds=time.perf_counter() - t0)
        return model

    def _train(self, model: nn.Module, plan: Plan, reference: nn.Module, ctx: Context) -> dict:
        """QAT in the plan's formats, distilling `reference`'s outputs, then converted (the train step's run)."""
        from dataclasses import replace

        from ..train.distill import DistillConfig
        from ..train.qat import QATConfig
        from ..train.step import TrainStep
        from .probe import divergence_for

        loss = "cosine" if divergence_for(ctx.eval) == "cosine" else "auto"
        step = TrainStep(steps=self.train_steps, lr=self.train_lr, qat=plan.to_recipe().steps[0].config,
                         qat_options=QATConfig(sensimix=True), dropout=False,
                         distill=DistillConfig(task=0.0, output=1.0, output_loss=loss))
        sub = replace(ctx, reference=reference, records=[])
        result = step.run(model, sub)
        model.eval()
        return {k: v for k, v in result.items() if k in ("steps", "total_steps", "first_loss", "last_loss",
                                                         "seconds", "stopped_early")}

    def plan(self, model: nn.Module, units: list[Unit], fixed: int, ref_bytes: int, ctx: Context) -> Plan:
        blocks = [n for n, _ in find_blocks(model)]
        if not blocks:
            raise ValueError("sensimix needs a model of repeated blocks (encoder/decoder layers); use a target instead")
        fixed_fmt = {u.name: (self.embeddings if u.kind == "embedding" else self.high) for u in units if u.block is None}
        inside = [u for u in units if u.block is not None]
        budget = int(ref_bytes / self.ratio) if self.ratio is not None else None
        if self.select == "sensitivity":
            return self._by_sensitivity(model, units, inside, fixed_fmt, fixed, ref_bytes, budget, ctx)
        if self.high_blocks is not None:
            k = min(self.high_blocks, len(blocks))
        else:  # as many lower blocks in the high format as the budget allows
            fit = [k for k in range(len(blocks) + 1)
                   if self._make(units, fixed_fmt, set(blocks[:k]), fixed, ref_bytes).nbytes <= budget]
            if not fit:
                raise self._out_of_reach(units, fixed_fmt, fixed, ref_bytes)
            k = max(fit)
        plan = self._make(units, fixed_fmt, set(blocks[:k]), fixed, ref_bytes)
        plan.extra["high_blocks"] = blocks[:k]
        return plan

    def _make(self, units, fixed_fmt, high_blocks: set[str], fixed: int, ref_bytes: int) -> Plan:
        formats = {u.name: fixed_fmt.get(u.name, self.high if u.block in high_blocks else self.low) for u in units}
        return Plan(formats=formats, members={u.name: list(u.members) for u in units},
                    nbytes=fixed + sum(u.nbytes(formats[u.name]) for u in units), reference_bytes=ref_bytes,
                    cost=float("nan"), method=self.method, activations=self.activations)

    def _by_sensitivity(self, model, units, inside, fixed_fmt, fixed, ref_bytes, budget, ctx) -> Plan:
        from .driver import split_calib
        from .probe import Probe, default_output, divergence_for
        from .sensitivity import analyse

        if budget is None:
            raise ValueError("sensimix select='sensitivity' needs a ratio")
        calib = ctx.need_calib("sensimix")
        task = ctx.eval
        probe = Probe(model, split_calib(calib, 0.25)[1], task.forward if task is not None else default_output,
                      divergence_for(task))
        sens = analyse(model, inside, [self.high, self.low], probe, blocks=False, progress=ctx.progress)
        costs = {u.name: {f: c for f, c in sens.costs().get(u.name, {}).items()} for u in inside}
        for u in units:  # the layers outside the blocks keep their fixed format (one option, no cost)
            if u.name in fixed_fmt:
                costs[u.name] = {fixed_fmt[u.name]: 0.0} if fixed_fmt[u.name] else {}
        plan = allocate(units, costs, budget, fixed, ref_bytes, allow_float=False, method=self.method,
                        activations=self.activations)
        if plan is None:
            raise self._out_of_reach(units, fixed_fmt, fixed, ref_bytes)
        plan.extra["sensitivity"] = sens.to_dict()
        return plan

    def _out_of_reach(self, units, fixed_fmt, fixed, ref_bytes) -> TargetError:
        low = self._make(units, fixed_fmt, set(), fixed, ref_bytes)
        return TargetError(f"sensimix ÷{self.ratio:g} is out of reach even with every block in {self.low}: closest "
                           f"reachable ratio ÷{low.ratio:.2f}", low.ratio)
