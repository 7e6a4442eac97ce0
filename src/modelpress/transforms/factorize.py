"""Low-rank factorization: a Linear (or a k x k convolution) replaced by two thinner layers of rank r from a
truncated SVD, W [out, in] ~ up [out, r] @ down [r, in].

Methods (how the SVD is weighted):
- `svd`: plain truncated SVD of W, which minimises the weight error ||W - W_r||.
- `asvd`: activation-aware scaling (ASVD): SVD of W diag(s) with s_j = rms(x_j)^alpha over the calibration
  inputs, then down = (...) diag(1/s): input channels that carry large activations are kept more exactly.
- `whiten`: output-error optimal (as in SVD-LLM): with the input Gram matrix X^T X = L L^T (Cholesky, damped),
  SVD of W L truncated to rank r then multiplied by L^-1 gives the rank-r W_r minimising ||(W - W_r) X||.

The rank per layer: `rank` (fixed), `ratio` (keep that fraction of the layer's weight parameters: r = floor(ratio
* out * in / (out + in))), `energy` (smallest r keeping that fraction of the sum of squared singular values of the
weighted matrix, i.e. of the output energy for `whiten`), or `ranks` (name pattern -> rank). A layer whose rank
would not save parameters stays as it is. Data-aware methods process layers in execution order with the
calibration runner, so each layer's statistics come from inputs through the already factorized layers before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from ..nn.factorized import LowRankConv, LowRankLinear
from ..select import check_patterns, lookup, select_modules
from ._common import Swaps, replay_layers, warn_skipped

Method = Literal["svd", "asvd", "whiten"]


@dataclass(frozen=True)
class FactorizeConfig:
    rank: int | None = None
    ratio: float | None = None  # fraction of each layer's weight parameters to keep (default 0.5)
    energy: float | None = None  # fraction of the (weighted) spectrum's energy to keep
    ranks: Mapping[str, int] | None = None  # name pattern -> rank (first match wins), before rank/ratio/energy
    method: Method = "svd"
    alpha: float = 0.5  # asvd: s = rms(x)^alpha
    damp: float = 0.01  # whiten: Gram + damp * mean(diag) * I
    include: list[str] | None = None
    exclude: list[str] | None = None

    def __post_init__(self):
        if sum(v is not None for v in (self.rank, self.ratio, self.energy)) > 1:
            raise ValueError("factorize: give at most one of rank, ratio and energy")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"factorize rank must be >= 1, got {self.rank}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ValueError(f"factorize ratio must be in (0, 1), got {self.ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"factorize energy must be in (0, 1], got {self.energy}")
        if self.method not in ("svd", "asvd", "whiten"):
            raise ValueError(f"unknown factorize method {self.method!r}; use svd, asvd or whiten")
        if self.damp < 0:
            raise ValueError(f"factorize damp must be >= 0, got {self.damp}")
        for r in (self.ranks or {}).values():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"factorize ranks must be positive integers, got {r!r}")
        check_patterns(self.include)
        check_patterns(self.exclude)
        check_patterns(list(self.ranks or {}))


# --- pure math ---------------------------------------------------------------------------------------------

def weighting(gram: torch.Tensor | None, method: Method, alpha: float = 0.5, damp: float = 0.01):
    """(right, back) for the weighted SVD: the SVD is taken of W @ right, and the down factor is multiplied by
    `back` (right^-1) on the right. None for the plain SVD. `gram` is X^T X (any positive scale) [in, in]."""
    if method == "svd" or gram is None:
        return None, None
    g = gram.double()
    d = torch.diagonal(g)
    if method == "asvd":
        rms = d.clamp(min=0).sqrt()
        rms = torch.where(rms > 0, rms, rms[rms > 0].min() if bool((rms > 0).any()) else torch.ones_like(rms))
        s = rms.pow(alpha)
        return torch.diag(s), torch.diag(1 / s)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    mean = d.mean() if float(d.mean()) > 0 else torch.tensor(1.0, dtype=g.dtype)
    for attempt in range(6):  # not positive definite (duplicate or dead inputs): damp harder
        lam = damp if attempt == 0 else max(damp, 1e-6) * 10**attempt
        low, info = torch.linalg.cholesky_ex(g + lam * mean * eye)
        if info == 0:
            return low, torch.linalg.solve_triangular(low, eye, upper=False)
    raise ValueError("factorize: the input Gram matrix is not positive definite even with strong damping")


def choose_rank(sigma: torch.Tensor, out_f: int, in_f: int, rank: int | None = None, ratio: float | None = None,
                energy: float | None = None) -> int:
    """The rank for singular values `sigma` (descending) of an [out, in] weight; ratio 0.5 when none is given."""
    full = min(out_f, in_f)
    if rank is not None:
        return min(rank, full)
    if energy is not None:
        e = sigma.double().pow(2)
        kept = e.cumsum(0) / e.sum().clamp(min=1e-300)
        return min(int((kept < energy - 1e-12).sum()) + 1, full)
    ratio = 0.5 if ratio is None else ratio
    return max(1, min(full, int(ratio * out_f * in_f / (out_f + in_f))))


def saves(rank: int, out_f: int, in_f: int) -> bool:
    return rank * (out_f + in_f) < out_f * in_f


def low_rank(w: torch.Tensor, rank: int | None = None, gram: torch.Tensor | None = None, method: Method = "svd",
             alpha: float = 0.5, damp: float = 0.01, ratio: float | None = None, energy: float | None = None):
    """(down [r, in], up [out, r], sigma) for the weight w [out, in] (float64 inside, w's dtype out); the rank
    is `rank`, else chosen from the weighted spectrum by ratio/energy. up and down share sqrt(sigma)."""
    w2 = w.reshape(w.shape[0], -1).double()
    right, back = weighting(gram, method, alpha, damp)
    a = w2 if right is None else w2 @ right
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    r = choose_rank(s, *w2.shape, rank=rank, ratio=ratio, energy=energy)
    root = s[:r].sqrt()
    down = root[:, None] * vh[:r]
    if back is not None:
        down = down @ back
    up = u[:, :r] * root[None, :]
    return down.to(w.dtype), up.to(w.dtype), s


# --- the verb ----------------------------------------------------------------------------------------------

def factorizable(m: nn.Module) -> str | None:
    """None when `m` can be factorized, else why not."""
    if type(m) is nn.Linear:
        return None
    if type(m) in (nn.Conv1d, nn.Conv2d):
        return None if m.groups == 1 else "grouped convolution"
    return "not a Linear/Conv1d/Conv2d"


def _replacement(m: nn.Module, down, up) -> nn.Module:
    if isinstance(m, nn.Linear):
        new = LowRankLinear.empty_like(m, down.shape[0])
    else:
        new = LowRankConv.empty_like(m, down.shape[0])
    return new.set_factors(down, up, None if m.bias is None else m.bias.detach())


def factorize_(model: nn.Module, config: FactorizeConfig | None = None, calib: Any = None,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Replace the selected Linear / Conv1d / Conv2d (groups=1) layers by low-rank pairs, in place.

    `calib` (model inputs) is needed by the `asvd` and `whiten` methods. Returns {"ranks": {name: rank},
    "skipped": {name: reason}, "params_before", "params_after"} (weight parameters of the layers involved).
    The change is recorded on the model, so `save` / `load` rebuild it."""
    from ..algorithms.gptq import hessian, layer_rows
    from ..calibrate import run_sequential
    from ..recipe.structure import record

    config = config or FactorizeConfig()
    if config.method != "svd" and not calib:
        raise ValueError(f"factorize method {config.method!r} needs calibration data (calib=...)")
    targets, skipped = {}, {}
    for name, m in select_modules(model, config.include, config.exclude):
        if isinstance(getattr(m, "weight", None), torch.Tensor) and not list(m.children()):
            why = factorizable(m)
            if why is None:
                targets[name] = m
            elif config.include is not None:
                skipped[name] = why
    swaps, ranks, before, after = Swaps(model), {}, 0, 0

    def process(name: str, m: nn.Module, inputs: list[torch.Tensor] | None) -> None:
        nonlocal before, after
        gram = hessian(layer_rows(m, x) for x in inputs) if inputs else None
        rank = lookup(name, config.ranks, config.rank)
        w = m.weight.detach()
        down, up, _ = low_rank(w, rank, gram, config.method if gram is not None else "svd", config.alpha,
                               config.damp, config.ratio, config.energy)
        out_f, in_f = w.shape[0], w[0].numel()
        r = down.shape[0]
        if not saves(r, out_f, in_f):
            skipped[name] = f"rank {r} would not save parameters ({out_f}x{in_f})"
            return
        swaps(name, _replacement(m, down, up))
        ranks[name] = r
        before += out_f * in_f
        after += r * (out_f + in_f)
        if progress:
            progress("factorize", len(ranks) + len(skipped), len(targets))

    try:
        if config.method == "svd":
            for name, m in targets.items():
                process(name, m, None)
        else:
            run_sequential(model, calib, list(targets), process, progress)
            for name in targets:  # never reached by the calibration data: nothing to weigh by
                if name not in ranks and name not in skipped:
                    process(name, targets[name], None)
    except BaseException:
        swaps.rollback()
        raise
    if ranks:
        record(model, "factorize", {"layers": {n: {"rank": r} for n, r in ranks.items()}})
    warn_skipped("factorize_", skipped)
    return {"ranks": ranks, "skipped": skipped, "params_before": before, "params_after": after}


def replay(model: nn.Module, options: dict) -> None:
    """Rebuild recorded low-rank layers (shapes only: values come from the saved tensors)."""

    def build(name: str, m: nn.Module, info) -> nn.Module:
        if factorizable(m) is not None or not isinstance(info, dict) or not isinstance(info.get("rank"), int):
            raise ValueError(f"cannot replay factorize of {name!r}: {type(m).__name__} with record {info!r}")
        return (LowRankLinear if isinstance(m, nn.Linear) else LowRankConv).empty_like(m, info["rank"])

    replay_layers(model, options, "factorize", "{rank}", build)
