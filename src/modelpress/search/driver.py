"""What a Target step does: analyse, allocate (or search), apply, check the drop, record it all for the report."""
from __future__ import annotations

import math
import time
from typing import Any

from torch import nn

from ..evaluate import model_bytes
from ..recipe.context import Context
from .allocate import Plan, allocate, best_uniform, uniform
from .compare import comparison_batches, complexity, prefer
from .probe import Probe, default_output, divergence_for
from .sensitivity import Sensitivity, analyse
from .target import Target, TargetError, check_reachable, now, quantized_copy, replace_contents, units_of

ANALYSIS_SHARE = 0.5  # of the time budget left, at most, for the sensitivity measurements


def split_calib(calib: list[Any], holdout: float) -> tuple[list[Any], list[Any]]:
    """(calibration batches for the methods, held-out batches for sensitivities): the last `holdout` share,
    at least one batch; with a single batch both are that batch."""
    if len(calib) == 1:
        return calib, calib
    k = min(len(calib) - 1, max(1, round(len(calib) * holdout)))
    return calib[:-k], calib[-k:]


def reach(target: Target, model: nn.Module, ctx: Context):
    t0 = time.perf_counter()
    calib = ctx.need_calib("target")
    task = ctx.eval
    reference = ctx.reference if ctx.reference is not None else model
    ref_bytes = model_bytes(reference)
    units, fixed = units_of(model, target)
    formats = target.candidate_formats()
    out_of_reach = None
    try:
        budget = check_reachable(target, units, formats, fixed, ref_bytes)
    except TargetError as e:
        if target.max_drop is None or task is None:
            raise  # refused before any work: the formats cannot reach the budget
        out_of_reach, budget = e, round(ref_bytes / e.reachable)  # which ratio the drop allows is measured below
    heldout = split_calib(calib, target.holdout)[1]  # sensitivities are measured on these only
    method = target.resolve_method(calib)

    probe = Probe(model, heldout, task.forward if task is not None else default_output, divergence_for(task))
    if target.sensitivity is not None:  # an earlier run's table (checked against these weights and formats)
        sens = Sensitivity.load(target.sensitivity)
        sens.check(units, formats, probe.kind, target.cost)
    else:
        left = ctx.time_left()
        sens = analyse(model, units, formats, probe, measure=target.cost == "measured", hessian=True,
                       progress=ctx.progress, deadline=None if left is None else now() + ANALYSIS_SHARE * left)
    costs = sens.costs(target.cost)
    plan = allocate(units, costs, budget, fixed, ref_bytes, method=method)
    plan.method_options = dict(target.method_options) if target.method_options else None
    scorer = None
    if task is not None and (target.max_drop is not None or target.search != "allocate"):
        from .score import Scorer

        scorer = Scorer(task, reference, target.metric, target.relative)
    study = None
    if target.search != "allocate":
        from .study import run_study

        study = run_study(target, model, units, costs, plan, budget, fixed, ref_bytes, calib, probe, scorer, ctx)
        plan = study.chosen
    # the plan is applied as its recipe would be rerun: the method sees every calibration batch. An allocated plan
    # is kept only if, on held-out data, it measures below the best uniform format in the budget beyond the noise
    plans, compare_probe, added = [plan], probe, 0
    if target.search == "allocate" and target.compare_uniform:
        u = best_uniform(units, costs, budget, fixed, ref_bytes, method)
        if u is not None and u.formats != plan.formats:
            u.method_options = plan.method_options
            plans.append(u)
            batches, added = comparison_batches(calib, heldout, ctx.train, target.compare_train)
            if added:
                compare_probe = Probe(model, batches, probe.output_fn, probe.kind, replay=False)
    plan, candidate, measured_cost, compared = pick_measured(model, plans, calib, compare_probe, ctx.progress,
                                                             confidence=target.tie_confidence, seed=target.seed)
    record: dict[str, Any] = {
        "target": target.describe(), "budget_bytes": budget, "reference_bytes": ref_bytes, "method": method,
        "plan": plan.to_dict(), "recipe": plan.to_recipe().to_dict(), "plan_yaml": plan.to_yaml(),
        "predicted_cost": plan.cost, "measured_cost": measured_cost, "cost_source": target.cost,
        "sensitivity": sens.to_dict(), "uniform": _uniform_table(units, formats, costs, fixed, ref_bytes),
        "heldout_batches": len(heldout), "calib_batches": len(calib), "compared": compared,
        "compare_train_batches": added, "tie_confidence": target.tie_confidence}
    if study is not None:
        record["study"] = study.summary()
    if scorer is not None:
        value = scorer.value(candidate)
        record["check"] = {"metric": scorer.metric, "reference": scorer.reference_value, "value": value,
                           "drop": scorer.drop(value), "max_drop": target.max_drop, "relative": target.relative}
        within = target.max_drop is not None and scorer.drop(value) <= target.max_drop + 1e-12
        if out_of_reach is not None and within:
            raise TargetError(f"{out_of_reach} (drop {scorer.drop(value):.4g} there)", out_of_reach.reachable)
        if target.max_drop is not None and not within:
            tried = [{"ratio": plan.ratio, "value": value, "drop": scorer.drop(value)}]
            best = _closest(target, model, units, costs, fixed, ref_bytes, calib, scorer, method, tried, ctx)
            raise _refusal(target, scorer, plan, value, best, out_of_reach)
    replace_contents(model, candidate)
    ctx.report("target", **record, seconds=time.perf_counter() - t0)
    return model


def pick_measured(model: nn.Module, plans: list[Plan], calib, probe: Probe, progress=None, make=None,
                  confidence: float = 0.5, seed: int = 0):
    """Each plan applied to a copy of `model` (by `make(plan)` if given) and its divergence measured per sample on
    the probe's held-out batches. The simplest plan (fewest distinct formats; the earlier one among equals) is
    taken first; each other plan replaces the one taken only if a paired bootstrap puts it ahead in at least
    `confidence` of the resamples (compare.prefer). (plan, quantized copy, its mean cost, [{plan, ratio,
    predicted_cost, measured_cost, samples, chosen, and for a challenger: against, mean_difference, share_ahead}])."""
    rows: list[dict[str, Any]] = [{} for _ in plans]
    best = None  # (index, quantized copy, per-sample costs)
    for i in sorted(range(len(plans)), key=lambda k: complexity(plans[k].formats)):
        p = plans[i]
        q = make(p) if make is not None else quantized_copy(model, p, calib, progress)
        per = probe.per_sample(q)
        rows[i] = {"plan": _label(p), "ratio": p.ratio, "predicted_cost": p.cost, "measured_cost": float(per.mean()),
                   "samples": per.numel()}
        if best is None:
            best = (i, q, per)
            continue
        replace, diff, share = prefer(per, best[2], confidence, seed=seed)
        rows[i].update(against=rows[best[0]]["plan"], mean_difference=diff, share_ahead=share)
        if replace:
            best = (i, q, per)
        else:
            del q
    for i, row in enumerate(rows):
        row["chosen"] = i == best[0]
    return plans[best[0]], best[1], rows[best[0]]["measured_cost"], rows


def _label(plan: Plan) -> str:
    fmts = set(plan.formats.values())
    return f"uniform {fmts.pop()}" if len(fmts) == 1 else "allocated"


def _uniform_table(units, formats, costs, fixed, ref_bytes) -> list[dict[str, Any]]:
    """Predicted bytes and cost of every unit in one format (where that format is offered to every unit)."""
    rows = []
    for f in formats:
        if all(f in costs.get(u.name, {}) for u in units):
            p = uniform(units, f, fixed, ref_bytes, costs)
            rows.append({"format": f, "nbytes": p.nbytes, "ratio": p.ratio, "predicted_cost": p.cost})
    return rows


def _closest(target, model, units, costs, fixed, ref_bytes, calib, scorer, method, tried, ctx, steps: int = 6):
    """The largest ratio (plans allocated at geometric midpoints between float and the target's) whose drop stays
    within max_drop, as far as the steps and the time budget allow: (ratio, drop) or None."""
    lo, hi = 1.0, tried[0]["ratio"]
    best = None
    for _ in range(steps):
        if ctx.time_left() is not None and ctx.time_left() <= 0:
            break
        mid = math.sqrt(lo * hi)
        plan = allocate(units, costs, int(ref_bytes / mid), fixed, ref_bytes, method=method)
        if plan is None:
            hi = mid
            continue
        value = scorer.value(quantized_copy(model, plan, calib))
        d = scorer.drop(value)
        tried.append({"ratio": plan.ratio, "value": value, "drop": d})
        if d <= target.max_drop:
            lo, best = mid, (plan.ratio, d)
        else:
            hi = mid
        if hi / lo < 1.02:
            break
    return best


def _refusal(target: Target, scorer, plan: Plan, value: float, best, out_of_reach=None) -> TargetError:
    rel = " (relative)" if target.relative else ""
    head = f"target {target.describe()} not met: " + (
        f"the candidate formats reach ÷{plan.ratio:.2f} at most, and " if out_of_reach is not None else "")
    msg = (f"{head}at ÷{plan.ratio:.2f} {scorer.metric} is {value:.4g} against "
           f"{scorer.reference_value:.4g} for the float model, a drop of {scorer.drop(value):.4g}{rel} > "
           f"{target.max_drop:.4g}; ")
    if best is None:
        msg += "no smaller ratio tried stays within the allowed drop"
        return TargetError(msg, None)
    return TargetError(msg + f"closest reachable ratio ÷{math.floor(best[0] * 100) / 100:.2f} (drop {best[1]:.4g})",
                       best[0])

