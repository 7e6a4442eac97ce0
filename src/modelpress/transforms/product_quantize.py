"""Product quantization of weights (PECAN-style): each layer's weight is cut into sub-vectors of `dim` numbers
(along the inputs of a Linear, along the input channels of a convolution), k-means finds a codebook of `entries`
centroids per layer, every sub-vector is replaced by the index of its nearest centroid, and the centroids (not the
indices) are then fine-tuned on data.

With calibration data the k-means is weighted by the layer's input energy: the error of coordinate i counts
E[x_i^2] times, the diagonal of the output error ||(W - W_q) X||^2, so inputs that carry large activations are
kept more exactly. Small layers get fewer entries (at least 4 sub-vectors per entry), and a layer that would not
shrink (indices + codebook >= its float32 weight) stays as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..formats.packing import packed_nbytes
from ..nn.pq import PQConv2d, PQLinear, index_bits
from ..select import check_patterns, select_modules
from ._common import (Swaps, described, finetune_batches, replace_then_finetune, replay_layers, teacher_for,
                      warn_skipped)

VECTORS_PER_ENTRY = 4


@dataclass(frozen=True)
class PQConfig:
    dim: int = 4  # numbers per sub-vector
    entries: int = 256  # codebook entries per layer (2..256; indices take ceil(log2(entries)) bits)
    iters: int = 25  # k-means iterations
    weighted: bool = True  # weight k-means by the input energy when calibration data is given
    finetune_steps: int = 300  # centroid fine-tuning steps (0: none)
    lr: float = 1e-3
    finetune_on: Literal["teacher", "labels"] = "teacher"  # match the float model's outputs, or fit the labels
    train_all: bool = False  # fine-tune every parameter, not only the codebooks and biases
    include: list[str] | None = None
    exclude: list[str] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"product_quantize dim must be >= 1, got {self.dim}")
        if not 2 <= self.entries <= 256:
            raise ValueError(f"product_quantize entries must be in 2..256, got {self.entries}")
        if self.iters < 1 or self.finetune_steps < 0:
            raise ValueError("product_quantize iters must be >= 1 and finetune_steps >= 0")
        check_patterns(self.include)
        check_patterns(self.exclude)


# --- pure math ---------------------------------------------------------------------------------------------

def _scores(x: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
    """Weighted squared distances up to a per-row constant: sum_i h_i (c_i^2 - 2 x_i c_i), [n, k]."""
    if h is None:
        return c.pow(2).sum(1)[None, :] - 2 * x @ c.T
    return h @ c.pow(2).T - 2 * (h * x) @ c.T


def assign(x: torch.Tensor, c: torch.Tensor, h: torch.Tensor | None = None, chunk: int = 1 << 14) -> torch.Tensor:
    """Index of the nearest centroid (weighted distance) for every row of x [n, d]."""
    return torch.cat([_scores(x[i:i + chunk], None if h is None else h[i:i + chunk], c).argmin(1)
                      for i in range(0, x.shape[0], chunk)])


def _update(x: torch.Tensor, ones: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Weighted means of the vectors assigned to each centroid; an emptied cluster takes the worst-fitted vector."""
    num = torch.zeros_like(c).index_add_(0, a, ones * x)
    den = torch.zeros_like(c).index_add_(0, a, ones)
    c = torch.where(den > 0, num / den.clamp(min=1e-30), c)
    empty = (torch.bincount(a, minlength=c.shape[0]) == 0).nonzero().flatten()
    if len(empty):
        err = ((x - c[a]).pow(2) * ones).sum(1)
        c[empty] = x[err.topk(len(empty)).indices]
    return c


def kmeans(x: torch.Tensor, k: int, iters: int = 25, weights: torch.Tensor | None = None, seed: int = 0,
           points_per_centroid: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, d], assignment [n]) of x [n, d] by k-means++ seeding and Lloyd iterations, minimising
    sum_v sum_i weights[v, i] (x[v, i] - c[a_v, i])^2 (plain squared distances without weights).

    Seeding and iterations run on a random sample of at most `points_per_centroid` * k vectors (as faiss does);
    then every vector is assigned, the centroids take the means of all their vectors, and every vector is
    assigned again. An emptied cluster is re-seeded with the worst-fitted vector. Deterministic for a seed."""
    x = x.float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} vectors, got k={k}")
    h = None if weights is None else weights.float().clamp(min=0)
    g = torch.Generator().manual_seed(seed)
    full_ones = torch.ones_like(x) if h is None else h
    sample = torch.randperm(n, generator=g)[:points_per_centroid * k] if n > points_per_centroid * k else None
    xs, ones = (x, full_ones) if sample is None else (x[sample], full_ones[sample])
    hs = None if h is None else ones
    m = xs.shape[0]
    centroids = [xs[int(torch.randint(m, (1,), generator=g))]]
    best = ((xs - centroids[0]).pow(2) * ones).sum(1)
    for _ in range(1, k):  # k-means++: next seed drawn with probability proportional to its distance
        p = best.clamp(min=0)
        if float(p.sum()) > 0:
            i = int(torch.multinomial(p, 1, generator=g))
        else:  # every vector already sits on a seed
            i = int(torch.randint(m, (1,), generator=g))
        centroids.append(xs[i])
        best = torch.minimum(best, ((xs - xs[i]).pow(2) * ones).sum(1))
    c = torch.stack(centroids)
    a = assign(xs, c, hs)
    for _ in range(iters):
        c = _update(xs, ones, c, a)
        new = assign(xs, c, hs)
        if torch.equal(new, a):
            break
        a = new
    if sample is None:
        return c, a
    c = _update(x, full_ones, c, assign(x, c, h))
    return c, assign(x, c, h)


def layer_entries(vectors: int, entries: int) -> int:
    """Entries for a layer of `vectors` sub-vectors: at most `entries`, at least 4 sub-vectors per entry."""
    e = entries
    while e > 2 and e * VECTORS_PER_ENTRY > vectors:
        e //= 2
    return e


def pq_bytes(vectors: int, entries: int, dim: int) -> int:
    """Bytes of the packed indices plus a float32 codebook."""
    return packed_nbytes(vectors, index_bits(entries)) + 4 * entries * dim


# --- the verb ----------------------------------------------------------------------------------------------

def _kind(m: nn.Module, dim: int) -> tuple[type | None, str | None]:
    """(PQ module class, None) when `m` can be product-quantized with sub-vectors of `dim`, else (None, why)."""
    if type(m) is nn.Linear:
        if m.in_features % dim:
            return None, f"{m.in_features} inputs not divisible by {dim}"
        return PQLinear, None
    if type(m) is nn.Conv2d:
        cin = m.in_channels // m.groups
        return (PQConv2d, None) if cin % dim == 0 else (None, f"{cin} input channels per group not divisible by {dim}")
    return None, "not a Linear or Conv2d"


def _input_energy(m: nn.Module, inputs) -> torch.Tensor:
    """E[x_i^2] per weight column, in the order of the layer's sub-vectors."""
    from ..algorithms.gptq import layer_rows

    rows = [layer_rows(m, x).float() for x in inputs]
    e = sum(r.pow(2).sum(0) for r in rows) / sum(r.shape[0] for r in rows)  # [in * kh * kw] as (in, kh, kw)
    if isinstance(m, nn.Conv2d):
        e = e.view(m.in_channels // m.groups, *m.kernel_size).permute(1, 2, 0).reshape(-1)
    return e


def product_quantize_(model: nn.Module, config: PQConfig | None = None, calib: Any = None, train: Any = None,
                      teacher: nn.Module | None = None, progress: Callable[[str, int, int], None] | None = None,
                      deadline: float | None = None) -> dict[str, Any]:
    """Product-quantize the selected Linear and Conv2d weights in place, then fine-tune the centroids.

    `calib`: model inputs (weighted k-means; fine-tuning inputs when no `train` is given). `train`: training
    batches (inputs, or (input, class) pairs). Fine-tuning matches the `teacher`'s outputs (default: a copy of
    `model` before the change), or fits the labels with finetune_on="labels".
    Returns {"layers": {name: {dim, entries}}, "weight_error", "skipped",
    "bytes_before", "bytes_after", "finetune"} (float32 weight bytes vs indices + codebooks)."""
    from ..recipe.structure import record

    config = config or PQConfig()
    calib = list(calib) if calib is not None else None
    train = list(train) if train is not None else None
    targets, skipped = {}, {}
    for name, m in select_modules(model, config.include, config.exclude):
        if not isinstance(getattr(m, "weight", None), torch.Tensor) or list(m.children()):
            continue
        cls, why = _kind(m, config.dim)
        if cls is not None:
            targets[name] = m
        elif config.include is not None or type(m) in (nn.Linear, nn.Conv2d):
            skipped[name] = why
    batches = finetune_batches(train, calib, config.finetune_on) if config.finetune_steps and targets else []
    teacher = teacher_for(model, teacher, config.finetune_steps, config.finetune_on, batches)
    swaps, layers, errors, before, after = Swaps(model), {}, {}, 0, 0

    def process(name: str, m: nn.Module, inputs) -> None:
        nonlocal before, after
        cls, _ = _kind(m, config.dim)
        w = m.weight.detach().float()
        sub = cls.sub_vectors(w, config.dim)  # [rows, slots, dim]
        rows, slots, _ = sub.shape
        n = rows * slots
        e = layer_entries(n, config.entries)
        if pq_bytes(n, e, config.dim) >= 4 * w.numel():
            skipped[name] = f"{n} sub-vectors: indices and codebook would not be smaller than the weight"
            return
        h = None
        if inputs and config.weighted and getattr(m, "groups", 1) == 1:  # grouped convs: plain k-means
            h = _input_energy(m, inputs).view(1, slots, config.dim).expand(rows, -1, -1).reshape(n, -1)
        c, a = kmeans(sub.reshape(n, -1), e, config.iters, h, config.seed)
        bias = None if m.bias is None else m.bias.detach()
        new = cls.empty_like(m, config.dim, e).set_codes(a.view(rows, slots), c, bias)
        errors[name] = round(float((new.weight.detach() - w).norm() / w.norm().clamp(min=1e-30)), 6)
        swaps(name, new)
        layers[name] = {"dim": config.dim, "entries": e}
        before += 4 * w.numel()
        after += pq_bytes(n, e, config.dim)
        if progress:
            progress("product_quantize", len(layers) + len(skipped), len(targets))

    tuned = replace_then_finetune(model, targets, layers, skipped, process, calib,
                                  bool(calib and config.weighted and targets), config, batches, teacher, swaps,
                                  "product_quantize", progress, deadline)
    if layers:
        record(model, "product_quantize", {"layers": {n: {**info, **described(model.get_submodule(n))}
                                                      for n, info in layers.items()}})
    warn_skipped("product_quantize_", skipped)
    return {"layers": layers, "weight_error": errors, "skipped": skipped, "bytes_before": before,
            "bytes_after": after, "finetune": tuned}


def replay(model: nn.Module, options: dict) -> None:
    """Rebuild recorded product-quantized layers (shapes only: codes and codebooks come from the saved tensors)."""

    def build(name: str, m: nn.Module, info) -> nn.Module:
        ok = isinstance(info, dict) and isinstance(info.get("dim"), int) and isinstance(info.get("entries"), int)
        cls, why = _kind(m, info["dim"]) if ok else (None, f"record {info!r}")
        if cls is None:
            raise ValueError(f"cannot replay product_quantize of {name!r} ({type(m).__name__}): {why}")
        return cls.empty_like(m, info["dim"], info["entries"])

    replay_layers(model, options, "product_quantize", "{dim, entries}", build)
