"""Pruning benchmark: the issue's targets in one run, on the zoo models (CPU).

    PYTHONPATH=src python benchmarks/pruning.py [--only unstructured,bytes,channels,transformer] [--json out.json]
        [--models minilm,shakespeare-lm] [--methods magnitude,wanda,sparsegpt]  (rows of the unstructured section)

- unstructured: SparseGPT and Wanda against magnitude at 50 % unstructured and 2:4 on minilm (1 - embedding cosine
  to the float model) and shakespeare-lm (perplexity increase), every Linear of the blocks (not the embeddings or
  lm_head); "closed" = 1 - gap(method) / gap(magnitude) (target >= 0.6).
- bytes: true bytes of the pruned layers (weights + biases) against the same layers dense in fp32, for 50 %
  unstructured fp32 storage and SparseGPT 2:4 + GPTQ int4:g32 (targets <= 0.56x and <= 0.17x), on minilm.
- channels: digits-cnn, 50 % (and 25 %) of the channels of every group removed; accuracy right after removal
  (BatchNorm statistics re-estimated) for every importance; EZCrop and L1 then 300 recovery steps: accuracy,
  parameters and latency against float (latency: medians of interleaved runs).
- transformer: minilm, 50 % FFN neurons and 25 % heads removed then `--transformer-steps` (default 200) recovery
  steps matching the float embeddings on the training sentences; cosine to the float model and to the float model after the same
  recovery; parameters, latency; reloads through mp.load and, FFN-only, through from_pretrained.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch

import modelpress as mp
from modelpress import zoo
from modelpress.evaluate import evaluate_model, evaluate_pair, measure_latency

SECTIONS = ("unstructured", "bytes", "channels", "transformer")
METHODS = ("magnitude", "wanda", "sparsegpt")
TARGETS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}
SCOPE = {"minilm": dict(include=["bert.encoder.*"]), "shakespeare-lm": dict(include=["model.layers.*"])}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def interleaved(a, b, x, rounds=7, repeats=10) -> dict:
    """Median latency of a and b measured alternately (a, b, a, b, ...) on the same input."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(measure_latency(a, x, warmup=2, repeats=repeats))
        tb.append(measure_latency(b, x, warmup=2, repeats=repeats))
    ra, rb = statistics.median(ta), statistics.median(tb)
    return {"reference_ms": ra * 1e3, "pruned_ms": rb * 1e3, "speedup": ra / rb}


def quality(name, entry, model) -> float:
    """The gap metric: 1 - cosine (minilm) or perplexity (shakespeare-lm)."""
    if name == "minilm":
        return 1.0 - evaluate_pair(entry.task, entry.model, model)["embedding_cosine"]["compressed"]
    return evaluate_model(entry.task, model)["perplexity"]


def pruned_layer_bytes(model, names) -> tuple[int, int]:
    """(bytes held by the layers `names`, their dense fp32 bytes)."""
    rows = {r.name: r for r in mp.inspect(model).rows}
    return sum(rows[n].bytes for n in names), sum(rows[n].params * 4 for n in names)


def unstructured(entries, out, models=tuple(SCOPE), methods=METHODS):
    """`models` / `methods`: a subset of the rows; magnitude always runs (the gap is measured against it)."""
    methods = ("magnitude",) + tuple(m for m in methods if m != "magnitude")
    rows = []
    for name in models:
        e = entries(name)
        base = quality(name, e, e.model)
        log(f"{name}: float {'1 - cosine' if name == 'minilm' else 'perplexity'} {base:.4f}")
        for tname, target in TARGETS.items():
            res = {}
            for method in methods:
                m = copy.deepcopy(e.model)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mp.prune_(m, mp.PruneConfig(method=method, **target, **SCOPE[name]), calib=e.calib)
                secs = time.perf_counter() - t0
                res[method] = (quality(name, e, m), secs)
                log(f"  {tname} {method}: {res[method][0]:.4f} ({secs:.1f} s)")
            gap_mag = res["magnitude"][0] - base
            for method in methods:
                q, secs = res[method]
                rows.append({"model": name, "target": tname, "method": method, "metric": q, "float": base,
                             "gap": q - base, "closed": None if method == "magnitude" else 1 - (q - base) / gap_mag,
                             "seconds": secs})
    out["unstructured"] = rows


def bytes_section(entries, out):
    e = entries("minilm")
    names = [n for n, m in e.model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("bert.encoder")]
    rows = []
    m = copy.deepcopy(e.model)
    mp.prune_(m, mp.PruneConfig(sparsity=0.5, method="sparsegpt", **SCOPE["minilm"]), calib=e.calib)
    b, dense = pruned_layer_bytes(m, names)
    rows.append({"what": "50 % unstructured, fp32 values + bitmask", "bytes": b, "dense_fp32": dense,
                 "ratio": b / dense, "target": 0.56,
                 "cosine": 1 - quality("minilm", e, m)})
    m = copy.deepcopy(e.model)
    mp.prune_(m, mp.PruneConfig(pattern="2:4", method="sparsegpt", **SCOPE["minilm"]), calib=e.calib)
    mp.quantize_(m, mp.QuantConfig(weights="int4:g32", **SCOPE["minilm"]), calib=e.calib, method="gptq")
    b, dense = pruned_layer_bytes(m, names)
    with tempfile.TemporaryDirectory() as d:
        mp.save(m, os.path.join(d, "m"))
        saved = mp.inspect_saved(os.path.join(d, "m"))
        on_disk = sum(r.bytes for r in saved.rows if r.name in names)
        x = e.task.batches()[0][0]
        exact = torch.equal(mp.load(os.path.join(d, "m"), copy.deepcopy(e.model))(**x), m(**x))
    rows.append({"what": "2:4 SparseGPT + GPTQ int4:g32 (+ bitmask)", "bytes": b, "dense_fp32": dense,
                 "ratio": b / dense, "target": 0.17, "saved_bytes": on_disk, "reload_bit_exact": exact,
                 "cosine": 1 - quality("minilm", e, m)})
    for r in rows:
        log(f"  {r['what']}: {r['ratio']:.4f}x of dense fp32 (cosine {r['cosine']:.4f})")
    out["bytes"] = rows


def channels(entries, out):
    from modelpress.train.recover import recover_
    from modelpress.transforms.prune import ChannelPruneConfig, prune_channels_

    e = entries("digits-cnn")
    ref = e.model
    base = evaluate_model(e.task, ref)["accuracy"]
    x = e.task.batches()[0][0]
    ranking = []  # accuracy right after removal (BatchNorm statistics re-estimated), every importance
    for ratio in (0.5, 0.25):
        for importance in ("ezcrop", "l1", "l2", "taylor", "activation"):
            m = copy.deepcopy(ref)
            prune_channels_(m, ChannelPruneConfig(ratio=ratio, importance=importance), calib=e.calib, train=e.train)
            ranking.append({"ratio": ratio, "importance": importance, "accuracy": evaluate_model(e.task, m)["accuracy"]})
            log(f"  ranking {ratio} {importance}: {ranking[-1]['accuracy']:.4f}")
    out["channel_ranking"] = ranking
    rows = []
    for importance in ("ezcrop", "l1"):
        torch.manual_seed(0)
        m = copy.deepcopy(ref)
        info = prune_channels_(m, ChannelPruneConfig(ratio=0.5, importance=importance), calib=e.calib)
        before = evaluate_model(e.task, m)["accuracy"]
        stats = recover_(m, e.train, steps=300, lr=3e-3)
        after = evaluate_model(e.task, m)["accuracy"]
        lat = interleaved(ref, m, x)
        rows.append({"importance": importance, "float_accuracy": base, "accuracy_before_recovery": before,
                     "accuracy_after_recovery": after, "params": info["params_after"],
                     "float_params": info["params_before"], "params_ratio": info["params_after"] / info["params_before"],
                     "recovery_seconds": stats["seconds"], **lat})
        log(f"  digits-cnn {importance}: before {before:.4f} after {after:.4f} (float {base:.4f}), "
            f"params x{rows[-1]['params_ratio']:.3f}, speedup {lat['speedup']:.2f}")
    out["channels"] = rows


def step_log(stage, done, total, every=25):
    if done % every == 0 or done == total:
        log(f"    {stage} {done}/{total} at {time.strftime('%H:%M:%S')}")


def transformer(entries, out, steps=200):
    from transformers import AutoModel

    from modelpress.train.recover import recover_
    from modelpress.transforms.prune import TransformerPruneConfig, prune_transformer_

    e = entries("minilm")
    ref = e.model
    m = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BertConfig cannot describe pruned heads (reported below)
        info = prune_transformer_(m, TransformerPruneConfig(ffn=0.5, heads=0.25), calib=e.calib)
    cos_pruned = evaluate_pair(e.task, ref, m)["embedding_cosine"]["compressed"]
    log(f"  pruned: params x{info['params_after'] / info['params_before']:.3f}, cosine {cos_pruned:.4f}")
    stats = recover_(m, e.train, steps=steps, lr=1e-4, teacher=ref, progress=step_log)
    cos = evaluate_pair(e.task, ref, m)["embedding_cosine"]["compressed"]
    baseline = copy.deepcopy(ref)  # the unpruned model through the same recovery
    log(f"  pruned + recovery: cosine {cos:.4f}")
    recover_(baseline, e.train, steps=steps, lr=1e-4, teacher=ref, progress=step_log)
    cos_base = evaluate_pair(e.task, baseline, m)["embedding_cosine"]["compressed"]
    cos_base_float = evaluate_pair(e.task, ref, baseline)["embedding_cosine"]["compressed"]
    lat = interleaved(ref, m, e.task.batches()[0][0], rounds=5, repeats=5)
    x = e.task.batches()[0][0]
    with tempfile.TemporaryDirectory() as d:
        mp.save(m, os.path.join(d, "mp"))
        mp_exact = torch.equal(mp.load(os.path.join(d, "mp"), copy.deepcopy(ref))(**x), m(**x))
        ffn = copy.deepcopy(ref)
        prune_transformer_(ffn, TransformerPruneConfig(ffn=0.5), calib=e.calib)
        ffn.bert.save_pretrained(os.path.join(d, "hf"))
        again = AutoModel.from_pretrained(os.path.join(d, "hf"), add_pooling_layer=False).eval()
        with torch.no_grad():
            hf_exact = torch.equal(again(**x).last_hidden_state, ffn.bert(**x).last_hidden_state)
    row = {"ffn": info["ffn"], "heads": info["heads"], "params": info["params_after"],
           "float_params": info["params_before"], "params_ratio": info["params_after"] / info["params_before"],
           "cosine_before_recovery": cos_pruned, "cosine_vs_float": cos, "cosine_vs_recovered_float": cos_base,
           "recovered_float_vs_float": cos_base_float, "recovery_steps": steps,
           "recovery_seconds": stats["seconds"], "mp_load_bit_exact": mp_exact,
           "from_pretrained_ffn_only_bit_exact": hf_exact, "hf_config_describes_heads": info["hf_config_complete"],
           **lat}
    log(f"  minilm: cosine {cos_pruned:.4f} -> {cos:.4f} after recovery (vs recovered float {cos_base:.4f}), "
        f"params x{row['params_ratio']:.3f}, speedup {lat['speedup']:.2f}")
    out["transformer"] = row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections: {', '.join(SECTIONS)}")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--models", default=",".join(SCOPE), help="unstructured section: models (minilm, shakespeare-lm)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="unstructured section: methods (magnitude, the baseline, always runs)")
    ap.add_argument("--transformer-steps", type=int, default=200,
                    help="recovery steps of the transformer section (pruned model and unpruned baseline each)")
    args = ap.parse_args()
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; use {', '.join(SECTIONS)}")
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    if [m for m in models if m not in SCOPE] or [m for m in methods if m not in METHODS]:
        ap.error(f"--models: {', '.join(SCOPE)}; --methods: {', '.join(METHODS)}")
    cache = {}

    def entries(name):
        if name not in cache:
            cache[name] = zoo.build(name)
        return cache[name]

    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__}}
    t0 = time.perf_counter()
    sections = {"unstructured": lambda en, o: unstructured(en, o, models, methods), "bytes": bytes_section,
                "channels": channels, "transformer": lambda en, o: transformer(en, o, args.transformer_steps)}
    for s in wanted:
        log(f"== {s}")
        sections[s](entries, out)
    out["seconds"] = time.perf_counter() - t0
    text = json.dumps(out, indent=1, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
