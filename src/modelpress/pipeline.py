"""`compress`: run a recipe's steps in order, then evaluate reference and compressed side by side."""
from __future__ import annotations

import copy
import time
from typing import Any, Iterable

from torch import nn

from .recipe import Context, load_recipe
from .inspect import inspect
from .recipe.context import Progress
from .report import Report



def compress(model: nn.Module, recipe: Any, calib: Iterable[Any] | None = None, eval: Any = None,
             progress: Progress | None = None, latency_input: Any = None, name: str | None = None,
             latency_repeats: int = 20, train: Any = None, budget_seconds: float | None = None) -> Report:
    """Compress `model` in place with `recipe` (a built-in name, a YAML path, a mapping or a Recipe) and
    return a Report. `eval` is an evaluation task (modelpress.evaluate.tasks); `calib` model inputs; `train`
    training batches for steps that train; `budget_seconds` a time budget long steps respect."""
    from .evaluate import compare_latency, evaluate_pair, model_bytes

    recipe = load_recipe(recipe)
    t0 = time.perf_counter()
    model.eval()
    reference = copy.deepcopy(model)
    ctx = Context(calib=list(calib) if calib is not None else None, train=train, eval=eval, reference=reference,
                  progress=progress,
                  deadline=None if budget_seconds is None else time.monotonic() + budget_seconds)
    calib = ctx.calib
    for step in recipe.steps:
        step.run(model, ctx)
        model.eval()
    metrics: dict[str, dict] = {}
    notes = []
    if eval is not None:
        cb = (lambda done, total: progress("evaluate", done, total or 0)) if progress else None
        metrics = evaluate_pair(eval, reference, model, progress=cb)
    else:
        notes.append("no evaluation data given: only size and latency were measured")
    ref_b, cmp_b = model_bytes(reference), model_bytes(model)
    ref_i, cmp_i = inspect(reference), inspect(model)
    from .prune import sparsity_summary
    if latency_input is None:
        latency_input = _first_input(eval, calib)
    latency = {}
    if latency_input is not None:
        lat = compare_latency(reference, model, latency_input, warmup=3, repeats=latency_repeats)
        latency = {"reference_ms": lat["reference"] * 1e3, "compressed_ms": lat["compressed"] * 1e3,
                   "speedup": lat["speedup"], "repeats": latency_repeats, "statistic": "median"}
    return Report(
        model=name or type(model).__name__, recipe=recipe.to_dict(), metrics=metrics,
        size={"reference_bytes": ref_b, "compressed_bytes": cmp_b, "ratio": ref_b / max(cmp_b, 1),
              "reference_params": ref_i.total_params, "compressed_params": cmp_i.total_params,
              "sparsity": sparsity_summary(model)["sparsity"]},
        latency=latency, layers=cmp_i.to_dict()["layers"], seconds=time.perf_counter() - t0,
        task=type(eval).__name__ if eval is not None else "", notes=notes, steps=ctx.records)


def _first_input(task, calib):
    """One batch for latency: the first evaluation input (tasks yield (input, target) pairs), else calib's."""
    if task is not None and len(task.batches()):
        return task.batches()[0][0]
    return calib[0] if calib else None
