"""`compress`: run a recipe's steps in order, then evaluate reference and compressed side by side."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterable

from torch import nn

from .config import load_recipe
from .inspect import inspect
from .report import Report

Progress = Callable[[str, int, int], None]  # (stage, done, total or 0)


def compress(model: nn.Module, recipe: Any, calib: Iterable[Any] | None = None, eval: Any = None,
             progress: Progress | None = None, latency_input: Any = None, name: str | None = None,
             latency_repeats: int = 20) -> Report:
    """Compress `model` in place with `recipe` (a built-in name, a YAML path, a mapping or a Recipe) and
    return a Report. `eval` is an evaluation task (modelpress.evaluate.tasks); `calib` model inputs."""
    from .evaluate import compare_latency, evaluate_pair, model_bytes

    recipe = load_recipe(recipe)
    t0 = time.perf_counter()
    model.eval()
    reference = copy.deepcopy(model)
    calib = list(calib) if calib is not None else None
    for step in recipe.steps:
        step.run(model, calib=calib, progress=progress)
    model.eval()
    metrics: dict[str, dict] = {}
    notes = []
    if eval is not None:
        cb = (lambda done, total: progress("evaluate", done, total or 0)) if progress else None
        metrics = evaluate_pair(eval, reference, model, progress=cb)
    else:
        notes.append("no evaluation data given: only size and latency were measured")
    ref_b, cmp_b = model_bytes(reference), model_bytes(model)
    if latency_input is None:
        latency_input = _first_input(eval, calib)
    latency = {}
    if latency_input is not None:
        lat = compare_latency(reference, model, latency_input, warmup=3, repeats=latency_repeats)
        latency = {"reference_ms": lat["reference"] * 1e3, "compressed_ms": lat["compressed"] * 1e3,
                   "speedup": lat["speedup"], "repeats": latency_repeats, "statistic": "median"}
    return Report(
        model=name or type(model).__name__, recipe=recipe.to_dict(), metrics=metrics,
        size={"reference_bytes": ref_b, "compressed_bytes": cmp_b, "ratio": ref_b / max(cmp_b, 1)},
        latency=latency, layers=inspect(model).to_dict()["layers"], seconds=time.perf_counter() - t0,
        task=type(eval).__name__ if eval is not None else "", notes=notes)


def _first_input(task, calib):
    """One batch for latency: the first evaluation input (tasks yield (input, target) pairs), else calib's."""
    if task is not None and len(task.batches()):
        return task.batches()[0][0]
    return calib[0] if calib else None
