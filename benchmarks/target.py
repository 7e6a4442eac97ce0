"""Reaching a target compression ratio: the issue's targets table (sensitivity-guided allocation, SensiMix, the
one-command `compress --target-ratio`), measured on the zoo models.

Rows (each can be run alone with --rows):

- `mixed`: per zoo model, one sensitivity analysis (measured costs on held-out calibration batches), then for each
  uniform format U (every layer in U, the same method) the mixed plan allocated at exactly U's bytes: task metric of
  both. Also the plan at the model's target ratio (minilm 8x, shakespeare-lm 6x, ctr 8x, digits-cnn 8x).
- `sensimix`: SensiMix on minilm at 8x (lower blocks int8, the rest int1, int8 activations, embeddings int4) against
  uniform int8 and int4 and the mixed int8..int2 plan at SensiMix's bytes; the 1-bit path's speed against the
  dequantize-then-compute path (whole model and one 1-bit layer, interleaved calls, medians).
- `cli`: `modelpress compress zoo:digits-cnn --target-ratio 8 --max-drop 0.01` as a subprocess, wall time.

    python benchmarks/target.py                       # everything: well over 25 minutes on 2 loaded cores (the
                                                      # shakespeare-lm analysis alone took 11 minutes)
    python benchmarks/target.py --quick               # tiny zoo models, no minilm, rtn (~6 minutes loaded)
    python benchmarks/target.py --rows sensimix mixed --models minilm   # the minilm rows alone
    python benchmarks/target.py --rows mixed --models ctr digits-cnn --json out/target.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import modelpress as mp
from modelpress import zoo
from modelpress.calibrate import call_model
from modelpress.evaluate import model_bytes
from modelpress.quant import set_kernels
from modelpress.quant.kernels import cpu_info
from modelpress.recipe import Context
from modelpress.search.allocate import allocate, best_uniform, uniform
from modelpress.search.compare import comparison_batches
from modelpress.search.driver import pick_measured, split_calib
from modelpress.search.probe import Probe, divergence_for
from modelpress.search.score import Scorer
from modelpress.search.sensimix import SensiMix
from modelpress.search.sensitivity import Sensitivity, analyse
from modelpress.search.target import quantized_copy, units_of

MODELS = ["digits-cnn", "ctr", "shakespeare-lm", "minilm"]  # cheapest first
RATIO = {"digits-cnn": 8.0, "minilm": 8.0, "shakespeare-lm": 6.0, "ctr": 8.0}
# the quality targets at those ratios: (metric, allowed drop, relative)
QUALITY = {"minilm": ("embedding_cosine", None, False), "shakespeare-lm": ("perplexity", 0.05, True),
           "ctr": ("auc", 0.002, False), "digits-cnn": ("accuracy", None, False)}
UNIFORM = ("int8", "int4:g32", "int4:g128", "int3:g32", "int2:g32")
FORMATS = ("int8", "int6:g64", "int5:g64", "int4:g32", "int4:g128", "int3:g32", "int3:g128", "int2:g32", "int2:g128")


def log(msg: str) -> None:
    print(msg, flush=True)


class Bench:
    """One zoo model, its sensitivity table, and quantized candidates scored on its task."""

    def __init__(self, name: str, tiny: bool, method: str, sens_dir: str | None = None):
        t0 = time.perf_counter()
        entry = zoo.build(name, tiny=tiny)
        self.name, self.task, self.calib = name, entry.task, list(entry.calib)
        self.train = list(entry.train) if entry.train else []
        self.model = entry.model.eval()
        self.ref_bytes = model_bytes(self.model)
        self.units, self.fixed = units_of(self.model, mp.Target(ratio=2))
        self.method = method if method != "auto" else ("gptq" if self.calib else "rtn")
        self.scorer = Scorer(self.task, self.model, QUALITY[name][0])
        heldout = split_calib(self.calib, 0.25)[1]
        self.probe = Probe(self.model, heldout, self.task.forward, divergence_for(self.task))
        # what a Target compares an allocated plan with the best uniform format on (its defaults): the held-out
        # calibration batches and training batches with their calibration rows left out
        self.target = mp.Target(ratio=2)
        batches, self.compare_train = comparison_batches(self.calib, heldout, self.train, self.target.compare_train)
        self.compare_probe = Probe(self.model, batches, self.task.forward, self.probe.kind, replay=False)
        path = os.path.join(sens_dir, f"{name}{'-tiny' if tiny else ''}.sensitivity.json") if sens_dir else None
        if path and os.path.exists(path):  # measured by an earlier row or run on the same model: reused, checked
            self.sens = Sensitivity.load(path)
            self.sens.check(self.units, list(FORMATS), self.probe.kind)
            self.reused = path
        else:
            self.sens = analyse(self.model, self.units, list(FORMATS), self.probe, blocks=False)
            self.reused = None
            if path:
                os.makedirs(sens_dir, exist_ok=True)
                self.sens.save(path)
        self.costs = self.sens.costs("measured")
        self._made: dict = {}
        log(f"{name}: {len(self.units)} weights, {self.ref_bytes:,} bytes float, reference {self.scorer.metric} "
            f"{self.scorer.reference_value:.5g}; plans compared on {len(heldout)} held-out calibration + "
            f"{self.compare_train} training batches ({sum(r.shape[0] for r in self.compare_probe.reference)} samples), tie "
            f"confidence {self.target.tie_confidence:g}; analysis {self.sens.seconds:.0f} s"
            f"{' (reused ' + path + ')' if self.reused else ''} (setup {time.perf_counter() - t0:.0f} s)")

    def make(self, plan):
        """The quantized copy of `plan` (kept while the same formats are asked for again)."""
        key = (tuple(sorted((k, str(v)) for k, v in plan.formats.items())), plan.method)
        if key not in self._made:
            while len(self._made) >= 3:  # the few of one comparison are kept (memory)
                self._made.pop(next(iter(self._made)))
            self._made[key] = quantized_copy(self.model, plan, self.calib)
        return self._made[key]

    def score(self, plan, q=None) -> dict:
        t0 = time.perf_counter()
        q = q if q is not None else self.make(plan)
        nbytes = model_bytes(q)
        assert nbytes == plan.nbytes, (nbytes, plan.nbytes)  # the allocation's bytes are the true bytes
        value = self.scorer.value(q)
        return {"bytes": nbytes, "ratio": self.ref_bytes / nbytes, "value": value, "drop": self.scorer.drop(value),
                "seconds": time.perf_counter() - t0}

    def mixed_at(self, nbytes: int, compare_uniform: bool = True):
        """The allocated plan at `nbytes` and its quantized copy; with `compare_uniform` (what a Target does) the
        best uniform format in the budget replaces it unless the allocated plan measures lower on held-out data
        beyond the noise (paired bootstrap, the Target's tie_confidence; never the evaluation data).
        (plan, copy, [held-out comparison rows])."""
        plan = allocate(self.units, self.costs, nbytes, self.fixed, self.ref_bytes, method=self.method)
        if plan is None:
            return None, None, []
        plans = [plan]
        u = best_uniform(self.units, self.costs, nbytes, self.fixed, self.ref_bytes, self.method)
        if compare_uniform and u is not None and u.formats != plan.formats:
            plans.append(u)
        chosen, q, _, compared = pick_measured(self.model, plans, self.calib, self.compare_probe, make=self.make,
                                               confidence=self.target.tie_confidence, seed=self.target.seed)
        return chosen, q, compared

    def uniform(self, fmt: str):
        p = uniform(self.units, fmt, self.fixed, self.ref_bytes, self.costs)
        p.method = self.method
        return p


def better_or_equal(scorer, a: float, b: float, tol: float = 1e-9) -> bool:
    return not scorer.better(b, a) or abs(a - b) <= tol


def run_mixed(name: str, tiny: bool, method: str, sens_dir: str | None = None, formats=UNIFORM) -> dict:
    b = Bench(name, tiny, method, sens_dir)
    out = {"model": name, "metric": b.scorer.metric, "reference": b.scorer.reference_value, "method": b.method,
           "analysis_s": b.sens.seconds, "analysis_reused": b.reused, "uniform": []}
    for fmt in formats:
        if not all(fmt in b.costs.get(u.name, {}) for u in b.units):
            continue  # not offered to every weight (e.g. a group larger than a row)
        up = b.uniform(fmt)
        u = b.score(up)
        mp_plan, q, compared = b.mixed_at(up.nbytes)
        m = b.score(mp_plan, q)
        m["chosen"] = next(c["plan"] for c in compared if c["chosen"]) if compared else "allocated"
        m["heldout"] = compared
        row = {"format": fmt, "uniform": u, "mixed": m, "mixed_formats": _counts(mp_plan),
               "mixed_better_or_equal": better_or_equal(b.scorer, m["value"], u["value"])}
        if m["chosen"] != "allocated":  # the knapsack plan alone, for the record (not what a Target returns)
            alone = allocate(b.units, b.costs, up.nbytes, b.fixed, b.ref_bytes, method=b.method)
            row["allocated_alone"] = {**b.score(alone), "formats": _counts(alone)}
        out["uniform"].append(row)
        log(f"  {name:15s} {fmt:10s} x{u['ratio']:6.2f}: uniform {u['value']:.5g}  mixed {m['value']:.5g} "
            f"(x{m['ratio']:.2f}, {m['chosen']}{_heldout(compared)}) {'>=' if row['mixed_better_or_equal'] else '<'}"
            + (f"; knapsack plan alone {row['allocated_alone']['value']:.5g}" if "allocated_alone" in row else ""))
    ratio = RATIO[name]
    plan, q, compared = b.mixed_at(int(b.ref_bytes / ratio))
    if plan is None:
        smallest = b.fixed + sum(min(u.nbytes(f) for f in b.costs[u.name]) for u in b.units if b.costs.get(u.name))
        out["target"] = {"target_ratio": ratio, "unreachable": True, "max_ratio": b.ref_bytes / smallest}
        log(f"  {name:15s} target x{ratio:g}: out of reach with these formats (at most x{b.ref_bytes / smallest:.2f})")
        return out
    t = b.score(plan, q)
    t["target_ratio"], t["formats"], t["heldout"] = ratio, _counts(plan), compared
    metric, allowed, relative = QUALITY[name]
    t["relative_drop"] = b.scorer.drop(t["value"]) / abs(b.scorer.reference_value) if b.scorer.reference_value else None
    t["allowed_drop"], t["allowed_relative"] = allowed, relative
    out["target"] = t
    log(f"  {name:15s} target x{ratio:g}{_heldout(compared)}: x{t['ratio']:.2f}, {metric} {t['value']:.5g} (reference "
        f"{b.scorer.reference_value:.5g}, drop {t['drop']:.4g}, relative {t['relative_drop']:.4g})")
    return out


def _heldout(compared: list[dict]) -> str:
    """The held-out decision in a few words: each plan's mean divergence, the challenger's share ahead."""
    if len(compared) < 2:
        return ""
    c = next(r for r in compared if "share_ahead" in r)
    return "; held-out " + " vs ".join(f"{r['plan']} {r['measured_cost']:.3g}" for r in compared) + \
        f", {c['plan']} ahead in {c['share_ahead']:.0%} of resamples"


def _counts(plan) -> dict:
    c: dict[str, int] = {}
    for f in plan.formats.values():
        c[str(f)] = c.get(str(f), 0) + 1
    return c


@torch.inference_mode()
def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_sensimix(tiny: bool, repeats: int, sens_dir: str | None = None) -> dict:
    b = Bench("minilm", tiny, "rtn", sens_dir)  # SensiMix's own method is rtn; the comparisons use the same
    t0 = time.perf_counter()
    sm = copy.deepcopy(b.model)
    ctx = Context(calib=b.calib, reference=b.model, eval=b.task)
    SensiMix(ratio=RATIO["minilm"]).run(sm, ctx)
    sm.eval()
    plan = ctx.records[0]["plan"]
    cos = b.scorer.value(sm)
    row = {"sensimix": {"bytes": model_bytes(sm), "ratio": b.ref_bytes / model_bytes(sm), "value": cos,
                        "high_blocks": plan.get("high_blocks"), "seconds": time.perf_counter() - t0}}
    log(f"  sensimix x{row['sensimix']['ratio']:.2f}: cosine {cos:.5f}, 8-bit blocks {plan.get('high_blocks')}")
    row["uniform_int8"] = b.score(b.uniform("int8"))
    row["uniform_int4"] = b.score(b.uniform("int4:g128"))
    mplan, q, compared = b.mixed_at(model_bytes(sm))
    row["mixed_at_sensimix_bytes"] = {**b.score(mplan, q), "formats": _counts(mplan), "heldout": compared}
    for k in ("uniform_int8", "uniform_int4", "mixed_at_sensimix_bytes"):
        log(f"  {k:24s} x{row[k]['ratio']:.2f}: cosine {row[k]['value']:.5f}")
    # speed: the 1-bit layers on the int8 GEMM (kernels) against dequantize-then-compute (reference path)
    inp = b.task.batches()[0][0] if hasattr(b.task, "batches") else b.calib[0]
    ref_path = copy.deepcopy(sm)
    set_kernels(ref_path, False)
    t = interleaved({"kernels": lambda: call_model(sm, inp), "dequantize": lambda: call_model(ref_path, inp),
                     "float": lambda: call_model(b.model, inp)}, repeats)
    row["model_ms"] = {k: 1e3 * v for k, v in t.items()}
    low = next(m for n, m in sm.named_modules() if getattr(m, "weight_format", None) is not None
               and str(m.weight_format) == "int1" and hasattr(m, "in_features"))
    x = torch.randn(inp["input_ids"].numel() if isinstance(inp, dict) else 256, low.in_features)
    from modelpress.quant import kernels

    with torch.inference_mode():
        path = kernels.select(low, x)
    lt = interleaved({"kernels": lambda: low(x), "dequantize": lambda: low.reference(x)}, repeats * 3)
    row["layer"] = {"shape": list(low.weight_shape), "rows": x.shape[0], "path": path,
                    **{f"{k}_ms": 1e3 * v for k, v in lt.items()}}
    log(f"  1-bit path: model {row['model_ms']['kernels']:.2f} ms vs dequantize {row['model_ms']['dequantize']:.2f} ms "
        f"(float {row['model_ms']['float']:.2f}); layer {low.weight_shape} M={x.shape[0]} {path}: "
        f"{row['layer']['kernels_ms']:.3f} ms vs {row['layer']['dequantize_ms']:.3f} ms")
    return row


def run_sensimix_trained(tiny: bool, steps: int, sens_dir: str | None = None) -> dict:
    """SensiMix at the same ratio with its 1-bit training: QAT in the plan's formats, `steps` steps of output
    distillation (cosine) from the float model on the training split, converted to the same packed layers."""
    b = Bench("minilm", tiny, "rtn", sens_dir)
    t0 = time.perf_counter()
    sm = copy.deepcopy(b.model)
    ctx = Context(calib=b.calib, train=b.train, reference=b.model, eval=b.task)
    SensiMix(ratio=RATIO["minilm"], train_steps=steps).run(sm, ctx)
    sm.eval()
    rec = ctx.records[-1]
    cos = b.scorer.value(sm)
    row = {"bytes": model_bytes(sm), "ratio": b.ref_bytes / model_bytes(sm), "value": cos, "train": rec["train"],
           "train_batches": len(b.train), "seconds": time.perf_counter() - t0}
    log(f"  sensimix + 1-bit training ({steps} steps, {rec['train']['seconds']:.0f} s, loss "
        f"{rec['train']['first_loss']:.4g} -> {rec['train']['last_loss']:.4g}) x{row['ratio']:.2f}: cosine {cos:.5f}")
    return row


def run_cli(tiny: bool, ratio: float, max_drop: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "modelpress.cli", "compress", "zoo:digits-cnn", "--target-ratio", str(ratio),
               "--max-drop", str(max_drop), "--out", os.path.join(d, "out"), "--json", "--quiet"]
        cmd += ["--tiny"] if tiny else []
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    row = {"command": " ".join(["modelpress"] + cmd[3:]), "rc": p.returncode, "wall_s": wall}
    if p.returncode == 0:
        rep = json.loads(p.stdout)
        acc = rep["metrics"]["accuracy"]
        row.update(ratio=rep["size"]["ratio"], accuracy=acc["compressed"], reference=acc["reference"],
                   drop=acc["reference"] - acc["compressed"])
        log(f"  cli: rc 0 in {wall:.0f} s, x{row['ratio']:.2f}, accuracy {acc['compressed']:.4f} "
            f"(reference {acc['reference']:.4f})")
    else:
        row["stderr"] = p.stderr.strip().splitlines()[-1:] if p.stderr else []
        log(f"  cli: rc {p.returncode} in {wall:.0f} s: {row['stderr']}")
    return row


def verdicts(res: dict) -> list[tuple[str, str, str, str]]:
    """(what, target, measured, met) per row of the issue's table."""
    out = []
    mixed = {r["model"]: r for r in res.get("mixed", [])}
    if "minilm" in mixed:
        r = mixed["minilm"]
        t = r["target"]
        if t.get("unreachable"):
            t = {**t, "ratio": 0.0, "value": float("nan")}
        wins = [u for u in r["uniform"] if 5 <= u["uniform"]["ratio"] <= 12]
        ok = t["ratio"] >= 8 and t["value"] >= 0.97 and all(u["mixed_better_or_equal"] for u in wins)
        out.append(("minilm at 8x true bytes", "cosine >= 0.97; beats uniform at equal bytes",
                    f"x{t['ratio']:.2f}, cosine {t['value']:.4f}; mixed vs uniform near 8x: " + ", ".join(
                        f"{u['format']} {u['mixed']['value']:.4f} vs {u['uniform']['value']:.4f}" for u in wins),
                    "met" if ok else "missed"))
    for name in ("shakespeare-lm", "ctr"):
        if name in mixed and mixed[name]["target"].get("unreachable"):
            t = mixed[name]["target"]
            out.append((f"{name} at {RATIO[name]:g}x", "", f"out of reach: the formats give x{t['max_ratio']:.2f} at most",
                        "missed"))
        elif name in mixed:
            t = mixed[name]["target"]
            d = t["relative_drop"] if t["allowed_relative"] else t["drop"]
            ok = t["ratio"] >= RATIO[name] and d <= t["allowed_drop"]
            out.append((f"{name} at {RATIO[name]:g}x", f"{'perplexity +' if name != 'ctr' else 'AUC within '}"
                        f"{t['allowed_drop'] * (100 if t['allowed_relative'] else 1):g}{'%' if t['allowed_relative'] else ''}",
                        f"x{t['ratio']:.2f}, {mixed[name]['metric']} {t['value']:.5g} vs {mixed[name]['reference']:.5g} "
                        f"({'+' + format(100 * d, '.2f') + '%' if t['allowed_relative'] else 'drop ' + format(d, '.4f')})",
                        "met" if ok else "missed"))
    if "sensimix" in res:
        s = res["sensimix"]
        faster = s["model_ms"]["kernels"] < s["model_ms"]["dequantize"]
        ok = s["sensimix"]["ratio"] >= 8 and faster
        out.append(("SensiMix on minilm", "8/1 mix >= 8x, cosine reported; 1-bit path faster than dequantize",
                    f"x{s['sensimix']['ratio']:.2f} cosine {s['sensimix']['value']:.4f}; int8 x{s['uniform_int8']['ratio']:.2f} "
                    f"{s['uniform_int8']['value']:.4f}, int4:g128 x{s['uniform_int4']['ratio']:.2f} "
                    f"{s['uniform_int4']['value']:.4f}, mixed at equal bytes {s['mixed_at_sensimix_bytes']['value']:.4f}; "
                    + (f"with 1-bit training ({s['trained']['train']['steps']} steps) x{s['trained']['ratio']:.2f} "
                       f"cosine {s['trained']['value']:.4f}; " if "trained" in s else "") +
                    f"model {s['model_ms']['kernels']:.1f} vs {s['model_ms']['dequantize']:.1f} ms, layer "
                    f"({s['layer']['path']}) {s['layer']['kernels_ms']:.3f} vs {s['layer']['dequantize_ms']:.3f} ms",
                    "met" if ok else "missed"))
    if mixed:
        ok_all = all(u["mixed_better_or_equal"] for r in mixed.values() for u in r["uniform"])
        n = sum(len(r["uniform"]) for r in mixed.values())
        k = sum(u["mixed_better_or_equal"] for r in mixed.values() for u in r["uniform"])
        lost = [f"{r['model']} {u['format']}" for r in mixed.values() for u in r["uniform"] if not u["mixed_better_or_equal"]]
        out.append((f"mixed vs uniform at equal bytes ({', '.join(mixed)})", "better or equal",
                    f"{k}/{n} comparisons" + (f"; worse: {', '.join(lost)}" if lost else ""),
                    ("met" if ok_all else "missed") + ("" if len(mixed) == 4 else " (not all four models)")))
    if "cli" in res:
        c = res["cli"]
        ok = c["rc"] == 0 and c["wall_s"] <= 300 and c["ratio"] >= c.get("target", 8) and c["drop"] <= 0.01
        out.append(("--target-ratio on digits-cnn", "ratio met, drop <= --max-drop, <= 5 min",
                    f"rc {c['rc']}, {c['wall_s']:.0f} s" + (f", x{c['ratio']:.2f}, drop {c['drop']:.4f}" if c["rc"] == 0 else ""),
                    "met" if ok else "missed"))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=["mixed", "sensimix", "sensimix-train", "cli"],
                   choices=["mixed", "sensimix", "sensimix-train", "cli"])
    p.add_argument("--uniform", nargs="+", default=list(UNIFORM), metavar="FORMAT",
                   help="uniform formats the mixed plans are compared with at equal bytes")
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--method", default="auto", help="quantization method of the plans (auto: gptq with calibration)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny zoo models, no minilm, rtn")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--sensimix-train-steps", type=int, default=60, metavar="N",
                   help="steps of SensiMix's 1-bit training (QAT + distillation on the training split; 0: skip)")
    p.add_argument("--sensitivity-dir", metavar="DIR", help="keep each model's sensitivity table here and reuse it "
                   "(checked against the model) in later rows and runs instead of measuring it again")
    a = p.parse_args(argv)
    if a.quick:
        a.models = [m for m in a.models if m != "minilm"]
        a.rows = [r for r in a.rows if not r.startswith("sensimix")]
        a.method, a.repeats = "rtn", 3
    info = cpu_info()
    log(f"{info.describe()}\n{torch.get_num_threads()} threads, torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.2f}\n")
    t0 = time.perf_counter()
    res: dict = {"info": {"cpu": info.describe(), "isa": info.isa, "capability": torch.backends.cpu.get_cpu_capability(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": a.quick,
                          "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}}
    def dump():  # after every part: a run stopped by a time limit keeps what it measured
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2, default=str)

    if "cli" in a.rows:
        res["cli"] = run_cli(a.quick, RATIO["digits-cnn"], 0.01)
        res["cli"]["target"] = RATIO["digits-cnn"]
        dump()
    if "mixed" in a.rows:
        res["mixed"] = []
        for m in a.models:
            res["mixed"].append(run_mixed(m, a.quick, a.method, a.sensitivity_dir, a.uniform))
            dump()
    if "sensimix" in a.rows:
        res["sensimix"] = run_sensimix(a.quick, a.repeats, a.sensitivity_dir)
        dump()
    if "sensimix-train" in a.rows and a.sensimix_train_steps:
        res.setdefault("sensimix_trained", run_sensimix_trained(a.quick, a.sensimix_train_steps, a.sensitivity_dir))
        if "sensimix" in res:
            res["sensimix"]["trained"] = res["sensimix_trained"]
        dump()
    res["verdicts"] = verdicts(res)
    res["info"]["wall_s"] = time.perf_counter() - t0
    log("\n| what | target | measured | met |\n|---|---|---|---|")
    for row in res["verdicts"]:
        log("| " + " | ".join(row) + " |")
    log(f"\n{res['info']['wall_s'] / 60:.1f} minutes; load average {os.getloadavg()[0]:.2f}")
    dump()
    return res


if __name__ == "__main__":
    main()
