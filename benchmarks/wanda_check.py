"""Why Wanda closes less of magnitude's gap than SparseGPT on the zoo models: diagnostics on TRAINING data only.

    PYTHONPATH=src python -P benchmarks/wanda_check.py --model shakespeare-lm|minilm [--only norms,variants,types]

The metric here is never the evaluation split: shakespeare-lm's perplexity on 16 of its training batches
(`entry.train`), minilm's 1 - cosine on 512 training sentences that are not calibration sentences. Same layers as
benchmarks/pruning.py (the blocks' Linears), the zoo's calibration data unless said otherwise.

- norms: per pruned layer, how concentrated the input-feature norms ||X_j|| are (largest / median, and the share of
  sum_j ||X_j||^2 held by the top 1 % of features), and how far the norms Wanda used (inputs from the already-pruned
  layers) are from those of the dense model.
- variants: the 50 % / 2:4 gap of magnitude (one threshold per layer, the baseline; also per row) and of Wanda as
  shipped, with a per-layer comparison group, fully one-shot (all norms from the dense model), per-block one-shot
  (the authors' order: all sublayers of a block from one pass of the block) and with ~10-25x more calibration tokens
  (further training batches / sentences).
- types: 50 %, Wanda on one layer type and magnitude on the others (which layers Wanda's gain or loss comes from),
  and each type's relative output error ||X (W - W')^T|| / ||X W^T|| on the calibration inputs of the dense model.
"""
from __future__ import annotations

import argparse
import copy
import re
import warnings

import torch

import modelpress as mp
import modelpress.algorithms.wanda as wanda
from modelpress import zoo
from modelpress.algorithms.magnitude import magnitude_mask
from modelpress.calibrate import by_token, token_masks
from modelpress.evaluate import evaluate_model, evaluate_pair
from modelpress.evaluate.tasks import EmbeddingTask, LanguageModelTask

SCOPE = {"minilm": "bert.encoder.layer.", "shakespeare-lm": "model.layers."}
TARGETS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}


def setup(name):
    """(entry, train-data metric, extra calibration batches from the training data)."""
    e = zoo.build(name)
    if name == "minilm":
        from modelpress.zoo import corpus, minilm as zm
        tok = zm.load_tokenizer()
        cal = set(corpus.sentences("train", n=zm.SIZES["full"]["calib"]))
        rest = [s for s in corpus.sentences("train", n=2048) if s not in cal]
        task = EmbeddingTask(data=zm.encode(tok, rest[:512], by_length=True))
        metric = lambda m: 1 - evaluate_pair(task, e.model, m)["embedding_cosine"]["compressed"]  # noqa: E731
        return e, metric, zm.encode(tok, rest[512:])
    task = LanguageModelTask(data=[b for b, _ in e.train[:16]])
    return e, lambda m: evaluate_model(task, m)["perplexity"], [b for b, _ in e.train[16:64]]


def tokens(calib) -> int:
    return sum(int(m.sum()) if m is not None else b["input_ids"].numel() for m, b in zip(token_masks(calib), calib))


def pruned(e, scope, method, target, calib=None, options=None, include=None):
    m = copy.deepcopy(e.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.prune_(m, mp.PruneConfig(method=method, include=include or [scope + "*"], method_options=options,
                                    **target), calib=calib or e.calib)
    return m


def layer_inputs(model, scope, calib) -> dict[str, list[torch.Tensor]]:
    """Each Linear's inputs (one tensor per batch, padded tokens left out), one pass of the model as it is."""
    lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(scope)}
    xs = {n: [] for n in lin}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: xs[n].append(a[0].detach())) for n, m in lin.items()]
    with torch.no_grad():
        for b in calib:
            model(**b)
    for h in hooks:
        h.remove()
    masks = token_masks(calib)
    return {n: by_token(v, masks) for n, v in xs.items()}


def kind(name: str, scope: str) -> str:
    return re.sub(r"^\d+\.", "", name[len(scope):])


def zero_pruned(model, norms, target) -> None:
    nm = (2, 4) if "pattern" in target else None
    for n, nr in norms.items():
        w = model.get_submodule(n).weight
        w.data *= wanda.wanda_mask(w, nr, target.get("sparsity"), nm)


def norms_section(e, scope):
    dense = {n: wanda.input_norms(x) for n, x in layer_inputs(e.model, scope, e.calib).items()}
    used = {}
    orig = wanda.wanda_mask

    def spy(w, norms, sparsity=None, nm=None):  # which layer: the dense weight it equals (pruning comes after)
        w0 = {n: e.model.get_submodule(n).weight for n in dense}
        used[next(n for n, v in w0.items() if v.shape == w.shape and torch.equal(v, w))] = norms.clone()
        return orig(w, norms, sparsity, nm)

    wanda.wanda_mask = spy
    try:
        pruned(e, scope, "wanda", TARGETS["50%"])
    finally:
        wanda.wanda_mask = orig
    print(f"norms: {len(used)} of {len(dense)} layers by Wanda; calibration tokens {tokens(e.calib)}")
    print("  layer | K | max/median ||X_j|| | top-1 % share of sum ||X_j||^2 | Wanda's norms vs the dense model's")
    for n, d in dense.items():
        s = d.sort().values
        top = s[-max(1, len(s) // 100):].pow(2).sum() / s.pow(2).sum()
        rel = (used[n] - d).norm() / d.norm()
        print(f"  {n} | {len(s)} | {float(s[-1] / s[len(s) // 2]):.2f} | {float(top):.3f} | {float(rel):.3f}")


def variants_section(e, scope, q, big):
    base = q(e.model)
    print(f"variants: train-data metric, float {base:.4f}; extra calibration: {tokens(big)} tokens "
          f"(zoo calibration {tokens(e.calib)})")
    for tname, target in TARGETS.items():
        gaps = {"magnitude (layer)": q(pruned(e, scope, "magnitude", target)) - base,
                "wanda as shipped": q(pruned(e, scope, "wanda", target)) - base}
        if "sparsity" in target:
            gaps["magnitude (row)"] = q(pruned(e, scope, "magnitude", target, options={"per_row": True})) - base
            orig = wanda.choose_mask
            wanda.choose_mask = lambda s, sp=None, nm=None, per_row=False: orig(s, sp, nm, False)
            try:
                gaps["wanda (layer group)"] = q(pruned(e, scope, "wanda", target)) - base
            finally:
                wanda.choose_mask = orig
        m = copy.deepcopy(e.model)
        zero_pruned(m, {n: wanda.input_norms(x) for n, x in layer_inputs(m, scope, e.calib).items()}, target)
        gaps["wanda fully one-shot"] = q(m) - base
        m = copy.deepcopy(e.model)
        blocks = sorted({scope + n[len(scope):].split(".")[0] for n in layer_inputs(m, scope, e.calib[:1])},
                        key=lambda b: int(b.rsplit(".", 1)[1]))
        for b in blocks:
            xs = layer_inputs(m, b + ".", e.calib)
            zero_pruned(m, {n: wanda.input_norms(x) for n, x in xs.items()}, target)
        gaps["wanda per-block one-shot"] = q(m) - base
        gaps["wanda, extra calibration"] = q(pruned(e, scope, "wanda", target, calib=big)) - base
        mag = gaps["magnitude (layer)"]
        print(f"  {tname}: " + "; ".join(f"{k} {g:.4f} ({1 - g / mag:.0%})" for k, g in gaps.items()), flush=True)


def types_section(e, scope, q):
    base = q(e.model)
    target = TARGETS["50%"]
    xs = layer_inputs(e.model, scope, e.calib)
    kinds = list(dict.fromkeys(kind(n, scope) for n in xs))
    all_mag = q(pruned(e, scope, "magnitude", target)) - base
    print(f"types: 50 %, magnitude (layer) everywhere: gap {all_mag:.4f}")
    print("  Wanda on | gap | vs all-magnitude | mean rel. output error magnitude (layer) / (row) / Wanda")
    for k in kinds:
        m = pruned(e, scope, "wanda", target, include=["re:" + re.escape(scope) + r"\d+\." + re.escape(k)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp.prune_(m, mp.PruneConfig(method="magnitude", include=[scope + "*"], **target))  # the others
        gap = q(m) - base
        errs = torch.zeros(3, dtype=torch.float64)
        names = [n for n in xs if kind(n, scope) == k]
        for n in names:
            x = torch.cat(xs[n]).reshape(-1, xs[n][0].shape[-1]).double()
            w = e.model.get_submodule(n).weight.detach().double()
            y = (x @ w.T).norm()
            for i, keep in enumerate((magnitude_mask(w, 0.5), magnitude_mask(w, 0.5, per_row=True),
                                      wanda.wanda_mask(w, x.pow(2).sum(0).sqrt().float(), 0.5))):
                errs[i] += (x @ (w * ~keep).T).norm() / y / len(names)
        print(f"  {k} | {gap:.4f} | {all_mag - gap:+.4f} | {errs[0]:.4f} / {errs[1]:.4f} / {errs[2]:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(SCOPE))
    ap.add_argument("--only", default="norms,variants,types")
    args = ap.parse_args()
    torch.set_num_threads(1)
    e, q, big = setup(args.model)
    scope = SCOPE[args.model]
    for s in args.only.split(","):
        {"norms": lambda: norms_section(e, scope), "variants": lambda: variants_section(e, scope, q, big),
         "types": lambda: types_section(e, scope, q)}[s.strip()]()


if __name__ == "__main__":
    main()
