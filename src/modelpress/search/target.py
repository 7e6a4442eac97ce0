"""`Target`: reach a compression ratio (or a size in bytes, or an average bit width) with the least loss.

A Target is a recipe step (`- target: {ratio: 8, max_drop: 0.01}` in YAML; `mp.compress(model, mp.Target(ratio=8),
calib=..., eval=...)` in Python). Its run: find the quantizable weights, measure their sensitivity on a held-out
part of the calibration data, allocate a format per weight so the true bytes fit (or search, study.py), apply
the plan and measure the task metric. A ratio is a floor: a plan smaller than the budget meets it too. When the
allowed drop is exceeded, other plans in the budget are measured (the drop is not monotone in the ratio), and the
first within the drop is returned; failing that it looks for the largest ratio that stays within it and refuses
with the largest found among the plans measured (`TargetError.reachable`); the model is left as it was.
What it did goes to the report: the sensitivity table, the plan (also as a recipe to edit and rerun), the
uniform formats' predicted bytes and costs, the ratios tried, and the study's trials.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from ..formats import parse_format
from ..recipe.context import Context
from ..recipe.steps import Step
from .units import DEFAULT_FORMATS, Unit, find_units, model_fixed_bytes, options_for

SEARCHES = ("allocate", "optuna", "random")
COSTS = ("measured", "hessian")


class TargetError(ValueError):
    """The target cannot be met; `reachable` is the closest ratio that can (None if none was found), the largest
    among the plans measured; `tried`: those plans' ratios, metric values and drops."""

    def __init__(self, message: str, reachable: float | None = None, tried: list | None = None):
        super().__init__(message)
        self.reachable = reachable
        self.tried = tried or []


@dataclass(frozen=True)
class Target(Step):
    """What to reach: exactly one of `ratio` (reference bytes / compressed bytes), `size_bytes` (true bytes of the
    whole model) or `avg_bits` (stored bits per quantizable weight, scales included). `max_drop`: the allowed drop
    of `metric` (default: the task's headline metric) from the float model, absolute, or relative with
    `relative=True` or a string such as "5%". `formats`: candidate weight formats; `method`: how codes are chosen
    ("auto": gptq with calibration data, else rtn); `search`: "allocate" (knapsack over the sensitivity table),
    "optuna" or "random" (a study over per-layer formats and methods, `trials` trials, stored in `storage`);
    `cost`: "measured" sensitivities or the "hessian" estimate; `holdout`: the share of calibration batches kept
    for measuring sensitivities; `sensitivity`: a sensitivity.json of an earlier run on the same model to reuse
    instead of measuring again (checked against its weights and formats); `compare_uniform`: an allocated plan is
    checked against the best uniform format in the budget on held-out data (the held-out calibration batches and
    up to `compare_train` training batches, their calibration rows left out) and kept only if a paired
    bootstrap over the held-out samples puts its divergence below the uniform plan's with at least
    `tie_confidence` (compare.py; 0.5 is close to comparing the means; at a tie the uniform plan is returned)."""

    kind: ClassVar[str] = "target"
    ratio: float | None = None
    size_bytes: int | None = None
    avg_bits: float | None = None
    max_drop: float | str | None = None
    relative: bool = False
    metric: str | None = None
    formats: tuple[str, ...] | None = None
    method: str = "auto"
    method_options: Mapping[str, Any] | None = None
    search: str = "allocate"
    trials: int | None = None
    storage: str | None = None
    study_name: str | None = None
    cost: str = "measured"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    holdout: float = 0.25
    seed: int = 0
    sensitivity: str | None = None
    compare_uniform: bool = True
    compare_train: int = 8
    tie_confidence: float = 0.95

    def __post_init__(self):
        given = [k for k in ("ratio", "size_bytes", "avg_bits") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a Target needs exactly one of ratio, size_bytes, avg_bits"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 1 <= self.ratio < math.inf):
            raise ValueError(f"target ratio must be a finite number >= 1, got {self.ratio!r}")
        if self.size_bytes is not None and not (isinstance(self.size_bytes, int) and self.size_bytes > 0):
            raise ValueError(f"target size_bytes must be a positive integer, got {self.size_bytes!r}")
        if self.avg_bits is not None and not (isinstance(self.avg_bits, (int, float)) and 0 < self.avg_bits <= 32):
            raise ValueError(f"target avg_bits must be in (0, 32], got {self.avg_bits!r}")
        if isinstance(self.max_drop, str):
            text = self.max_drop.strip()
            try:
                value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise ValueError(f"max_drop must be a number or a percentage such as '5%', got {self.max_drop!r}") from None
            object.__setattr__(self, "max_drop", value)
            object.__setattr__(self, "relative", self.relative or text.endswith("%"))
        drop = self.max_drop
        if drop is not None and not (isinstance(drop, (int, float)) and 0 <= drop < math.inf):
            raise ValueError(f"max_drop must be a finite number >= 0, got {self.max_drop!r}")
        for name in ("formats", "include", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                object.__setattr__(self, name, (v,))
            elif v is not None:
                object.__setattr__(self, name, tuple(v))
        for f in self.formats or ():
            parse_format(f)
        if self.formats is not None and not self.formats:
            raise ValueError("give at least one candidate format")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.method != "auto":
            from ..algorithms import get_method

            get_method(self.method)
        if self.trials is not None and self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.sensitivity is not None and not os.path.isfile(str(self.sensitivity)):
            raise ValueError(f"sensitivity file {self.sensitivity!r} does not exist")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if not (isinstance(self.compare_train, int) and self.compare_train >= 0):
            raise ValueError(f"compare_train must be a number of batches >= 0, got {self.compare_train!r}")
        if not 0 <= self.tie_confidence < 1:
            raise ValueError(f"tie_confidence must be in [0, 1), got {self.tie_confidence}")

    # ---- what the target means in bytes ------------------------------------------------------------------

    def budget(self, reference_bytes: int, units: list[Unit], fixed_bytes: int) -> int:
        if self.ratio is not None:  # + 1e-6: a ratio reported as reference / n bytes gives back exactly n
            return int(reference_bytes / self.ratio + 1e-6)
        if self.size_bytes is not None:
            return self.size_bytes
        return fixed_bytes + int(self.avg_bits * sum(u.params for u in units) / 8)

    def describe(self) -> str:
        if self.ratio is not None:
            what = f"÷{self.ratio:g}"
        elif self.size_bytes is not None:
            what = f"{self.size_bytes:,} bytes"
        else:
            what = f"{self.avg_bits:g} bits per weight"
        if self.max_drop is not None:
            what += f" within a drop of {self.max_drop:.4g}{' (relative)' if self.relative else ''}"
        return what

    def candidate_formats(self) -> list[str]:
        return [str(parse_format(f)) for f in (self.formats or DEFAULT_FORMATS)]

    def resolve_method(self, calib) -> str:
        if self.method != "auto":
            return self.method
        return "gptq" if calib else "rtn"

    # ---- the step -----------------------------------------------------------------------------------------

    def run(self, model: nn.Module, ctx: Context):
        from .driver import reach

        return reach(self, model, ctx)


def check_reachable(target: Target, units: list[Unit], formats: list[str], fixed: int, reference_bytes: int) -> int:
    """The byte budget, after checking that the smallest candidates fit it (TargetError with the best ratio)."""
    budget = target.budget(reference_bytes, units, fixed)
    smallest = smallest_bytes(units, formats, fixed)
    if smallest > budget:
        best = reference_bytes / smallest
        budget_words = "" if target.size_bytes is not None else f" ({budget:,} bytes)"
        raise TargetError(f"target {target.describe()}{budget_words} is out of reach: every layer in its "
                          f"smallest candidate format (of {', '.join(formats)}) gives {smallest:,} bytes; closest "
                          f"reachable ratio ÷{math.floor(best * 100) / 100:.2f}", reachable=best)
    return budget


def smallest_bytes(units: list[Unit], formats: list[str], fixed: int) -> int:
    """The true bytes of the model with every unit in its smallest candidate (or float, if smaller)."""
    return fixed + sum(min([u.float_bytes] + [u.nbytes(f) for f in options_for(u, formats)]) for u in units)


def apply_plan(model: nn.Module, plan, calib, progress=None) -> nn.Module:
    """Quantize `model` in place with `plan` (its recipe's quantize step), quietly."""
    step = plan.to_recipe().steps[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step.run(model, Context(calib=calib, progress=progress))
    return model.eval()


def quantized_copy(model: nn.Module, plan, calib, progress=None) -> nn.Module:
    return apply_plan(copy.deepcopy(model).eval(), plan, calib, progress)


def replace_contents(model: nn.Module, other: nn.Module) -> None:
    """`model` becomes `other` (the same object, other's modules and tensors)."""
    model.__dict__.clear()
    model.__dict__.update(other.__dict__)


def units_of(model: nn.Module, target: Target) -> tuple[list[Unit], int]:
    units = find_units(model, target.include, target.exclude)
    if not units:
        raise ValueError("the model has no layer that can be quantized (check include/exclude)")
    return units, model_fixed_bytes(model, units)


def now() -> float:
    return time.monotonic()
