"""Deformable butterfly (DeBut) replacement of Linear and pointwise (1 x 1) Conv2d layers.

For each layer a chain of factors (see `modelpress.nn.butterfly`) is chosen to fit a parameter budget (`ratio` of
the dense weight), or given per layer (`chains`: name pattern -> [[r, s], ...]); its factors are initialised by
gradient descent (Adam) on ||(W - B_n ... B_1) L||_F, where L is the Cholesky factor of the layer's input Gram
matrix when calibration data is given (the output error) and the identity otherwise (the weight error). The
model is then fine-tuned (the factors and biases of the replaced layers; everything with `train_all`) to match the
float model's outputs on the training (or calibration) inputs, or on the labels with finetune_on="labels".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from ..nn.butterfly import ButterflyConv2d, ButterflyLinear, apply_chain, chain_params, factor_shapes, is_pointwise
from ..select import check_patterns, lookup, select_modules
from ._common import (Swaps, described, finetune_batches, replace_then_finetune, replay_layers, teacher_for,
                      warn_skipped)


@dataclass(frozen=True)
class ButterflyConfig:
    ratio: float = 0.25  # parameter budget per layer, as a fraction of the dense weight
    chains: Mapping[str, list] | None = None  # name pattern -> [[r, s], ...] (first match wins)
    max_factors: int = 3
    fit_steps: int = 300  # gradient steps fitting the factors to the pretrained weight
    fit_lr: float = 0.1  # relative to the root-mean-square of the initial factor entries
    finetune_steps: int = 300  # recovery training after the replacement (0: none)
    lr: float = 1e-3
    finetune_on: Literal["teacher", "labels"] = "teacher"  # match the float model's outputs, or fit the labels
    train_all: bool = False  # fine-tune every parameter, not only the replaced layers'
    include: list[str] | None = None
    exclude: list[str] | None = None
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError(f"butterfly ratio must be in (0, 1), got {self.ratio}")
        if not 1 <= self.max_factors <= 4:
            raise ValueError(f"butterfly max_factors must be in 1..4, got {self.max_factors}")
        for v, what in ((self.fit_steps, "fit_steps"), (self.finetune_steps, "finetune_steps")):
            if v < 0:
                raise ValueError(f"butterfly {what} must be >= 0, got {v}")
        for chain in (self.chains or {}).values():
            if not isinstance(chain, (list, tuple)) or not all(
                    isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(v, int) for v in c) for c in chain):
                raise ValueError(f"a butterfly chain is a list of [r, s] integer pairs, got {chain!r}")
        check_patterns(self.include)
        check_patterns(self.exclude)
        check_patterns(list(self.chains or {}))


# --- choosing a chain --------------------------------------------------------------------------------------

def _ordered_factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """All ordered tuples of `parts` positive integers whose product is n."""
    if parts == 1:
        return [(n,)]
    return [(d,) + rest for d in range(1, n + 1) if n % d == 0 for rest in _ordered_factorizations(n // d, parts - 1)]


def _widths(chain, in_f: int) -> list[int]:
    return [b * r * t for b, t, r, _ in factor_shapes(chain, in_f)]


def choose_chain(in_f: int, out_f: int, ratio: float, max_factors: int = 3) -> list[tuple[int, int]] | None:
    """The chain with the most parameters within ratio * in * out (the most expressive that fits), ties broken by
    the narrowest intermediate width (wider first), then by fewer factors; None when none fits. Factors that
    neither mix nor map (r = s = 1) are not used."""
    budget = ratio * in_f * out_f
    best, best_key = None, None
    for n in range(2, max_factors + 1):
        ins, outs = _ordered_factorizations(in_f, n), _ordered_factorizations(out_f, n)
        for s in ins:
            for r in outs:
                chain = list(zip(r, s))
                if any(a == 1 and b == 1 for a, b in chain):
                    continue
                p = chain_params(chain, in_f)
                if p > budget:
                    continue
                key = (p, min(_widths(chain, in_f)[:-1]), -n)
                if best_key is None or key > best_key:
                    best, best_key = chain, key
    return best


# --- fitting the factors -----------------------------------------------------------------------------------

def fit_chain(w: torch.Tensor, chain, steps: int = 300, lr: float = 0.1, right: torch.Tensor | None = None,
              seed: int = 0) -> tuple[list[torch.Tensor], float]:
    """Factors [b, t, r, s] of `chain` approximating w [out, in], and the relative error ||(W - B) R|| / ||W R||
    (R = `right`, e.g. the input whitening, identity when None). Random start scaled to ||W||, then Adam with a
    cosine-decayed learning rate (`lr` times the entries' initial RMS), keeping the best iterate."""
    in_f = w.shape[1]
    target = w.detach().float().T  # [in, out]: the chain is applied to rows, so fit I -> W^T
    basis = torch.eye(in_f) if right is None else right.float().T  # rows R^T: (B R)^T = R^T B^T
    goal = basis @ target
    norm = goal.norm().clamp(min=1e-12)
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(shape, generator=g) / math.sqrt(shape[-1]) for shape in factor_shapes(chain, in_f)]
    with torch.no_grad():
        scale = (target.norm() / apply_chain(torch.eye(in_f), factors).norm().clamp(min=1e-12)) ** (1 / len(factors))
    factors = [(f * scale).requires_grad_(True) for f in factors]
    if steps == 0:
        with torch.no_grad():
            return [f.detach() for f in factors], float((apply_chain(basis, factors) - goal).norm() / norm)
    rms = torch.cat([f.detach().flatten() for f in factors]).pow(2).mean().sqrt()
    opt = torch.optim.Adam(factors, lr=lr * float(rms))  # steps relative to the size of the entries
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_err = None, math.inf
    for _ in range(steps):
        err = (apply_chain(basis, factors) - goal).norm() / norm
        if err.item() < best_err:
            best, best_err = [f.detach().clone() for f in factors], err.item()
        opt.zero_grad(set_to_none=True)
        err.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        err = float((apply_chain(basis, factors) - goal).norm() / norm)
    if err < best_err:
        best, best_err = [f.detach().clone() for f in factors], err
    return best, best_err


# --- the verb ----------------------------------------------------------------------------------------------

def replaceable(m: nn.Module) -> bool:
    return type(m) is nn.Linear or is_pointwise(m)


def _new(m: nn.Module, chain) -> ButterflyLinear:
    return (ButterflyLinear if type(m) is nn.Linear else ButterflyConv2d).empty_like(m, chain)


def butterfly_(model: nn.Module, config: ButterflyConfig | None = None, calib: Any = None, train: Any = None,
               teacher: nn.Module | None = None, progress: Callable[[str, int, int], None] | None = None,
               deadline: float | None = None) -> dict[str, Any]:
    """Replace the selected Linear and pointwise Conv2d layers by deformable butterfly factors, then fine-tune.

    `calib`: model inputs (whitened fit; fine-tuning inputs when no `train` is given). `train`: training batches
    (inputs, or (input, class) pairs). Fine-tuning matches the `teacher`'s outputs (default: a copy of `model`
    before the change; `compress` passes its float reference), or fits the labels with finetune_on="labels".
    Returns {"chains", "fit_error", "skipped", "params_before", "params_after",
    "finetune"}. Recorded on the model for `save` / `load`."""
    from ..algorithms.gptq import hessian, layer_rows
    from ..recipe.structure import record
    from .factorize import weighting

    config = config or ButterflyConfig()
    calib = list(calib) if calib is not None else None
    train = list(train) if train is not None else None
    targets, skipped = {}, {}
    for name, m in select_modules(model, config.include, config.exclude):
        if replaceable(m):
            targets[name] = m
        elif (config.include is not None and isinstance(getattr(m, "weight", None), torch.Tensor)
              and not list(m.children())):
            skipped[name] = "not a Linear or pointwise Conv2d"
    if not targets:
        warn_skipped("butterfly_", skipped)
        return {"chains": {}, "fit_error": {}, "skipped": skipped, "params_before": 0, "params_after": 0,
                "finetune": None}
    batches = finetune_batches(train, calib, config.finetune_on) if config.finetune_steps else []
    teacher = teacher_for(model, teacher, config.finetune_steps, config.finetune_on, batches)
    swaps, chains, errors, before, after = Swaps(model), {}, {}, 0, 0

    def process(name: str, m: nn.Module, inputs) -> None:
        nonlocal before, after
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        out_f, in_f = w.shape
        chain = lookup(name, config.chains)
        chain = [tuple(c) for c in chain] if chain is not None else choose_chain(in_f, out_f, config.ratio,
                                                                                 config.max_factors)
        if chain is None:
            skipped[name] = f"no butterfly chain of {in_f}->{out_f} fits {config.ratio} of its parameters"
            return
        new = _new(m, chain)  # checks a given chain against the layer's sizes
        right = None
        if inputs:
            right, _ = weighting(hessian(layer_rows(m, x) for x in inputs), "whiten")
        factors, err = fit_chain(w, chain, config.fit_steps, config.fit_lr, right, config.seed)
        swaps(name, new.set_factors(factors, None if m.bias is None else m.bias.detach()))
        chains[name], errors[name] = [list(c) for c in chain], round(err, 6)
        before += out_f * in_f
        after += chain_params(chain, in_f)
        if progress:
            progress("butterfly", len(chains) + len(skipped), len(targets))

    tuned = replace_then_finetune(model, targets, chains, skipped, process, calib, bool(calib), config, batches,
                                  teacher, swaps, "butterfly", progress, deadline)
    if chains:
        record(model, "butterfly", {"layers": {n: {"chain": c, **described(model.get_submodule(n))}
                                               for n, c in chains.items()}})
    warn_skipped("butterfly_", skipped)
    return {"chains": chains, "fit_error": errors, "skipped": skipped, "params_before": before,
            "params_after": after, "finetune": tuned}


def replay(model: nn.Module, options: dict) -> None:
    """Rebuild recorded butterfly layers (shapes only: values come from the saved tensors)."""

    def build(name: str, m: nn.Module, info) -> nn.Module:
        chain = info.get("chain") if isinstance(info, dict) else None
        if not replaceable(m) or not isinstance(chain, list):
            raise ValueError(f"cannot replay butterfly of {name!r}: {type(m).__name__} with record {info!r}")
        return _new(m, [tuple(c) for c in chain])

    replay_layers(model, options, "butterfly", "{chain}", build)
