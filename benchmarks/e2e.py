"""End-to-end latency: each zoo model x each built-in recipe, quantized against float, in both kernel modes.

For every (model, recipe): the float model is quantized with the recipe's steps (calibration data from the zoo
entry), then copied once per kernel mode ("memory": packed weights only; "speed": a dense float copy where every
packed path is slower). Latency is the median wall time of one forward pass at batch 1 (the first sample of the
first evaluation batch) and at the model's usual batch (the whole first evaluation batch), with float, memory and
speed calls interleaved round by round (A, B, C, A, B, C ...) after warm-up calls, in which the speed guard makes
and caches its choices. For shakespeare-lm, greedy generation (M = 1 per step, KV cache) in tokens per second too.

    python benchmarks/e2e.py                      # all models and recipes (tens of minutes on 2 cores)
    python benchmarks/e2e.py --quick              # tiny zoo models, a few recipes (a minute or two)
    python benchmarks/e2e.py --models digits-cnn --recipes w8a8 w4-g32 --json out/e2e.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from typing import Any

import torch

CLOCK = time.perf_counter  # --clock cpu: time.thread_time with one thread (CPU time: immune to preemption)

from modelpress import zoo
from modelpress.calibrate import call_model
from modelpress.quant import set_kernels
from modelpress.quant.kernels import cpu_info
from modelpress.recipe import Context, load_recipe
from modelpress.recipe.recipes import BUILTIN_RECIPES
from modelpress.runtime import steady_malloc

MODELS = ["digits-cnn", "digits-dwcnn", "minilm", "shakespeare-lm", "ctr"]
INT_RECIPES = {"w8", "w8a8", "w8a8-static", "w4-g32", "w4-g128"}  # memory-mode target rows (>= 1.0x float)
# the quantization recipes (issue 7's table); the pruning ones can be named with --recipes (a recipe that does not
# apply to a model, e.g. transformer pruning on a CNN, is skipped with a note)
MAX_ROUNDS = 400  # --min-seconds: rounds per row at most
QUANT_RECIPES = [r for r in BUILTIN_RECIPES if all(set(step) == {"quantize"} for step in BUILTIN_RECIPES[r])]


def first_rows(inp: Any, n: int) -> Any:
    if isinstance(inp, torch.Tensor):
        return inp[:n]
    if isinstance(inp, dict):
        return {k: first_rows(v, n) for k, v in inp.items()}
    if isinstance(inp, (tuple, list)):
        return type(inp)(first_rows(v, n) for v in inp)
    return inp


def rows_of(inp: Any) -> int:
    if isinstance(inp, torch.Tensor):
        return inp.shape[0]
    if isinstance(inp, dict):
        return rows_of(next(iter(inp.values())))
    return rows_of(inp[0])


def quantized(model: torch.nn.Module, recipe: str, calib: list) -> torch.nn.Module:
    q = copy.deepcopy(model)
    ctx = Context(calib=calib, reference=model)
    for step in load_recipe(recipe).steps:
        step.run(q, ctx)
    return q.eval()


@torch.inference_mode()
def interleaved(models: dict[str, torch.nn.Module], inp: Any, warmup: int, repeats: int,
                min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per forward pass of each model, calls interleaved round by round: `repeats` rounds, or more
    for fast models, as many as give the first model (float) `min_seconds` of calls (at most MAX_ROUNDS)."""
    first = next(iter(models))
    for _ in range(warmup):
        for k, m in models.items():
            t0 = CLOCK()
            call_model(m, inp)
            last = CLOCK() - t0
            if k == first:
                per_call = last
    if min_seconds > 0 and warmup:
        repeats = max(repeats, min(MAX_ROUNDS, math.ceil(min_seconds / max(per_call, 1e-9))))
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = CLOCK()
            call_model(m, inp)
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.inference_mode()
def generation(models: dict[str, torch.nn.Module], prompt: torch.Tensor, tokens: int, repeats: int) -> dict[str, float]:
    """Greedy generation tokens per second (one token per step, KV cache), interleaved. The zoo's model config turns
    the cache off (`use_cache=False`, for training and evaluation) and its generation config on; without it every
    step would run the whole sequence again (M = 8 ... 40 rows, not 1), so it is asked for here as well."""
    times = {k: [] for k in models}
    for r in range(repeats + 1):
        for k, m in models.items():
            t0 = CLOCK()
            m.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                       use_cache=True)
            if r:  # the first round is warm-up (and the speed guard's timing)
                times[k].append(CLOCK() - t0)
    return {k: tokens / statistics.median(v) for k, v in times.items()}


def run_model(name: str, recipes: list[str], tiny: bool, warmup: int, repeats: int, gen_tokens: int,
              min_seconds: float = 0.0) -> list[dict]:
    entry = zoo.build(name, tiny=tiny)
    model = entry.model.eval()
    usual = entry.task.batches()[0][0] if entry.task is not None and len(entry.task.batches()) else entry.calib[0]
    batches = {"1": first_rows(usual, 1), "usual": usual}
    rows = []
    for recipe in recipes:
        t0 = CLOCK()
        try:
            q = quantized(model, recipe, list(entry.calib))
        except ValueError as e:  # the recipe does not apply to this model
            print(f"{name:15s} {recipe:12s} skipped: {e}", flush=True)
            continue
        q_speed = copy.deepcopy(q)
        set_kernels(q, True, mode="memory")
        set_kernels(q_speed, True, mode="speed")
        prep_s = CLOCK() - t0
        for label, inp in batches.items():
            t = interleaved({"float": model, "memory": q, "speed": q_speed}, inp, warmup, repeats, min_seconds)
            rows.append({"model": name, "recipe": recipe, "batch": label, "rows": rows_of(inp),
                         "float_ms": 1e3 * t["float"], "memory_ms": 1e3 * t["memory"], "speed_ms": 1e3 * t["speed"],
                         "memory_x": t["float"] / t["memory"], "speed_x": t["float"] / t["speed"],
                         "quantize_s": prep_s})
            print(f"{name:15s} {recipe:12s} batch {label:5s} ({rows[-1]['rows']:4d}): float {rows[-1]['float_ms']:9.3f} ms"
                  f"  memory x{rows[-1]['memory_x']:.2f}  speed x{rows[-1]['speed_x']:.2f}", flush=True)
        if name == "shakespeare-lm" and gen_tokens:
            prompt = first_rows(usual["input_ids"], 1)[:, :8]
            g = generation({"float": model, "memory": q, "speed": q_speed}, prompt, gen_tokens, max(3, repeats // 3))
            rows.append({"model": name, "recipe": recipe, "batch": "generate", "rows": 1,
                         "float_tok_s": g["float"], "memory_tok_s": g["memory"], "speed_tok_s": g["speed"],
                         "memory_x": g["memory"] / g["float"], "speed_x": g["speed"] / g["float"]})
            print(f"{name:15s} {recipe:12s} generate M=1: float {g['float']:.1f} tok/s  memory x{rows[-1]['memory_x']:.2f}"
                  f"  speed x{rows[-1]['speed_x']:.2f}", flush=True)
        del q, q_speed
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | recipe | batch | float | memory mode | speed mode |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["batch"] == "generate":
            base = f"{r['float_tok_s']:.1f} tok/s"
            lines.append(f"| {r['model']} | {r['recipe']} | generate (M=1) | {base} | {r['memory_tok_s']:.1f} tok/s "
                         f"(x{r['memory_x']:.2f}) | {r['speed_tok_s']:.1f} tok/s (x{r['speed_x']:.2f}) |")
            continue
        lines.append(f"| {r['model']} | {r['recipe']} | {r['batch']} ({r['rows']}) | {r['float_ms']:.3f} ms | "
                     f"{r['memory_ms']:.3f} ms (x{r['memory_x']:.2f}) | {r['speed_ms']:.3f} ms (x{r['speed_x']:.2f}) |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> dict:
    mem = [r for r in rows if r["recipe"] in INT_RECIPES]
    return {"memory_int_rows_ge_1": sum(r["memory_x"] >= 1.0 for r in mem), "memory_int_rows": len(mem),
            "speed_rows_ge_1": sum(r["speed_x"] >= 1.0 for r in rows), "speed_rows": len(rows),
            "memory_below_1": [(r["model"], r["recipe"], r["batch"], round(r["memory_x"], 2)) for r in mem
                               if r["memory_x"] < 1.0],
            "speed_below_1": [(r["model"], r["recipe"], r["batch"], round(r["speed_x"], 2)) for r in rows
                              if r["speed_x"] < 1.0]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--recipes", nargs="+", default=QUANT_RECIPES, choices=list(BUILTIN_RECIPES),
                   help=f"default: the quantization recipes ({', '.join(QUANT_RECIPES)})")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="interleaved rounds per row, at least (default 10)")
    p.add_argument("--min-seconds", type=float, default=0.3,
                   help="more rounds for fast rows: enough for this many seconds of float calls (default 0.3; "
                        f"at most {MAX_ROUNDS} rounds): a 2 ms model gets 150, not 10 medians that one slow call sways")
    p.add_argument("--gen-tokens", type=int, default=32, help="shakespeare-lm generation length (0: skip)")
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="tiny zoo models (no minilm), recipes w8a8 w4-g32 nvfp4")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: one thread, CPU time of that thread (for a loaded machine: preemption does not count)")
    p.add_argument("--malloc", choices=("steady", "system"), default="steady",
                   help="steady (default): glibc keeps freed memory in its heap (modelpress.runtime.steady_malloc), "
                        "so timings do not depend on page faults; system: glibc's defaults")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    steady = a.malloc == "steady" and steady_malloc()
    if a.quick:
        a.models = [m for m in a.models if m != "minilm"]
        a.recipes = [r for r in a.recipes if r in ("w8a8", "w4-g32", "nvfp4")] or ["w8a8"]
        a.repeats, a.warmup, a.gen_tokens, a.min_seconds = 3, 1, min(a.gen_tokens, 8), 0.0
    global CLOCK
    if a.clock == "cpu":
        a.threads, CLOCK = 1, time.thread_time
    if a.threads:
        torch.set_num_threads(a.threads)
    info = cpu_info()
    print(f"{info.describe()}\n{torch.get_num_threads()} threads, {a.clock} clock, {'steady' if steady else 'system'} malloc, torch {torch.__version__}; median of at least {a.repeats} "
          f"interleaved rounds ({a.min_seconds:g} s of float calls or more) after {a.warmup} warm-up; load average {os.getloadavg()[0]:.2f}\n")
    rows = []
    for name in a.models:
        rows += run_model(name, a.recipes, a.quick, a.warmup, a.repeats, a.gen_tokens, a.min_seconds)
    print()
    print(table(rows))
    tg = targets(rows)
    print(f"\nmemory mode, int8/int4 rows >= 1.0x float: {tg['memory_int_rows_ge_1']}/{tg['memory_int_rows']}; "
          f"speed mode, all rows >= 1.0x: {tg['speed_rows_ge_1']}/{tg['speed_rows']}")
    result = {"info": {"cpu": info.describe(), "isa": info.isa, "threads": torch.get_num_threads(), "clock": a.clock,
                       "torch": torch.__version__, "repeats": a.repeats, "min_seconds": a.min_seconds, "loadavg_1min": os.getloadavg()[0], "malloc": "steady" if steady else "system",
                       "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, "rows": rows, "targets": tg}
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
