"""Allocation under a budget: one format per unit so that the model's true bytes fit, with the least predicted cost.

A multiple-choice knapsack: unit i takes exactly one option j (a format, or float) with bytes b_ij and cost c_ij;
minimise sum c_ij subject to sum b_ij <= budget. `solve` states it as an integer program and hands it to HiGHS
(scipy.optimize.milp), which proves optimality; the bytes of the answer are then re-added in integers and the
budget tightened if floating-point tolerance let it slip by a byte. Costs come from the sensitivity table.

`Plan` is the result: a format per layer, its exact bytes (fixed bytes + the units' bytes, which is what
`model_bytes` counts after applying it) and its predicted cost; `to_recipe()` writes it as a `quantize` step
with an `overrides` map, the recipe YAML a user can edit and rerun.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .units import Unit

FLOAT = "float"  # the option that leaves a unit as it is


def solve(options: Sequence[Sequence[tuple[int, float]]], budget: int, time_limit: float = 60.0) -> list[int] | None:
    """Chosen option index per item minimising total cost with total bytes <= budget, or None when even the
    smallest options exceed it. options[i] = [(bytes, cost), ...] for item i."""
    if any(not opts for opts in options):
        raise ValueError("every item needs at least one option")
    smallest = sum(min(b for b, _ in opts) for opts in options)
    if smallest > budget:
        return None
    if not options:
        return []
    try:
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_array
    except ImportError:
        raise ImportError("allocation under a budget needs scipy (its HiGHS integer solver): "
                          "pip install 'modelpress[search]'") from None
    sizes = [len(o) for o in options]
    n = sum(sizes)
    cost = np.array([c for opts in options for _, c in opts], dtype=float)
    # HiGHS stops within an absolute gap of 1e-6: divergences of 1e-7..1e-5 would all look equal. Scaled so the
    # largest option costs 1e4, the gap is 1e-10 of it.
    top = float(np.abs(cost).max()) if n else 0.0
    if top > 0:
        cost = cost * (1e4 / top)
    nbytes = np.array([b for opts in options for b, _ in opts], dtype=float)
    rows, cols = [], []
    k = 0
    for i, s in enumerate(sizes):
        rows += [i] * s
        cols += list(range(k, k + s))
        k += s
    one = csr_array((np.ones(n), (rows, cols)), shape=(len(sizes), n))
    # bytes relative to each item's smallest option keep the coefficients small (better conditioned)
    low = np.concatenate([np.full(s, min(b for b, _ in opts)) for s, opts in zip(sizes, options)])
    slack = budget - smallest
    scale = max(float(slack), 1.0)
    for attempt in range(8):  # a solution over budget by rounding tolerance is solved again with less slack
        cons = [LinearConstraint(one, 1, 1),
                LinearConstraint(((nbytes - low) / scale).reshape(1, -1), -np.inf, (slack - attempt**3) / scale)]
        with _quiet_stdout_fd():  # HiGHS prints debug lines from C++ (they broke `compress --json`)
            res = milp(cost, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1),
                       options={"time_limit": time_limit, "mip_rel_gap": 0.0})
        if res.x is None:
            return None if attempt == 0 else _greedy_fallback(options, budget)
        x = np.round(res.x).astype(int)
        picks, k = [], 0
        for s in sizes:
            picks.append(int(np.argmax(x[k:k + s])))
            k += s
        if sum(options[i][j][0] for i, j in enumerate(picks)) <= budget:
            return picks
    return _greedy_fallback(options, budget)


_FD_LOCK = threading.Lock()
_FD_STATE = {"depth": 0, "saved": None}


@contextmanager
def _quiet_stdout_fd():
    """File descriptor 1 to /dev/null for the block (C and C++ code writes there, past sys.stdout), C's buffers
    flushed before it comes back. Process-wide, so counted: overlapping blocks (threads) redirect once, the last
    one out restores."""
    with _FD_LOCK:
        if _FD_STATE["depth"] == 0:
            try:
                sys.stdout.flush()
            except (OSError, ValueError, AttributeError):
                pass
            try:
                saved = os.dup(1)
            except OSError:  # no fd 1 at all: nothing to guard
                saved = None
            if saved is not None:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.close(devnull)
            _FD_STATE["saved"] = saved
        _FD_STATE["depth"] += 1
    try:
        yield
    finally:
        with _FD_LOCK:
            _FD_STATE["depth"] -= 1
            if _FD_STATE["depth"] == 0 and _FD_STATE["saved"] is not None:
                saved, _FD_STATE["saved"] = _FD_STATE["saved"], None
                try:
                    try:
                        sys.stdout.flush()
                    except Exception:  # noqa: BLE001 - whatever happens, fd 1 comes back below
                        pass
                    try:
                        ctypes.CDLL(None).fflush(None)
                    except Exception:  # noqa: BLE001 - (no C library handle on some platforms)
                        pass
                finally:
                    os.dup2(saved, 1)
                    os.close(saved)


def _greedy_fallback(options, budget) -> list[int]:
    """The smallest option everywhere (feasible whenever anything is); used only if the solver misbehaves."""
    return [min(range(len(o)), key=lambda j: o[j][0]) for o in options]


@dataclass
class Plan:
    formats: dict[str, str | None]  # unit (layer) name -> format, None = float
    members: dict[str, list[str]]  # unit -> layers sharing its weight (they get its format)
    nbytes: int  # predicted true bytes of the whole model
    reference_bytes: int
    cost: float  # predicted behaviour cost (sum over units)
    budget: int | None = None
    method: str = "rtn"
    method_options: dict[str, Any] | None = None
    activations: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.reference_bytes / max(self.nbytes, 1)

    def overrides(self) -> dict[str, str | None]:
        """layer pattern -> format, every layer of every unit (exact names; quoted where fnmatch would read them)."""
        out: dict[str, str | None] = {}
        for unit, fmt in self.formats.items():
            for name in self.members.get(unit, [unit]):
                out[_exact(name)] = fmt
        return out

    def to_recipe(self, name: str | None = None):
        from ..recipe import Recipe
        from ..recipe.steps import QuantizeStep
        from ..config import QuantConfig

        config = QuantConfig(weights=None, activations=self.activations, overrides=self.overrides())
        step = QuantizeStep(config, self.method, self.method_options or None)
        return Recipe(name or f"target-{self.ratio:.2f}x", (step,))

    def to_yaml(self, name: str | None = None) -> str:
        head = (f"# modelpress plan: {self.nbytes:,} bytes (÷{self.ratio:.2f} of {self.reference_bytes:,}), predicted "
                f"cost {self.cost:.4g}.\n# Edit the formats (null keeps a layer float) and rerun with "
                f"`modelpress compress MODEL --recipe THIS_FILE`.\n")
        return head + self.to_recipe(name).to_yaml()

    def to_dict(self) -> dict[str, Any]:
        return {"formats": dict(self.formats), "nbytes": self.nbytes, "reference_bytes": self.reference_bytes,
                "ratio": self.ratio, "cost": self.cost, "budget": self.budget, "method": self.method,
                "activations": self.activations, **self.extra}


def _exact(name: str) -> str:
    return name if not re.search(r"[*?\[\]]", name) and not name.startswith("re:") else "re:" + re.escape(name)


def allocate(units: list[Unit], costs: Mapping[str, Mapping[str, float]], budget: int, fixed_bytes: int,
             reference_bytes: int, allow_float: bool = True, method: str = "rtn",
             activations: str | None = None) -> Plan | None:
    """The least-cost plan whose predicted true bytes fit `budget` (None when nothing fits). `costs`: unit ->
    format -> predicted cost (formats absent for a unit are not offered to it); `fixed_bytes`: everything the
    units do not hold."""
    table = []
    for u in units:
        opts = [(u.nbytes(f), float(c), f) for f, c in costs.get(u.name, {}).items() if f != FLOAT]
        if allow_float or not opts:
            opts.append((u.float_bytes, 0.0, None))
        table.append(opts)
    picks = solve([[(b, c) for b, c, _ in opts] for opts in table], budget - fixed_bytes)
    if picks is None:
        return None
    chosen = [opts[j] for opts, j in zip(table, picks)]
    return Plan(formats={u.name: f for u, (_, _, f) in zip(units, chosen)},
                members={u.name: list(u.members) for u in units},
                nbytes=fixed_bytes + sum(b for b, _, _ in chosen), reference_bytes=reference_bytes,
                cost=sum(c for _, c, _ in chosen), budget=budget, method=method, activations=activations)


def uniform(units: list[Unit], fmt: str | None, fixed_bytes: int, reference_bytes: int,
            costs: Mapping[str, Mapping[str, float]] | None = None) -> Plan:
    """Every unit in `fmt` (None: float), for comparisons at equal bytes."""
    costs = costs or {}
    return Plan(formats={u.name: fmt for u in units}, members={u.name: list(u.members) for u in units},
                nbytes=fixed_bytes + sum(u.nbytes(fmt) for u in units), reference_bytes=reference_bytes,
                cost=sum(costs.get(u.name, {}).get(fmt, 0.0) if fmt else 0.0 for u in units) if costs else math.nan)


def best_uniform(units: list[Unit], costs: Mapping[str, Mapping[str, float]], budget: int, fixed_bytes: int,
                 reference_bytes: int, method: str = "rtn", activations: str | None = None) -> Plan | None:
    """The uniform plan (one format on every unit, among the formats offered to all of them) that fits `budget`
    with the least predicted cost, or None. What an allocation is checked against: a mixed plan is kept only if
    it does not measure worse than this one (driver.pick_measured)."""
    common = set.intersection(*(set(costs.get(u.name, {})) - {FLOAT} for u in units)) if units else set()
    plans = [uniform(units, f, fixed_bytes, reference_bytes, costs) for f in sorted(common)]
    plans = [p for p in plans if p.nbytes <= budget]
    if not plans:
        return None
    best = min(plans, key=lambda p: (p.cost, -p.nbytes))
    best.budget, best.method, best.activations = budget, method, activations
    return best
