"""`compress`: run a recipe's steps in order, then evaluate reference and compressed side by side."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any, Iterable

import torch
from torch import nn

from .calibrate import _one_line, as_batches, dry_run, evaluating
from .recipe import Context, load_recipe
from .inspect import MODE_MEANS, inspect
from .quant import set_kernels
from .recipe.context import Progress
from .report import Report



def compress(model: nn.Module, recipe: Any, calib: Iterable[Any] | None = None, eval: Any = None,
             progress: Progress | None = None, latency_input: Any = None, name: str | None = None,
             latency_repeats: int = 20, train: Any = None, budget_seconds: float | None = None,
             kernels: str | None = None) -> Report:
    """Compress `model` in place with `recipe` (a built-in name, a YAML path, a mapping or a Recipe) and
    return a Report. `eval` is an evaluation task (modelpress.evaluate.tasks); `calib` model inputs; `train`
    training batches for steps that train; `budget_seconds` a time budget long steps respect; `kernels` the
    kernel mode of the quantized layers, "memory" (packed weights only; the default) or "speed" (a dense float
    copy of a weight unless a packed kernel is at least 10 % faster than it); the report says which was used.

    The data are checked first (one calibration batch and one evaluation batch through the model), then the
    steps run on a working copy; only when all of them succeeded does `model` become the compressed model
    (in eval mode). A failed step leaves `model` exactly as it was."""
    from .evaluate import compare_latency, evaluate_pair, model_bytes
    from .prune import sparsity_summary

    recipe = load_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress needs an nn.Module, got {type(model).__name__}")
    t0 = time.perf_counter()
    if budget_seconds is not None and not (isinstance(budget_seconds, (int, float)) and budget_seconds > 0
                                           and math.isfinite(budget_seconds)):
        raise ValueError(f"budget_seconds must be a positive number of seconds (or None), got {budget_seconds!r}")
    for i, step in enumerate(recipe.steps):  # before any step runs (the target step checks it too, when it runs)
        if getattr(step, "max_drop", None) is not None and eval is None:
            raise ValueError(f"step {i + 1} ({step.kind}): max_drop={step.max_drop} needs evaluation data to measure "
                             "the drop: pass eval=")
    if kernels is not None:
        from .quant.kernels import check_mode

        check_mode(kernels)
    calib = as_batches(calib) if calib is not None else None
    if calib:
        dry_run(model, calib[0])
    if eval is not None:
        check_task(eval, model)
    flags = [(m, m.training) for m in model.modules()]
    work = copy.deepcopy(model).eval()
    reference = model.eval()  # the caller's float model, untouched by the steps: the reference and the teacher
    try:
        started = time.monotonic()  # the budget's start (the checks and the copy above are not in it)
        ctx = Context(calib=calib, train=train, eval=eval, reference=reference, progress=progress,
                      deadline=None if budget_seconds is None else started + budget_seconds)
        for step in recipe.steps:
            step.run(work, ctx)
            work.eval()
        steps_s = time.monotonic() - started
        if kernels is not None:
            set_kernels(work, True, mode=kernels)
        metrics: dict[str, dict] = {}
        notes = [f"step {i + 1} ({r.get('step')}) stopped early on the time budget at step "
                 f"{(r.get('resumed_from') or 0) + (r.get('steps') or 0)} of {r.get('total_steps')}"
                 for i, r in enumerate(ctx.records) if r.get("stopped_early")]
        notes += [f"step {i + 1} ({r.get('step')}): {r['estimated_costs']} of {r.get('costs')} layer costs are Hessian "
                  "estimates, not measurements (the time budget ran out during the sensitivity analysis"
                  f"{' that wrote the reused table' if r.get('sensitivity_reused') else ''})"
                  for i, r in enumerate(ctx.records) if r.get("estimated_costs")]
        if budget_seconds is not None and steps_s > budget_seconds:
            notes.append(f"the steps took {steps_s:.1f} s, over the time budget of {budget_seconds:.1f} s (long steps "
                         "stop or fall back to estimates on it; the others run to the end)")
        if eval is not None:
            cb = (lambda done, total: progress("evaluate", done, total or 0)) if progress else None
            metrics = evaluate_pair(eval, reference, work, progress=cb)
        else:
            notes.append("no evaluation data given: only size and latency were measured")
        ref_b, cmp_b = model_bytes(reference), model_bytes(work)
        if latency_input is None:
            latency_input = _first_input(eval, calib)
        latency = {}
        if latency_input is not None:
            lat = compare_latency(reference, work, latency_input, warmup=3, repeats=latency_repeats)
            latency = {"reference_ms": lat["reference"] * 1e3, "compressed_ms": lat["compressed"] * 1e3,
                       "speedup": lat["speedup"], "repeats": latency_repeats, "statistic": "median"}
        ref_i, cmp_i = inspect(reference), inspect(work)  # (after the runs: the kernel paths they chose)
        report = Report(
            model=name or type(model).__name__, recipe=recipe.to_dict(), metrics=metrics,
            size={"reference_bytes": ref_b, "compressed_bytes": cmp_b, "ratio": ref_b / max(cmp_b, 1),
                  "reference_params": ref_i.total_params, "compressed_params": cmp_i.total_params,
                  "sparsity": sparsity_summary(work)["sparsity"], "kernel_bytes": cmp_i.kernel_bytes},
            latency=latency, layers=cmp_i.to_dict()["layers"], seconds=time.perf_counter() - t0,
            task=type(eval).__name__ if eval is not None else "", notes=notes, steps=ctx.records,
            kernels=_kernel_info(work))
    except BaseException:
        for m, t in flags:  # the caller's model, with its own training flags
            m.training = t
        raise
    model.__dict__.clear()  # the caller's object becomes the compressed model; its old layers are left alone
    model.__dict__.update(work.__dict__)
    return report


def check_task(task: Any, model: nn.Module, what: str = "eval") -> None:
    """One evaluation batch through `model` and the task's own bookkeeping, before any long work."""
    from .evaluate.tasks import Task

    if not isinstance(task, Task):
        raise TypeError(f"{what} must be an evaluation task (modelpress.evaluate: ClassificationTask, "
                        f"LanguageModelTask, ...), got {type(task).__name__}")
    batches = task.batches()
    if not isinstance(batches, Sequence):
        raise TypeError(f"{what}: the evaluation data must be a list of batches (they are read more than once), "
                        f"got {type(batches).__name__}")
    if not len(batches):
        raise ValueError(f"{what}: the evaluation task has no data")
    try:
        inp, target = batches[0]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: the evaluation data are not (input, target) batches ({e})") from None
    try:
        task.check(batches)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    try:
        with evaluating(model), torch.inference_mode():
            out = task.forward(model, inp)
            rec = task.record(out, target)
            task.compare(out, out, target)
    except Exception as e:
        raise ValueError(f"{what}: the first evaluation batch does not run through the model or does not fit "
                         f"its targets ({_one_line(e)})") from e
    sizes = {k: len(v) for k, v in rec.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{what}: the first evaluation batch does not fit its targets "
                         f"({', '.join(f'{k}: {n} values' for k, n in sizes.items())})")


def _kernel_info(model: nn.Module) -> dict:
    from .quant import kernel_mode
    from .quant.kernels import cpu_info, tuning_enabled

    mode = kernel_mode(model)
    if mode is None:
        return {}
    return {"mode": mode, "mode_means": MODE_MEANS.get(mode, MODE_MEANS["mixed"]), "cpu": cpu_info().describe(),
            "tuning": "paths timed against float (cached)" if tuning_enabled() else "fixed rules (MODELPRESS_TUNE=0)"}


def _first_input(task, calib):
    """One batch for latency: the first evaluation input (tasks yield (input, target) pairs), else calib's."""
    if task is not None and len(task.batches()):
        return task.batches()[0][0]
    return calib[0] if calib else None
