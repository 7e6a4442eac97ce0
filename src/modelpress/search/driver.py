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
from .target import (Target, TargetError, check_reachable, now, quantized_copy, replace_contents, smallest_bytes,
                     units_of)

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
    task = ctx.eval
    if target.max_drop is not None and task is None:  # (it was ignored: the run then reported "within a drop of 0")
        raise ValueError(f"max_drop={target.max_drop} needs evaluation data to measure the drop: pass eval= (on the "
                         "command line zoo models bring theirs; other models have none, so give no --max-drop)")
    calib = ctx.need_calib("target")
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
    # measured costs the time budget left as Hessian estimates (this run's analysis, or the reused table's)
    estimated = sum(map(len, sens.estimated.values())) if target.cost == "measured" else 0
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
        "predicted_cost": plan.cost, "measured_cost": measured_cost,
        "cost_source": "measured+hessian" if estimated else target.cost,
        "estimated_costs": estimated, "costs": sum(map(len, costs.values())),
        "sensitivity_reused": target.sensitivity is not None,
        "sensitivity": sens.to_dict(), "uniform": _uniform_table(units, formats, costs, fixed, ref_bytes),
        "heldout_batches": len(heldout), "calib_batches": len(calib), "compared": compared,
        "compare_train_batches": added, "tie_confidence": target.tie_confidence}
    if study is not None:
        record["study"] = study.summary()
    if scorer is not None:
        value = scorer.value(candidate)
        if target.max_drop is not None and scorer.drop(value) > target.max_drop + 1e-12:
            tried = [_row(plan, value, scorer, "chosen")] + _study_rows(study, scorer, ref_bytes)
            evaluate = _evaluator(model, calib, scorer, tried, plan)
            met = _meet(target, [p for p in plans if p is not plan], units, costs, fixed, ref_bytes, budget, formats,
                        method, plan.method_options, evaluate, ctx, higher=out_of_reach is None)
            if met is None:
                _closest(target, units, costs, fixed, ref_bytes, method, evaluate, tried, ctx)
            if met is None or out_of_reach is not None:
                raise _refusal(target, scorer, plan, value, tried, out_of_reach)
            record["missed"] = {"plan": record["plan"], "value": value, "drop": scorer.drop(value)}
            # the comparison's pick went over the drop: "chosen" marks the plan returned if it was compared (the
            # uniform plan, tried first), else none (the one returned is in "tried")
            record["compared"] = [{**r, "chosen": p is met[0], "over_max_drop": r["chosen"]}
                                  for p, r in zip(plans, compared)]
            plan, candidate, value = met
            record.update(plan=plan.to_dict(), recipe=plan.to_recipe().to_dict(), plan_yaml=plan.to_yaml(),
                          predicted_cost=plan.cost, measured_cost=float(compare_probe.per_sample(candidate).mean()))
            record["tried"] = tried
        record["check"] = {"metric": scorer.metric, "reference": scorer.reference_value, "value": value,
                           "drop": scorer.drop(value), "max_drop": target.max_drop, "relative": target.relative}
        if out_of_reach is not None and target.max_drop is not None:  # within the drop at the formats' limit
            raise TargetError(f"{out_of_reach} (drop {scorer.drop(value):.4g} there)", out_of_reach.reachable)
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


AT_BUDGET_STEPS = 3  # plans in the budget measured when the chosen one exceeds max_drop (then _closest's 6 below)


def _row(plan: Plan, value: float, scorer, source: str) -> dict[str, Any]:
    return {"ratio": plan.ratio, "nbytes": plan.nbytes, "plan": _label(plan), "value": value,
            "drop": scorer.drop(value), "source": source}


def _study_rows(study, scorer, ref_bytes: int) -> list[dict[str, Any]]:
    """The study's trials as measured plans (they were scored on the same task): free candidates for the
    reachable ratio."""
    if study is None:
        return []
    return [{"ratio": ref_bytes / t["nbytes"], "nbytes": t["nbytes"], "plan": f"study trial {t['number']}",
             "value": t["value"], "drop": scorer.drop(t["value"]), "source": "study"} for t in study.trials]


def _evaluator(model, calib, scorer, tried, chosen: Plan):
    """plan -> (quantized copy, metric value, drop); each plan (by formats and method) is measured once and added
    to `tried`: a plan measured before (the chosen one included) gives (None, value, drop) again."""
    key = lambda p: (tuple(sorted(p.formats.items())), p.method)  # noqa: E731
    cache = {key(chosen): tried[0]}

    def evaluate(plan: Plan, source: str):
        if key(plan) in cache:
            return None, cache[key(plan)]["value"], cache[key(plan)]["drop"]
        q = quantized_copy(model, plan, calib)
        value = scorer.value(q)
        tried.append(cache.setdefault(key(plan), _row(plan, value, scorer, source)))
        return q, value, scorer.drop(value)

    return evaluate


def _meet(target, others, units, costs, fixed, ref_bytes, budget, formats, method, options, evaluate, ctx,
          higher: bool):
    """A plan in the budget within max_drop when the chosen one is not: the drop is not monotone in the ratio (a
    noisy metric, other formats), so up to AT_BUDGET_STEPS more plans in the budget are measured: the one compared
    with the chosen plan, then (`higher`) allocations at ratios a quarter, half and three quarters of the way
    (geometrically) from the target's to the largest the formats reach. (plan, quantized copy, value) of the first
    within the drop, or None."""
    def candidates():
        yield from others
        if higher:
            lo, hi = ref_bytes / budget, ref_bytes / smallest_bytes(units, formats, fixed)
            for k in (1, 2, 3):
                p = allocate(units, costs, int(ref_bytes / (lo * (hi / lo) ** (k / 4))), fixed, ref_bytes,
                             method=method)
                if p is not None:
                    yield p

    n = 0
    for plan in candidates():
        if n >= AT_BUDGET_STEPS or (ctx.time_left() is not None and ctx.time_left() <= 0):
            break
        plan.budget, plan.method, plan.method_options = budget, method, options
        q, value, d = evaluate(plan, "in budget")
        if q is None:  # measured before: the chosen plan, or one of these again
            continue
        n += 1
        if d <= target.max_drop + 1e-12:
            return plan, q, value
    return None


def _closest(target, units, costs, fixed, ref_bytes, method, evaluate, tried, ctx, steps: int = 6):
    """Plans allocated at geometric midpoints between float and the ratio of the chosen plan, bisected towards
    the largest whose drop stays within max_drop, as far as the steps and the time budget allow; each measured
    plan is added to `tried` (the drop need not be monotone in the ratio: the refusal reports the largest ratio
    within the drop among all the plans measured, not this search's last midpoint)."""
    lo, hi = 1.0, tried[0]["ratio"]
    for _ in range(steps):
        if ctx.time_left() is not None and ctx.time_left() <= 0:
            break
        mid = math.sqrt(lo * hi)
        plan = allocate(units, costs, int(ref_bytes / mid), fixed, ref_bytes, method=method)
        if plan is not None and evaluate(plan, "below")[2] <= target.max_drop + 1e-12:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.02:
            break


def _refusal(target: Target, scorer, plan: Plan, value: float, tried, out_of_reach=None) -> TargetError:
    rel = " (relative)" if target.relative else ""
    head = f"target {target.describe()} not met: " + (
        f"the candidate formats reach ÷{plan.ratio:.2f} at most, and " if out_of_reach is not None else "")
    msg = (f"{head}at ÷{plan.ratio:.2f} {scorer.metric} is {value:.4g} against "
           f"{scorer.reference_value:.4g} for the float model, a drop of {scorer.drop(value):.4g}{rel} > "
           f"{target.max_drop:.4g}; ")
    ok = [t for t in tried if t["drop"] <= target.max_drop + 1e-12]
    if not ok:
        return TargetError(msg + f"none of the {len(tried)} plans measured stays within the allowed drop", None,
                           tried)
    best = max(ok, key=lambda t: t["ratio"])
    return TargetError(msg + f"closest reachable ratio ÷{math.floor(best['ratio'] * 100) / 100:.2f} (drop "
                       f"{best['drop']:.4g}; the largest within the drop of {len(tried)} plans measured: a ratio "
                       "between it and the target may meet the drop too)", best["ratio"], tried)
