"""Operator replacement and fusion on the zoo models, against the targets of issue 11, in one run.

Sections (each one also saves the replaced model and reloads it onto a fresh float model, bit-exactly):
  fusion     fuse_ on digits-cnn, digits-dwcnn and random layer chains: relative output error (target <= 1e-6)
  lowrank    minilm FFN (intermediate.dense, output.dense) at 50 % of their parameters: plain SVD vs ASVD vs
             whitened SVD: output error of each layer on held-out sentences, and the embeddings' cosine
  butterfly  DeBut on digits-cnn's Linear and digits-dwcnn's pointwise convs + Linear, fine-tuned: parameters of
             those layers (target <= 0.25x) and accuracy (target: within 1 pt of float)
  pq         product quantization of digits-cnn (target: >= 8x fewer weight bytes, accuracy within 1 pt) and of
             minilm's FFN (>= 8x; cosine next to int4 at similar bytes)

    python benchmarks/factorize.py [--only fusion,lowrank,butterfly,pq] [--quick] [--threads N] [--json FILE]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import modelpress as mp
from modelpress import zoo
from modelpress.calibrate import call_model
from modelpress.evaluate import evaluate_pair, model_bytes
from modelpress.select import select_modules
from modelpress.transforms.factorize import low_rank

FFN = [r"re:.*\.intermediate\.dense", r"re:.*\.layer\.\d+\.output\.dense"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def reload_exact(model: nn.Module, fresh: nn.Module, inputs) -> bool:
    """save -> load onto a fresh float model -> identical outputs on `inputs`."""
    with tempfile.TemporaryDirectory() as d:
        mp.save(model, Path(d) / "m")
        loaded = mp.load(Path(d) / "m", fresh)
        with torch.inference_mode():
            return all(torch.equal(call_model(loaded, x), call_model(model, x))
                       for x in inputs)


def accuracy(model: nn.Module, task) -> float:
    right = total = 0
    with torch.inference_mode():
        for x, y in task.data:
            right += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return right / total


def weight_params(model: nn.Module, names) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in names)


# --- fusion ------------------------------------------------------------------------------------------------

def fusion(quick: bool) -> list[dict]:
    rows = []
    for name in ("digits-cnn", "digits-dwcnn"):
        e = zoo.build(name)
        m = copy.deepcopy(e.model)
        out = mp.fuse_(m)
        xs = [x for x, _ in e.task.data]
        with torch.inference_mode():
            err = max(rel(m(x), e.model(x)) for x in xs)
        rows.append({"model": name, "fused": len(out["fold_bn"]) + len(out["fused"]), "what": "BatchNorm folding",
                     "max_rel_error": err, "reload_exact": reload_exact(m, zoo.build(name).model, xs[:1])})
    torch.manual_seed(0)

    def chains():
        torch.manual_seed(0)
        return {
            "Linear 256->512->512->128 (no nonlinearity)": nn.Sequential(
                nn.Linear(256, 512), nn.Linear(512, 512), nn.Linear(512, 128)),
            "Conv3x3 32->64 -> BN -> Conv1x1 64->64": nn.Sequential(
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 1)),
        }

    for what, m in chains().items():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
        m.eval()
        ref = copy.deepcopy(m)
        x = torch.randn(64, 256) if "Linear" in what else torch.randn(16, 32, 16, 16)
        out = mp.fuse_(m, allow_growth=True)
        with torch.inference_mode():
            err = rel(m(x), ref(x))
        fresh = chains()[what]
        for mod in fresh.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
        rows.append({"model": "random", "what": what, "fused": len(out["fold_bn"]) + len(out["fused"]),
                     "max_rel_error": err, "reload_exact": reload_exact(m, fresh.eval(), [x])})
    return rows


# --- low rank ----------------------------------------------------------------------------------------------

def ffn_grams(model: nn.Module, batches, names) -> dict[str, torch.Tensor]:
    """X^T X (float64) of each named layer's inputs over the non-padding tokens of `batches`."""
    grams: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def hook(name):
        def fn(_m, args):
            x = args[0][mask[0].bool()].double()  # [tokens, in]
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for b in batches:
                mask[:] = [b["attention_mask"]]
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return grams


def lowrank(quick: bool) -> list[dict]:
    e = zoo.build("minilm", tiny=quick)
    names = [n for n, _ in select_modules(e.model, FFN, None, (nn.Linear,))]
    heldout = [x for x, _ in e.task.batches()]
    calib_g = ffn_grams(e.model, e.calib, names)
    held_g = ffn_grams(e.model, heldout, names)
    rows = []
    for method in ("svd", "asvd", "whiten"):
        errs = []
        for n in names:  # each layer on its own: factors from calibration sentences, error on held-out ones
            w = e.model.get_submodule(n).weight.detach().double()
            down, up, _ = low_rank(w, None, calib_g[n], method, ratio=0.5)
            d = w - up @ down
            g = held_g[n]
            errs.append(math.sqrt(float(torch.trace(d @ g @ d.T) / torch.trace(w @ g @ w.T))))
        m = copy.deepcopy(e.model)
        t0 = time.perf_counter()
        out = mp.factorize_(m, mp.FactorizeConfig(ratio=0.5, method=method, include=FFN), calib=e.calib)
        seconds = time.perf_counter() - t0
        metrics = evaluate_pair(e.task, e.model, m)
        rows.append({"method": method, "layers": len(out["ranks"]), "ranks": sorted(set(out["ranks"].values())),
                     "params_ratio": out["params_after"] / out["params_before"],
                     "layer_output_error_mean": sum(errs) / len(errs), "layer_output_error_max": max(errs),
                     "embedding_cosine": metrics["embedding_cosine"]["compressed"],
                     "neighbour_overlap": metrics["neighbour_overlap"]["compressed"], "seconds": seconds,
                     "reload_exact": reload_exact(m, zoo.build("minilm", tiny=True).model, heldout[:1])})
    return rows


# --- butterfly ---------------------------------------------------------------------------------------------

BUTTERFLY = {"digits-cnn": ["classifier"],
             "digits-dwcnn": ["features.2.0", "features.5.0", "features.7.0", "classifier"]}


def butterfly(quick: bool, steps: int, lr: float) -> list[dict]:
    rows = []
    for name, layers in BUTTERFLY.items():
        e = zoo.build(name)
        m = copy.deepcopy(e.model)
        mp.fuse_(m)  # BatchNorm folded first (the fine-tuning keeps running statistics anyway)
        before = weight_params(m, layers)
        t0 = time.perf_counter()
        out = mp.butterfly_(m, mp.ButterflyConfig(ratio=0.25, include=layers, finetune_steps=steps, lr=lr),
                            calib=e.calib, train=e.train, teacher=e.model)
        seconds = time.perf_counter() - t0
        after = sum(sum(f.numel() for f in m.get_submodule(n).factors) for n in layers)
        xs = [x for x, _ in e.task.data]
        rows.append({"model": name, "layers": layers, "chains": out["chains"], "fit_error": out["fit_error"],
                     "params_before": before, "params_after": after, "params_ratio": after / before,
                     "accuracy_float": accuracy(e.model, e.task), "accuracy": accuracy(m, e.task),
                     "finetune_steps": steps, "seconds": seconds,
                     "reload_exact": reload_exact(m, zoo.build(name).model, xs[:1])})
    return rows


# --- product quantization ------------------------------------------------------------------------------------

def pq_digits(quick: bool, steps: int, lr: float, entries: int) -> dict:
    e = zoo.build("digits-cnn")
    m = copy.deepcopy(e.model)
    mp.fuse_(m)
    layers = [n for n, mod in m.named_modules() if type(mod) in (nn.Conv2d, nn.Linear)]
    before = 4 * weight_params(m, layers)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1-channel input conv stays float (named in the warning)
        out = mp.product_quantize_(m, mp.PQConfig(dim=4, entries=entries, finetune_steps=steps, lr=lr),
                                   calib=e.calib, train=e.train, teacher=e.model)
    seconds = time.perf_counter() - t0
    after = sum(4 * m.get_submodule(n).weight.numel() for n in layers if n not in out["layers"]) + out["bytes_after"]
    xs = [x for x, _ in e.task.data]
    return {"model": "digits-cnn", "config": f"pq d4 k{entries}", "layers": list(out["layers"]),
            "kept_float": list(out["skipped"]), "weight_bytes_before": before, "weight_bytes_after": after,
            "weight_bytes_ratio": before / after, "model_bytes_ratio": model_bytes(e.model) /
            model_bytes(m), "accuracy_float": accuracy(e.model, e.task), "accuracy": accuracy(m, e.task),
            "finetune_steps": steps, "seconds": seconds,
            "reload_exact": reload_exact(m, zoo.build("digits-cnn").model, xs[:1])}


def pq_minilm(quick: bool, steps: int) -> list[dict]:
    e = zoo.build("minilm", tiny=quick)
    names = [n for n, _ in select_modules(e.model, FFN, None, (nn.Linear,))]
    before = 4 * weight_params(e.model, names)
    heldout = [x for x, _ in e.task.batches()]
    rows = []
    for label, run in [
        ("pq d2 k128", lambda m: mp.product_quantize_(m, mp.PQConfig(dim=2, entries=128, include=FFN,
                                                                     finetune_steps=steps), calib=e.calib)),
        ("pq d4 k256", lambda m: mp.product_quantize_(m, mp.PQConfig(dim=4, entries=256, include=FFN,
                                                                     finetune_steps=steps), calib=e.calib)),
        ("int4:g128 (rtn)", lambda m: mp.quantize_(m, mp.QuantConfig(weights="int4:g128", include=FFN))),
        ("int4:g32 (rtn)", lambda m: mp.quantize_(m, mp.QuantConfig(weights="int4:g32", include=FFN))),
        ("int2:g32 (rtn)", lambda m: mp.quantize_(m, mp.QuantConfig(weights="int2:g32", include=FFN))),
    ]:
        m = copy.deepcopy(e.model)
        t0 = time.perf_counter()
        run(m)
        seconds = time.perf_counter() - t0
        rows_ = {r.name: r for r in mp.inspect(m).rows}
        after = sum(rows_[n].bytes - 4 * m.get_submodule(n).bias.numel() for n in names)  # weights only
        metrics = evaluate_pair(e.task, e.model, m)
        rows.append({"model": "minilm FFN", "config": label, "weight_bytes_ratio": before / after,
                     "bits_per_weight": 8 * after / (before / 4),
                     "embedding_cosine": metrics["embedding_cosine"]["compressed"],
                     "neighbour_overlap": metrics["neighbour_overlap"]["compressed"], "seconds": seconds,
                     "reload_exact": reload_exact(m, zoo.build("minilm", tiny=True).model, heldout[:1])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="fusion,lowrank,butterfly,pq")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny minilm data, few fine-tuning steps")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--threads", type=int, help="torch threads (1 is fastest on a loaded machine)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    steps = 20 if args.quick else None
    if "fusion" in only:
        res["fusion"] = fusion(args.quick)
        print("\n## Fusion (target: relative error <= 1e-6)\n\n| model | fusion | pairs merged | max relative error | "
              "reload bit-exact |\n|---|---|---|---|---|")
        for r in res["fusion"]:
            print(f"| {r['model']} | {r['what']} | {r['fused']} | {r['max_rel_error']:.2e} "
                  f"{'met' if r['max_rel_error'] <= 1e-6 else 'MISSED'} | {r['reload_exact']} |")
    if "lowrank" in only:
        res["lowrank"] = lowrank(args.quick)
        print("\n## Low rank: minilm FFN at 50 % of its parameters (target: activation-aware < plain SVD)\n\n"
              "| method | layers | params | layer output error, held-out (mean / max) | embedding cosine | "
              "neighbour overlap | seconds | reload bit-exact |\n|---|---|---|---|---|---|---|---|")
        for r in res["lowrank"]:
            print(f"| {r['method']} | {r['layers']} | {r['params_ratio']:.3f}x | {r['layer_output_error_mean']:.4f} / "
                  f"{r['layer_output_error_max']:.4f} | {r['embedding_cosine']:.4f} | {r['neighbour_overlap']:.3f} | "
                  f"{r['seconds']:.1f} | {r['reload_exact']} |")
    if "butterfly" in only:
        res["butterfly"] = butterfly(args.quick, steps or 400, 3e-3)
        print("\n## DeBut (targets: those layers' parameters <= 0.25x, accuracy within 1 pt)\n\n"
              "| model | layers | chains | params | accuracy float -> DeBut | fine-tuning | reload bit-exact |\n"
              "|---|---|---|---|---|---|---|")
        for r in res["butterfly"]:
            ok = r["params_ratio"] <= 0.25 and r["accuracy"] >= r["accuracy_float"] - 0.01
            chains = "; ".join(f"{n}: {c}" for n, c in r["chains"].items())
            print(f"| {r['model']} | {len(r['layers'])} | {chains} | {r['params_before']:,} -> {r['params_after']:,} "
                  f"({r['params_ratio']:.3f}x) | {r['accuracy_float']:.4f} -> {r['accuracy']:.4f} "
                  f"{'met' if ok else 'MISSED'} | {r['finetune_steps']} steps, {r['seconds']:.0f} s | "
                  f"{r['reload_exact']} |")
    if "pq" in only:
        res["pq_digits"] = [pq_digits(args.quick, steps or 300, 1e-3, k) for k in (256, 64)]
        res["pq_minilm"] = pq_minilm(args.quick, steps or 100)
        print("\n## Product quantization (targets: >= 8x fewer weight bytes; digits accuracy within 1 pt)\n\n"
              "| model | config | weight bytes | model bytes | accuracy float -> PQ | fine-tuning | reload bit-exact "
              "|\n|---|---|---|---|---|---|---|")
        for r in res["pq_digits"]:
            ok = r["weight_bytes_ratio"] >= 8 and r["accuracy"] >= r["accuracy_float"] - 0.01
            print(f"| {r['model']} | {r['config']} | ÷{r['weight_bytes_ratio']:.2f} | ÷{r['model_bytes_ratio']:.2f} | "
                  f"{r['accuracy_float']:.4f} -> {r['accuracy']:.4f} {'met' if ok else 'MISSED'} | "
                  f"{r['finetune_steps']} steps, {r['seconds']:.0f} s | {r['reload_exact']} |")
        print("\n| model | config | FFN weight bytes | bits/weight | embedding cosine | neighbour overlap | "
              "reload bit-exact |\n|---|---|---|---|---|---|---|")
        for r in res["pq_minilm"]:
            print(f"| {r['model']} | {r['config']} | ÷{r['weight_bytes_ratio']:.2f} | {r['bits_per_weight']:.2f} | "
                  f"{r['embedding_cosine']:.4f} | {r['neighbour_overlap']:.3f} | {r['reload_exact']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
