"""Quality versus peers: modelpress (rtn, gptq, awq, smoothquant, ...) and torchao, optimum-quanto, NNCF and
llm-compressor on the zoo models, in one process, with the same float model, calibration data and evaluation.

    make bench-peers                      # builds .venv-peers (peers installed), then runs this script
    .venv-peers/bin/python benchmarks/quality.py --models digits-cnn,ctr --json out/quality.json
    .venv-peers/bin/python benchmarks/quality.py --quick          # tiny zoo models: a smoke run

Every run works on a deepcopy of the zoo's float model. Quality: modelpress.evaluate.evaluate_pair against the
float model on the zoo's held-out task. Size: bytes actually stored (tensor subclasses unwrapped). Latency:
median of one forward on the first evaluation batch, float and quantized in the same run. Compression time:
the quantization step only. A method that is not available or a peer that fails is recorded with its reason.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from importlib import metadata
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_peers import PEERS, Scope, llmc_packed_bytes, true_bytes

import modelpress as mp
from modelpress import zoo
from modelpress.evaluate import compare_latency, evaluate_pair

MODELS = ["digits-cnn", "ctr", "minilm", "shakespeare-lm"]
SCOPES = {
    "shakespeare-lm": Scope(exclude=("lm_head", "model.embed_tokens"), nncf_ignore=(".*lm_head.*", ".*embed_tokens.*"),
                            causal_lm=True, transformer=True),
    "minilm": Scope(exclude=("bert.embeddings.*",), nncf_ignore=(".*embeddings.*",), transformer=True),
    "digits-cnn": Scope(),
    "ctr": Scope(),
}
# (row label, weights, activations, modelpress methods)
FORMATS = [
    ("W8", "int8", None, ["rtn"]),
    ("W8A8", "int8", "int8", ["rtn", "smoothquant"]),
    ("W4 g128", "int4:g128", None, ["rtn", "gptq", "awq"]),
    ("W4 g32", "int4:g32", None, ["rtn", "gptq", "awq"]),
    ("W3 g32", "int3:g32", None, ["rtn", "gptq", "awq"]),
    ("MXFP4", "mxfp4", None, ["rtn", "gptq", "awq"]),
    ("NVFP4", "nvfp4", None, ["rtn", "gptq", "awq"]),
]
QUICK_FORMATS = ("W8", "W8A8", "W4 g128", "W4 g32")  # peers; modelpress runs only QUICK_MP in --quick
QUICK_MP = ("W8A8", "W4 g32")
QUICK_MODELS = ["digits-cnn", "ctr", "shakespeare-lm"]
QUICK_BATCHES = 2  # --quick: calibration and evaluation batches per model
# digits-cnn only: W4A8, plain and with BatchNorm folding + cross-layer equalization + AdaRound
W4A8_CNN = [("rtn", [{"quantize": {"weights": "int4", "activations": "int8", "method": "rtn"}}]),
            ("fold_bn+equalize+adaround", [{"fold_bn": {}}, {"equalize": {}},
                                           {"quantize": {"weights": "int4", "activations": "int8",
                                                         "method": "adaround"}}])]
METRIC_COLS = {  # task type -> (metric, header, format); the first is the headline metric
    "EmbeddingTask": [("embedding_cosine", "cosine", ".4f"), ("neighbour_overlap", "nbr@10", ".3f"),
                      ("similarity_spearman", "sim. spearman", ".4f")],
    "LanguageModelTask": [("perplexity", "perplexity", ".3f"), ("kl_divergence", "KL", ".5f"),
                          ("top1_agreement", "top-1 agr.", ".3f"), ("choice_accuracy", "choice acc.", ".2f")],
    "ClassificationTask": [("accuracy", "accuracy", ".4f"), ("f1", "F1", ".4f"), ("kl_divergence", "KL", ".4f"),
                           ("top1_agreement", "top-1 agr.", ".4f")],
    "CTRTask": [("auc", "AUC", ".4f"), ("logloss", "logloss", ".4f"), ("sqnr_db", "SQNR dB", ".1f")],
}


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def base_row(model: str, fmt: str, tool: str, method: str) -> dict[str, Any]:
    return {"model": model, "format": fmt, "tool": tool, "method": method, "status": "ok", "reason": "",
            "metrics": {}, "bytes": None, "reference_bytes": None, "ratio": None, "latency": {}, "compress_s": None,
            "notes": []}


def measure(row, entry, quantized, t_compress, repeats, size=None) -> dict:
    """Fill quality, size and latency of `quantized` against the zoo's float model."""
    row["compress_s"] = t_compress
    row["metrics"] = evaluate_pair(entry.task, entry.model, quantized)
    inp = entry.task.batches()[0][0]
    lat = compare_latency(entry.model, quantized, inp, warmup=2, repeats=repeats)
    row["latency"] = {"reference_ms": lat["reference"] * 1e3, "compressed_ms": lat["compressed"] * 1e3,
                      "speedup": lat["speedup"]}
    row["reference_bytes"] = true_bytes(entry.model)[0]
    if size is None:
        size, unwrapped = true_bytes(quantized)
        if unwrapped:
            row["notes"].append("size: tensor subclasses unwrapped (model_bytes would count their float size)")
        elif size != mp.evaluate.model_bytes(quantized):
            row["notes"].append("size differs from model_bytes")
    row["bytes"] = size
    if size == row["reference_bytes"]:
        row["notes"].append("no layer quantized (same bytes as float)")
    row["ratio"] = row["reference_bytes"] / max(size, 1)
    return row


def _one_row(inp: Any) -> Any:
    """The first sample of a batch (compress's own latency call, which this script does not use, stays cheap)."""
    if isinstance(inp, torch.Tensor):
        return inp[:1]
    if isinstance(inp, dict):
        return {k: _one_row(v) for k, v in inp.items()}
    return type(inp)(_one_row(v) for v in inp)


def run_modelpress(entry, fmt: str, method: str, steps: list, repeats: int) -> dict:
    row = base_row(entry.name, fmt, "modelpress", method)
    recipe = {"name": f"{fmt} {method}", "steps": steps}
    try:
        mp.load_recipe(recipe)  # an unknown step or method fails here, before any work
    except (ModuleNotFoundError, ImportError, ValueError) as e:
        row.update(status="n/a", reason=f"not available ({one_line(e)})")
        return row
    model = copy.deepcopy(entry.model)
    done: list[float] = []

    def progress(stage, i, total):
        if stage == "quantize" and total and i == total:
            done.append(time.perf_counter())

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            report = mp.compress(model, recipe, calib=entry.calib, eval=None, progress=progress,
                                 latency_input=_one_row(entry.task.batches()[0][0]), latency_repeats=1)
        t = (done[-1] - t0) if done else report.seconds
        if not done:
            row["notes"].append("time includes a latency call")
        row["notes"] += sorted({str(w.message).split(":")[0] for w in caught if "stay float" in str(w.message)})
        measure(row, entry, model, t, repeats)
    except Exception as e:  # noqa: BLE001 - a failed method is a result, not a crash
        row.update(status="failed", reason=one_line(e))
        traceback.print_exc(limit=-4)
    return row


def run_peer(entry, peer, scope: Scope, repeats: int) -> dict:
    row = base_row(entry.name, peer.fmt, peer.tool, peer.method)
    skip = peer.only_if(scope)
    if skip:
        row.update(status="n/a", reason=skip)
        return row
    try:
        peer.prepare()
        model = copy.deepcopy(entry.model)
        t0 = time.perf_counter()
        model, notes = peer.run(model, entry, scope)
        t = time.perf_counter() - t0
        model.eval()
        row["notes"] += notes
        measure(row, entry, model, t, repeats)
        if peer.tool == "llm-compressor":  # last: saving compresses the model in place
            row["notes"].append(f"in-memory bytes (float + scales): {row['bytes']}")
            row["bytes"] = llmc_packed_bytes(model)
            row["ratio"] = row["reference_bytes"] / row["bytes"]
    except Exception as e:  # noqa: BLE001
        row.update(status="failed", reason=one_line(e))
        traceback.print_exc(limit=-4)
    return row


def build_entry(name: str, tiny: bool, eval_batches: int | None):
    entry = zoo.build(name, tiny=tiny)
    if tiny:
        entry = dataclasses.replace(entry, calib=entry.calib[:QUICK_BATCHES])
        eval_batches = eval_batches or QUICK_BATCHES
    if eval_batches:
        task = entry.task
        kw = {"data": task.data[:eval_batches]}
        if getattr(task, "choices", None):
            kw["choices"] = task.choices[: eval_batches * 8]
        entry = dataclasses.replace(entry, task=dataclasses.replace(task, **kw))
    return entry


def model_jobs(name: str, quick: bool):
    """[(format label, method, recipe steps)] for modelpress on this model."""
    scope = SCOPES.get(name, Scope())
    jobs = []
    for label, w, a, methods in FORMATS:
        if quick and label not in QUICK_MP:
            continue
        for m in methods:
            q = {"weights": w, "method": m, **({"activations": a} if a else {}),
                 **({"exclude": list(scope.exclude)} if scope.exclude else {})}
            jobs.append((label, m, [{"quantize": q}]))
    if name.startswith("digits"):
        jobs += [("W4A8", m, steps) for m, steps in W4A8_CNN]
    return jobs


# --- reporting ---------------------------------------------------------------------------------------------

def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table(rows: list[dict], task_type: str) -> str:
    cols = METRIC_COLS.get(task_type, [])
    ok = [r for r in rows if r["status"] == "ok"]
    head = ["format", "tool", "method", *[h for _, h, _ in cols], "size MB (×)", "latency ms (× float)",
            "compress s", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if ok:
        m0, r0 = ok[0]["metrics"], ok[0]
        ref = [_fmt((m0.get(k) or {}).get("reference"), s) if k in m0 and m0[k]["reference"] is not None else "–"
               for k, _, s in cols]
        ref_ms = statistics.median(r["latency"]["reference_ms"] for r in ok)  # measured again beside every row
        lines.append("| float | – | – | " + " | ".join(ref) + f" | {r0['reference_bytes'] / 1e6:.2f} | "
                     f"{ref_ms:.2f} (median of {len(ok)} runs) | – | |")
    for r in rows:
        if r["status"] != "ok":
            vals = ["–"] * (len(cols) + 3) + [f"{r['status']}: {r['reason']}".replace("|", "/")]
        else:
            vals = [_fmt((r["metrics"].get(k) or {}).get("compressed"), s) for k, _, s in cols]
            vals += [f"{r['bytes'] / 1e6:.2f} ({r['ratio']:.1f}×)",
                     f"{r['latency']['compressed_ms']:.2f} ({r['latency']['speedup']:.2f}×)",
                     f"{r['compress_s']:.1f}", "; ".join(r["notes"]).replace("|", "/")]
        lines.append(f"| {r['format']} | {r['tool']} | {r['method']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _get(rows, model, fmt, tool, method, metric):
    for r in rows:
        if (r["model"], r["format"], r["tool"], r["method"], r["status"]) == (model, fmt, tool, method, "ok"):
            if metric == "compress_s":
                return r["compress_s"]
            return (r["metrics"].get(metric) or {}).get("compressed")
    return None


def targets(rows: list[dict], ref: dict[str, dict]) -> list[tuple[str, str]]:
    """Issue-4 targets: (description, 'met ...' / 'NOT met ...' / 'not measured ...')."""
    out = []

    def gap(model, fmt, method):
        if model == "minilm":
            c = _get(rows, model, fmt, "modelpress", method, "embedding_cosine")
            return None if c is None else 1 - c
        p = _get(rows, model, fmt, "modelpress", method, "perplexity")
        return None if p is None or model not in ref else p - ref[model]["perplexity"]

    for model in ("minilm", "shakespeare-lm"):
        for fmt in ("W4 g128", "W4 g32"):
            g_rtn, g_gptq = gap(model, fmt, "rtn"), gap(model, fmt, "gptq")
            what = f"{model} {fmt}: GPTQ closes >= half of RTN's gap ({'1-cosine' if model == 'minilm' else 'Δppl'})"
            if g_rtn is None or g_gptq is None:
                out.append((what, "not measured"))
            elif g_rtn <= 0:
                out.append((what, f"n/a: RTN shows no loss ({g_rtn:.4g}; GPTQ {g_gptq:.4g})"))
            else:
                closed = (g_rtn - g_gptq) / g_rtn if g_rtn > 0 else float("nan")
                verdict = "met" if closed >= 0.5 else "NOT met"
                out.append((what, f"{verdict}: RTN {g_rtn:.4g}, GPTQ {g_gptq:.4g}, closed {closed:.0%}"))
    cos = {m: _get(rows, "minilm", "W4 g32", "modelpress", m, "embedding_cosine") for m in ("rtn", "gptq", "awq")}
    cos = {m: c for m, c in cos.items() if c is not None}
    best = max(cos, key=cos.get) if cos else None
    out.append(("minilm W4 g32 cosine >= 0.99 (best method)", "not measured" if not best else
                f"{'met' if cos[best] >= 0.99 else 'NOT met'}: {best} {cos[best]:.4f}"))
    c = _get(rows, "minilm", "W8A8", "modelpress", "smoothquant", "embedding_cosine")
    out.append(("minilm W8A8 SmoothQuant cosine >= 0.997", "not measured" if c is None else
                f"{'met' if c >= 0.997 else 'NOT met'}: {c:.4f}"))
    p_mp = _get(rows, "shakespeare-lm", "W4 g128", "modelpress", "gptq", "perplexity")
    p_lc = _get(rows, "shakespeare-lm", "W4 g128", "llm-compressor", "GPTQ W4A16 g128", "perplexity")
    t_mp = _get(rows, "shakespeare-lm", "W4 g128", "modelpress", "gptq", "compress_s")
    t_lc = _get(rows, "shakespeare-lm", "W4 g128", "llm-compressor", "GPTQ W4A16 g128", "compress_s")
    what = "shakespeare-lm W4 g128 GPTQ: Δppl <= llm-compressor's and compression time no longer"
    if None in (p_mp, p_lc, t_mp, t_lc):
        out.append((what, "not measured"))
    else:
        q, t = ("met" if p_mp <= p_lc else "NOT met"), ("met" if t_mp <= t_lc else "NOT met")
        verdict = "met" if p_mp <= p_lc and t_mp <= t_lc else "NOT met"
        detail = f"perplexity {q} ({p_mp:.3f} vs {p_lc:.3f}), time {t} ({t_mp:.1f} s vs {t_lc:.1f} s)"
        out.append((what, f"{verdict}: {detail}"))
    for fmt, method, limit in (("W8A8", None, 0.3), ("W4A8", "fold_bn+equalize+adaround", 1.0)):
        accs = {r["method"]: r["metrics"]["accuracy"]["delta"] * 100 for r in rows
                if r["model"] == "digits-cnn" and r["format"] == fmt and r["tool"] == "modelpress"
                and r["status"] == "ok" and (method is None or r["method"] == method)}
        what = f"digits-cnn {fmt}{' ' + method if method else ''} within {limit} accuracy points"
        if not accs:
            out.append((what, "not measured"))
        else:
            b = max(accs, key=accs.get)
            out.append((what, f"{'met' if accs[b] >= -limit else 'NOT met'}: {b} {accs[b]:+.2f} points"))
    return out


def render(rows: list[dict], models: dict[str, dict], quick: bool = False) -> tuple[str, dict, list]:
    """(markdown: a table per model and the issue-4 targets, float reference metrics, targets)."""
    order = {label: i for i, (label, *_) in enumerate(FORMATS)} | {"W4A8": len(FORMATS)}
    ref = {}
    out = [f"## Quality versus peers{' (--quick, tiny models)' if quick else ''}"]
    for n, info in models.items():
        mine = sorted((r for r in rows if r["model"] == n), key=lambda r: order.get(r["format"], 99))
        ok = [r for r in mine if r["status"] == "ok"]
        if ok:
            ref[n] = {k: v["reference"] for k, v in ok[0]["metrics"].items() if v["reference"] is not None}
        out += [f"\n### {n}: {info['description']}\n", table(mine, info["task"])]
    tg = targets(rows, ref)
    out += ["\n### Issue-4 targets\n"] + [f"- {what}: **{res}**" for what, res in tg]
    return "\n".join(out), ref, tg


def _task_of(row: dict) -> str:
    return next((t for t, cols in METRIC_COLS.items() if cols[0][0] in row["metrics"]), "")


def report_files(paths: list[str]) -> int:
    """Print the tables of one or more --json files together (e.g. one file per model)."""
    rows, models, envs = [], {}, []
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        rows += d["rows"]
        models |= d.get("models") or {r["model"]: {"description": r["model"], "task": _task_of(r)} for r in d["rows"]
                                      if r["status"] == "ok"}
        envs.append(d["environment"])
    print(render(rows, models)[0])
    for p, e in zip(paths, envs):
        print(f"\n{p}: {e['date']}, {e['cpu']}, {e['cores']} cores, {e['seconds']:.0f} s, `{e['command']}`")
    return 0


def environment() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("torch", "transformers", "torchao", "optimum-quanto", "nncf", "llmcompressor", "compressed-tensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "versions": versions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated zoo names (default: {','.join(MODELS)}; with --quick "
                    f"{','.join(QUICK_MODELS)}: minilm has no tiny build, it is the real 22.6M-parameter model)")
    ap.add_argument("--quick", action="store_true", help="tiny zoo models and fewer formats: a smoke run")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}, or none")
    ap.add_argument("--no-modelpress", action="store_true", help="run the peers only")
    ap.add_argument("--eval-batches", default="", help="limit evaluation batches, e.g. minilm=8,shakespeare-lm=8")
    ap.add_argument("--repeats", type=int, help="latency repeats, median taken (default 10; 3 with --quick)")
    ap.add_argument("--json", help="write all rows and the environment to this JSON file")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="only print the tables of earlier --json files")
    args = ap.parse_args(argv)
    if args.report:
        return report_files(args.report)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10

    names = [n for n in (args.models or ",".join(QUICK_MODELS if args.quick else MODELS)).split(",") if n]
    peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; available: {', '.join(PEERS)}")
    limits = {k: int(v) for k, v in (kv.split("=") for kv in args.eval_batches.split(",") if kv)}
    t_start = time.perf_counter()
    entries = {}
    for n in names:
        t0 = time.perf_counter()
        entries[n] = build_entry(n, args.quick, limits.get(n))
        print(f"# built {n} in {time.perf_counter() - t0:.1f} s: {entries[n].description}", flush=True)
    rows: list[dict] = []

    def add(row):
        rows.append(row)
        m = row["metrics"]
        head = next((k for k, _, _ in METRIC_COLS.get(type(entries[row['model']].task).__name__, []) if k in m), None)
        val = f"{head}={m[head]['compressed']:.4f}" if head else ""
        print(f"[{time.perf_counter() - t_start:6.0f} s] {row['model']:>14} {row['format']:>8} {row['tool']} "
              f"{row['method']}: {row['status']} {val} {row['reason']}", flush=True)

    if not args.no_modelpress:  # modelpress first: peers (NNCF, llm-compressor) patch torch/transformers on import
        for n, entry in entries.items():
            for fmt, method, steps in model_jobs(n, args.quick):
                add(run_modelpress(entry, fmt, method, steps, args.repeats))
    for p in peers:
        for n, entry in entries.items():
            for peer in PEERS[p]:
                if args.quick and peer.fmt not in QUICK_FORMATS:
                    continue
                add(run_peer(entry, peer, SCOPES.get(n, Scope()), args.repeats))

    models = {n: {"description": e.description, "task": type(e.task).__name__} for n, e in entries.items()}
    text, ref, tg = render(rows, models, args.quick)
    print(text)
    env = environment()
    env["seconds"] = time.perf_counter() - t_start
    env["command"] = " ".join(["benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"\n{env['date']}, {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}, "
          f"{env['seconds']:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "models": models, "reference": ref, "rows": rows,
                       "targets": [{"target": a, "result": b} for a, b in tg]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
