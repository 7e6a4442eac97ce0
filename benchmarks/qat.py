"""Training-aware compression on the zoo models: QAT against the best post-training quantization, the QAT methods
(QuantNoise, FST, Granular EMA, NNAC, FAT, SensiMix), distillation of a half-width CTR model, and MiniLM W4 g32
with QAT + distillation. Every QAT run also checks that `convert_` gives outputs bit-identical to the fake-quant
forward (reference path, first evaluation batch).

    python benchmarks/qat.py [--only digits,ctr,ctr-kd,minilm] [--quick] [--json FILE] [--minilm-steps N] [--minilm-budget S]
        [--minilm-heldout] [--minilm-lr LR] [--minilm-warmup N] [--minilm-attention W] [--minilm-ffn]
        [--minilm-train N] [--minilm-calib-train N] [--minilm-ema DECAY]

All models train on the zoo's training split (never the evaluation data) with Adam and a cosine learning rate;
digits-cnn is BN-folded first (as the best PTQ recipe does). `--quick` runs tiny zoo builds for a smoke test.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch
from torch import nn

import modelpress as mp
from modelpress import zoo
from modelpress.zoo import corpus, minilm as zoo_minilm
from modelpress.calibrate import call_model
from modelpress.evaluate import evaluate_pair
from modelpress.evaluate.tasks import EmbeddingTask
from modelpress.recipe import Context
from modelpress.train import DistillConfig, QATConfig, convert_, output_tensor
from modelpress.train.distill import logit_kd
from modelpress.train.step import TrainStep

ROWS: list[dict] = []


def log(section: str, name: str, metrics: dict, extra: dict | None = None, **more) -> dict:
    row = {"section": section, "name": name, **{k: v["compressed"] for k, v in metrics.items()}, **(extra or {}), **more}
    ROWS.append(row)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "section"}
    print(f"[{section}] {shown}", flush=True)
    return row


def qat(entry, model, qconf, options=QATConfig(), steps=300, lr=1e-3, distill=DistillConfig(), deadline=None,
        heldout=None, **step_opts):
    """Train with the `train` step (no conversion), check convert_ exactness, convert, evaluate (and, given a
    `heldout` embedding task, add its cosine to the row)."""
    ctx = Context(calib=entry.calib, train=entry.train, reference=entry.model, deadline=deadline)
    step = TrainStep(steps=steps, lr=lr, qat=qconf, qat_options=options, convert=False, distill=distill, **step_opts)
    t0 = time.perf_counter()
    rec = step.run(model, ctx)
    seconds = time.perf_counter() - t0
    x = entry.task.batches()[0][0]
    model.eval()
    with torch.no_grad():
        fake = output_tensor(call_model(model, x))
        convert_(model)
        mp.set_kernels(model, False)
        exact = torch.equal(fake, output_tensor(call_model(model, x)))
        mp.set_kernels(model, True)
    extra = {"train_s": round(seconds, 1), "steps": rec["steps"], "stopped_early": rec["stopped_early"],
             "bit_identical": exact}
    if heldout is not None:
        extra["heldout_cosine"] = evaluate_pair(heldout, entry.model, model)["embedding_cosine"]["compressed"]
    return evaluate_pair(entry.task, entry.model, model), extra


def kl_on(reference: nn.Module, model: nn.Module, batches) -> float:
    """KL(reference || model) of the class distributions on labelled batches (held-out training data)."""
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        return float(logit_kd(model(x), reference(x)))


def folded(entry) -> nn.Module:
    m = copy.deepcopy(entry.model)
    mp.fold_bn_(m)
    return m


def digits(quick: bool) -> None:
    e = zoo.build("digits-cnn", tiny=quick)
    steps = 40 if quick else 300
    log("digits", "float", evaluate_pair(e.task, e.model, e.model))
    heldout = e.train[-4:]  # training images, not evaluation ones: they pick the PTQ start of QAT from PTQ
    for w in ("int4", "int2"):
        cfg = mp.QuantConfig(weights=w, activations="int4:static")
        best = start = None
        for method in ("rtn", "gptq", "adaround"):
            for obs in ("minmax", "percentile", "mse"):
                m = folded(e)
                mp.quantize_(m, mp.QuantConfig(weights=w, activations="int4:static", act_observer=obs), calib=e.calib,
                             method=method)
                row = log("digits-ptq", f"W{w[3:]}A4 {method} {obs}", evaluate_pair(e.task, e.model, m),
                          heldout_kl=kl_on(e.model, m, heldout), method=method, observer=obs)
                if best is None or (row["accuracy"], -row["kl_divergence"]) > (best["accuracy"], -best["kl_divergence"]):
                    best = row
                if start is None or row["heldout_kl"] < start["heldout_kl"]:
                    start = row
        ROWS.append({**best, "section": "digits-best-ptq", "name": f"W{w[3:]}A4 best PTQ: {best['name']}"})
        log("digits-qat", f"W{w[3:]}A4 QAT", *qat(e, folded(e), cfg, steps=steps))
        log("digits-qat", f"W{w[3:]}A4 QAT + KD", *qat(e, folded(e), cfg, steps=steps,
                                                      distill=DistillConfig(task=1.0, output=1.0, temperature=2.0)))
        # QAT from the PTQ result with the lowest KL on held-out training images: its codes, scales (then learned
        # with LSQ at a small learning rate) and calibrated activation ranges (kept), KD from the float model only
        log("digits-qat", f"W{w[3:]}A4 QAT from PTQ ({start['method']} {start['observer']}) + KD", *qat(
            e, folded(e), mp.QuantConfig(weights=w, activations="int4:static", act_observer=start["observer"]),
            QATConfig(init=start["method"], act_ranges="frozen"), steps=steps, lr=1e-4, scale_lr=1e-5,
            distill=DistillConfig(task=0.0, output=1.0, temperature=2.0)))
    for w in ("int2", "int3"):
        for method in ("plain", "quantnoise", "fst"):
            log("digits-methods", f"W{w[3:]} {method}", *qat(e, folded(e), mp.QuantConfig(weights=w),
                                                            QATConfig(method=method), steps=steps))
    cfg = mp.QuantConfig(weights="int4", activations="int4:static")
    for name, opts in (("min/max EMA", {}), ("Granular EMA p99.9", {"act_ranges": "granular"}),
                       ("Granular EMA p99", {"act_ranges": "granular", "granular_percentile": 99.0}),
                       ("NNAC k=4", {"nnac_clusters": 4})):
        log("digits-ranges", f"W4A4 {name}", *qat(e, folded(e), cfg, QATConfig(**opts), steps=steps))
    for name, fat in (("plain", False), ("FAT", True)):
        log("digits-fat", f"W2 {name}", *qat(e, folded(e), mp.QuantConfig(weights="int2"), QATConfig(fat=fat),
                                            steps=steps))
    first_last = {"features.0.0": "int8", "classifier": "int8"}  # as BNNs do: 8-bit first and last layers
    for name, opts in (("1-bit, LSQ scale, plain STE", {"sensimix": False}), ("1-bit, SensiMix", {}),
                       ("1-bit, SensiMix + ABWR", {"abwr": 1.0})):
        log("digits-sensimix", name, *qat(e, folded(e), mp.QuantConfig(weights="int1", overrides=first_last),
                                          QATConfig(**opts), steps=steps))


def ctr(quick: bool) -> None:
    e = zoo.build("ctr", tiny=quick)
    steps = 20 if quick else 128
    log("ctr", "float", evaluate_pair(e.task, e.model, e.model))
    for w in ("int2", "int3"):
        m = copy.deepcopy(e.model)
        mp.quantize_(m, w)
        log("ctr-methods", f"W{w[3:]} PTQ rtn", evaluate_pair(e.task, e.model, m))
        for method in ("plain", "quantnoise", "fst"):
            log("ctr-methods", f"W{w[3:]} {method}", *qat(e, copy.deepcopy(e.model), mp.QuantConfig(weights=w),
                                                         QATConfig(method=method), steps=steps))


def half_width(teacher: nn.Module) -> nn.Module:
    """A CTR model with half the hidden MLP widths, initialised from the teacher's channels of largest norm."""
    student = copy.deepcopy(teacher)
    for mlp in (student.bottom, student.top):
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        keep = None
        for i, lin in enumerate(linears):
            w, b = lin.weight.detach(), lin.bias.detach()
            if keep is not None:
                w = w[:, keep]
            last = i == len(linears) - 1
            rows = torch.arange(w.shape[0]) if last else w.norm(dim=1).topk(w.shape[0] // 2).indices.sort().values
            new = nn.Linear(w.shape[1], len(rows))
            with torch.no_grad():
                new.weight.copy_(w[rows]), new.bias.copy_(b[rows])
            mlp[list(mlp).index(lin)] = new
            keep = rows
    return student.eval()


def ctr_kd(quick: bool) -> None:
    e = zoo.build("ctr", tiny=quick)
    steps = 20 if quick else 128
    student = half_width(e.model)
    log("ctr-kd", "float teacher", evaluate_pair(e.task, e.model, e.model))
    log("ctr-kd", "half width, no training", evaluate_pair(e.task, e.model, student))
    pairs = {n: n for n, m in student.named_modules() if isinstance(m, nn.ReLU)}  # every hidden activation
    for name, dist in (("half width + fine-tune (task only)", DistillConfig()),
                       ("half width + layer-wise KD", DistillConfig(task=1.0, output=1.0, feature=1.0, layers=pairs))):
        m = copy.deepcopy(student)
        ctx = Context(calib=e.calib, train=e.train, reference=e.model)
        t0 = time.perf_counter()
        TrainStep(steps=steps, lr=1e-3, distill=dist).run(m, ctx)
        log("ctr-kd", name, evaluate_pair(e.task, e.model, m), train_s=round(time.perf_counter() - t0, 1),
            params=sum(p.numel() for n, p in m.named_parameters() if "embeddings" not in n))


def heldout_sentences(n: int) -> list[str]:
    """`n` training-split sentences (evenly spread) that are neither MiniLM's training nor calibration sentences:
    where the recipe is chosen (`--minilm-heldout`), never on the evaluation split."""
    sizes = zoo_minilm.SIZES["full"]
    used = set(corpus.sentences("train", n=sizes["train"])) | set(corpus.sentences("train", n=sizes["calib"]))
    pool = [s for s in corpus.sentences("train") if s not in used]
    return [pool[int(i * len(pool) / n)] for i in range(min(n, len(pool)))]


def training_batches(entry, n: int) -> list:
    """MiniLM's training batches from `n` training-split sentences: the zoo's own (2,048) when `n` is at most that,
    else those plus evenly spread others, never a held-out one (`heldout_sentences`), shuffled (seed 0)."""
    size = zoo_minilm.SIZES["full"]["train"]
    if n <= size:
        return entry.train
    own = corpus.sentences("train", n=size)
    skip = set(own) | set(heldout_sentences(256))
    pool = [s for s in corpus.sentences("train") if s not in skip]
    more = [pool[int(i * len(pool) / (n - len(own)))] for i in range(min(n - len(own), len(pool)))]
    order = torch.randperm(len(own) + len(more), generator=torch.Generator().manual_seed(0)).tolist()
    sentences = own + more
    return zoo_minilm.encode(zoo_minilm.load_tokenizer(), [sentences[i] for i in order])


def minilm(quick: bool, steps: int, budget_s: float | None, heldout: bool = False, lr: float = 3e-4,
           warmup: int = 0, attention: float = 0.0, ffn: bool = False, output: float = 1.0, train: int = 2048,
           ema: float | None = None, calib_train: int = 0) -> None:
    e = zoo.build("minilm", tiny=quick)
    if not quick:
        e = zoo.ZooEntry(e.name, e.model, e.calib, e.task, e.description, training_batches(e, train))
    # GPTQ's start: the zoo's 128 calibration sentences, or the first `calib_train` training sentences (whole)
    start_calib = e.train[: max(1, calib_train // 32)] if calib_train else e.calib
    held = EmbeddingTask(data=zoo_minilm.encode(zoo_minilm.load_tokenizer(), heldout_sentences(32 if quick else 256),
                                                by_length=True))
    if heldout:  # score on the held-out training sentences instead of the evaluation split
        e = zoo.ZooEntry(e.name, e.model, e.calib, held, e.description, e.train)
    deadline = None if budget_s is None else time.monotonic() + budget_s  # training stops early past it
    # training cost on 2 cores: batches of 16 sentences cut to their first 32 tokens (teacher and student alike)
    short = [{k: v[i : i + 16, :32] for k, v in b.items()} for b in e.train for i in (0, 16)]
    e = zoo.ZooEntry(e.name, e.model, e.calib, e.task, e.description, short)
    cfg = mp.QuantConfig(weights="int4:g32", exclude=["bert.embeddings.*"])
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(e.model)
        t0 = time.perf_counter()
        mp.quantize_(m, cfg, calib=e.calib, method=method)
        log("minilm", f"W4 g32 PTQ {method}", evaluate_pair(e.task, e.model, m), seconds=round(time.perf_counter() - t0, 1))
    if calib_train:
        m = copy.deepcopy(e.model)
        t0 = time.perf_counter()
        mp.quantize_(m, cfg, calib=start_calib, method="gptq")
        log("minilm", f"W4 g32 PTQ gptq, calibrated on {calib_train} training sentences",
            evaluate_pair(e.task, e.model, m), seconds=round(time.perf_counter() - t0, 1))
    # cosine KD on the sentence embedding plus block-wise KD (MSE on every encoder layer's output; with `ffn` also
    # on every FFN's inner activation) and optionally attention-map KD (KL between the heads' attention rows)
    blocks = {n: n for n, m in e.model.named_modules() if n.startswith("bert.encoder.layer.") and n.count(".") == 3}
    if ffn:
        blocks.update({f"{n}.intermediate": f"{n}.intermediate" for n in list(blocks)})
    dist = DistillConfig(task=0.0, output=output, output_loss="cosine", feature=1.0, layers=blocks, attention=attention)
    opts = QATConfig(init="gptq", scales="frozen")  # start from GPTQ's codes; its scales kept (see README)
    steps, warmup = (8, min(warmup, 4)) if quick else (steps, warmup)
    more = (f", {train} sentences" if train != 2048 and not quick else "") + (
        f", GPTQ on {calib_train} training sentences" if calib_train else "") + (f", weight EMA {ema:g}" if ema else "")
    kd = ("cosine" if output == 1 else f"cosine x{output:g}") + ", block-wise" + (" + FFN" if ffn else "") + (f", attention x{attention:g}" if attention else "")
    log("minilm", f"W4 g32 QAT (from GPTQ) + {kd} KD, {steps} steps, lr {lr:g}, warm-up {warmup}{more}", *qat(
        zoo.ZooEntry(e.name, e.model, start_calib, e.task, e.description, e.train), copy.deepcopy(e.model), cfg, opts,
        steps=steps, lr=lr, distill=dist, dropout=False, freeze=("re:.*embeddings.*",), deadline=deadline,
        warmup=warmup, heldout=None if heldout else held, ema=ema),
        split="held-out training sentences" if heldout else "evaluation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="digits,ctr,ctr-kd,minilm")
    ap.add_argument("--quick", action="store_true", help="tiny zoo builds and few steps (smoke test)")
    ap.add_argument("--minilm-steps", type=int, default=600)
    ap.add_argument("--minilm-budget", type=float, help="seconds from the start of the minilm section after which "
                    "its training stops early (the row says stopped_early)")
    ap.add_argument("--minilm-heldout", action="store_true", help="score MiniLM on 256 held-out training-split "
                    "sentences (neither training nor calibration ones) instead of the evaluation split: for choosing")
    ap.add_argument("--minilm-lr", type=float, default=3e-4)
    ap.add_argument("--minilm-warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    ap.add_argument("--minilm-attention", type=float, default=0.0, help="weight of attention-map KD")
    ap.add_argument("--minilm-output", type=float, default=1.0, help="weight of the cosine KD on the embedding")
    ap.add_argument("--minilm-train", type=int, default=2048, help="training sentences (the zoo's 2,048, or more "
                    "from the training split, never held-out ones)")
    ap.add_argument("--minilm-calib-train", type=int, default=0, help="GPTQ's start calibrated on this many "
                    "training sentences (multiple of 32) instead of the zoo's 128 calibration sentences")
    ap.add_argument("--minilm-ema", type=float, help="train on, then keep the moving average of the weights (decay)")
    ap.add_argument("--minilm-ffn", action="store_true", help="block-wise KD also on each FFN's inner activation")
    ap.add_argument("--json", help="write every row to this file")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*stay float.*")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for part in args.only.split(","):
        {"digits": lambda: digits(args.quick), "ctr": lambda: ctr(args.quick), "ctr-kd": lambda: ctr_kd(args.quick),
         "minilm": lambda: minilm(args.quick, args.minilm_steps, args.minilm_budget, args.minilm_heldout,
                                 args.minilm_lr, args.minilm_warmup, args.minilm_attention, args.minilm_ffn,
                                 args.minilm_output, args.minilm_train, args.minilm_ema,
                                 args.minilm_calib_train)}[part]()
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
