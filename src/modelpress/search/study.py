"""Search over recipes with Optuna: per-layer formats, the method and its hyper-parameters; size and quality as two
objectives (a Pareto front), the byte budget as a constraint.

Each trial applies its recipe to a copy of the model and measures both objectives for real: true bytes
(`model_bytes`) and the task metric (on the evaluation task; without one, the divergence from the float outputs on
the held-out calibration batches). The TPE sampler starts from the knapsack allocations (the plan at the budget,
and at 90 % and 80 % of it), so it searches around a good point; `random` is the baseline (random sampling of the
same space, no seeds). Studies live in an Optuna storage: in memory by default in Python, a SQLite file under --out
from the command line, or a database URL, so that several machines add trials to one study (`load_if_exists`);
the chosen point is the best feasible trial of the whole study.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..evaluate import model_bytes
from .allocate import FLOAT, Plan, allocate
from .target import quantized_copy

SEED_SHARES = (1.0, 0.9, 0.8)  # knapsack plans enqueued as the first trials, at these shares of the budget
DEFAULT_TRIALS = 20


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("search='optuna' / 'random' needs Optuna: pip install 'modelpress[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def redact(url: str | None) -> str:
    """A storage URL without its password."""
    if not url:
        return "in-memory"
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


@dataclass
class StudyResult:
    chosen: Plan
    trials: list[dict[str, Any]]
    metric: str
    sampler: str
    storage: str
    name: str
    budget: int
    extra: dict[str, Any] = field(default_factory=dict)

    def pareto(self) -> list[dict[str, Any]]:
        return pareto_front(self.trials, self.extra.get("lower_is_better", False))

    def summary(self) -> dict[str, Any]:
        chosen = next(t for t in self.trials if t["number"] == self.extra["chosen_number"])
        return {"sampler": self.sampler, "storage": self.storage, "name": self.name, "metric": self.metric,
                "n_trials": len(self.trials), "trials": self.trials, "pareto": self.pareto(), "chosen": chosen,
                "budget": self.budget}


def pareto_front(trials: list[dict[str, Any]], lower_is_better: bool) -> list[dict[str, Any]]:
    """Trials no other trial beats on both size and quality (ties kept once), by increasing size."""
    sign = 1 if lower_is_better else -1
    pts = sorted((t for t in trials if t.get("value") is not None and not math.isnan(t["value"])),
                 key=lambda t: (t["nbytes"], sign * t["value"]))
    front, best = [], math.inf
    for t in pts:
        q = sign * t["value"]
        if q < best:
            front.append(t)
            best = q
    return front


def _space(trial, units, costs, methods) -> tuple[dict[str, str | None], str, dict[str, Any]]:
    formats = {}
    for u in units:
        choices = [FLOAT] + list(costs.get(u.name, {}))
        f = trial.suggest_categorical(f"fmt:{u.name}", choices)
        formats[u.name] = None if f == FLOAT else f
    method = trial.suggest_categorical("method", methods)
    options: dict[str, Any] = {}
    if method == "gptq":
        options = {"damp": trial.suggest_float("gptq_damp", 1e-3, 0.1, log=True),
                   "act_order": trial.suggest_categorical("gptq_act_order", [True, False])}
    return formats, method, options


def _plan(units, formats, method, options, ref_bytes, activations=None) -> Plan:
    return Plan(formats=formats, members={u.name: list(u.members) for u in units}, nbytes=0,
                reference_bytes=ref_bytes, cost=math.nan, method=method, method_options=options or None,
                activations=activations)


def run_study(target, model, units, costs, plan: Plan, budget: int, fixed: int, ref_bytes: int, calib, probe,
              scorer, ctx) -> StudyResult:
    optuna = _optuna()
    methods = [target.method] if target.method != "auto" else (["rtn", "gptq"] if calib else ["rtn"])
    metric = scorer.metric if scorer is not None else f"{probe.kind} (held-out calibration)"
    lower = scorer.lower_is_better if scorer is not None else True
    random = target.search == "random"
    new_api = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna 5; before, the sampler's constraints_func
    name = target.study_name or f"modelpress-{target.search}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.RandomSampler(seed=target.seed) if random else optuna.samplers.TPESampler(
            seed=target.seed, multivariate=True,
            **({} if new_api else {"constraints_func": lambda t: t.user_attrs.get("constraint", [1.0])}))
        study = optuna.create_study(study_name=name, storage=target.storage, sampler=sampler, load_if_exists=True,
                                    directions=["minimize", "minimize" if lower else "maximize"])
    if not random and not study.trials:
        for share in SEED_SHARES:
            seed = allocate(units, costs, fixed + int((budget - fixed) * share), fixed, ref_bytes, method=methods[-1])
            if seed is not None:
                study.enqueue_trial({**{f"fmt:{u}": f or FLOAT for u, f in seed.formats.items()},
                                     "method": methods[-1]}, user_attrs={"origin": "seed"})

    def objective(trial):
        formats, method, options = _space(trial, units, costs, methods)
        q = quantized_copy(model, _plan(units, formats, method, options, ref_bytes), calib)
        nbytes = model_bytes(q)
        value = scorer.value(q) if scorer is not None else probe.cost(model=q)
        trial.set_user_attr("nbytes", nbytes)
        trial.set_user_attr("constraint", [float(nbytes - budget)])
        if new_api:
            trial.set_constraint("bytes_over_budget", float(nbytes - budget))
        trial.set_user_attr("origin", trial.user_attrs.get("origin", "random" if random else "sampled"))
        if ctx.progress:
            ctx.progress("study", trial.number + 1, n_trials or 0)
        return float(nbytes), float(value)

    left = ctx.time_left()
    n_trials = target.trials or (None if left is not None else DEFAULT_TRIALS)
    timeout = None if left is None else max(1.0, 0.8 * left)
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(ValueError, RuntimeError))
    trials = [_row(t) for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    feasible = [t for t in trials if t["nbytes"] <= budget]
    if not feasible:
        raise ValueError(f"no trial of the study met the budget of {budget:,} bytes ({len(trials)} trials); give "
                         "more trials or time, or use search='allocate'")
    best = min(feasible, key=lambda t: ((t["value"] if lower else -t["value"]), t["nbytes"]))
    chosen = _plan(units, best["formats"], best["method"], best["method_options"], ref_bytes)
    chosen.nbytes, chosen.budget = best["nbytes"], budget
    chosen.cost = sum(costs.get(u, {}).get(f, 0.0) for u, f in best["formats"].items() if f)
    return StudyResult(chosen, trials, metric, "random" if random else "tpe", redact(target.storage), name, budget,
                       {"lower_is_better": lower, "chosen_number": best["number"],
                        "seconds": time.perf_counter() - t0})


def _row(t) -> dict[str, Any]:
    p = t.params
    formats = {k[4:]: (None if v == FLOAT else v) for k, v in p.items() if k.startswith("fmt:")}
    opts = {"damp": p["gptq_damp"], "act_order": p["gptq_act_order"]} if "gptq_damp" in p else {}
    return {"number": t.number, "nbytes": int(t.user_attrs["nbytes"]), "value": t.values[1],
            "origin": t.user_attrs.get("origin", "sampled"), "method": p.get("method", "rtn"),
            "method_options": opts, "formats": formats}
