"""Hutchinson's estimate of Hessian traces: tr(H) = E[v^T H v] for random v with independent +-1 entries.

`hutchinson_trace(loss_fn, params)` returns one estimate per parameter tensor (the trace of its diagonal block
of the Hessian: v_p^T (H v)_p, whose cross terms vanish in expectation). Hessian-vector products come from double
backward (`exact`), or from central differences of gradients, (g(w + e v) - g(w - e v)) / 2e (`fd`), which needs
only first derivatives (some fused kernels, e.g. CPU flash attention, have no second derivative); `auto` tries
the first and falls back to the second. On a quadratic both are exact up to rounding.

`layer_traces` applies it to the units of a model with the probe's divergence from the float outputs as the loss
(zero, with zero gradient, at the float weights; its Hessian there is the Fisher / Gauss-Newton matrix), so
0.5 * tr(H)/n * ||Q(W) - W||^2 predicts the measured cost of quantizing a unit (HAWQ-V2's average trace).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

METHODS = ("auto", "exact", "fd")


def _rademacher(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, p.shape, generator=g, dtype=torch.int8) * 2 - 1).to(p.dtype)


def _hvp_exact(loss_fn, params, vs):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, grad_outputs=vs, allow_unused=True)


def _hvp_fd(loss_fn, params, vs, eps):
    """Central differences of gradients along v scaled per tensor by eps[i]: (H D v) with D = diag(eps)."""
    def grads_at(sign):
        with torch.no_grad():
            for p, v, e in zip(params, vs, eps):
                p.add_(v, alpha=sign * e)
        try:
            return torch.autograd.grad(loss_fn(), params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, v, e in zip(params, vs, eps):
                    p.sub_(v, alpha=sign * e)

    plus, minus = grads_at(1.0), grads_at(-1.0)
    return [None if a is None else (a - b) / 2 for a, b in zip(plus, minus)]


def hutchinson_trace(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], samples: int = 16,
                     seed: int = 0, method: str = "auto", eps: float = 1e-3) -> tuple[list[float], str]:
    """(per-tensor trace estimates, the method used). `loss_fn()` recomputes the scalar loss from `params`
    (tensors with requires_grad). `eps` is the finite-difference step relative to each tensor's RMS value."""
    if method not in METHODS:
        raise ValueError(f"unknown Hessian-vector method {method!r}; use one of {', '.join(METHODS)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    params = list(params)
    g = torch.Generator().manual_seed(seed)
    steps = []
    for p in params:
        rms = float(p.detach().float().pow(2).mean().sqrt())
        steps.append(eps * (rms if rms > 0 else 1.0))
    totals = [0.0] * len(params)
    used = method
    for _ in range(samples):
        vs = [_rademacher(p, g) for p in params]
        if used in ("auto", "exact"):
            try:
                hv = _hvp_exact(loss_fn, params, vs)
                used = "exact"
            except (RuntimeError, NotImplementedError):
                if used == "exact":
                    raise
                used = "fd"
        if used == "fd":  # (H D v)_p / e_p: its product with v_p has expectation tr(H_pp)
            hv = [None if h is None else h / e for h, e in zip(_hvp_fd(loss_fn, params, vs, steps), steps)]
        for i, (v, h) in enumerate(zip(vs, hv)):
            if h is not None:
                totals[i] += float((v.double() * h.double()).sum())
    return [t / samples for t in totals], used


def layer_traces(model: nn.Module, units, probe, samples: int = 8, method: str = "auto", seed: int = 0,
                 progress=None) -> dict[str, float]:
    """unit name -> tr(H)/n, the mean diagonal of the Hessian of the probe's divergence in the unit's weights,
    estimated over the held-out batches (the Hessian of a sum is the sum of the batches' Hessians)."""
    params, owner = [], []
    for u in units:
        m = model.get_submodule(u.name)
        for key in u.shapes:
            params.append(getattr(m, key))
            owner.append(u.name)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    totals = [0.0] * len(params)
    try:
        with torch.enable_grad():
            for i in range(len(probe.batches)):
                est, method = hutchinson_trace(lambda i=i: probe.loss(i), params, samples, seed + i, method)
                totals = [a + b for a, b in zip(totals, est)]
                if progress:
                    progress("hessian", i + 1, len(probe.batches))
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
    out: dict[str, float] = {}
    for u in units:
        out[u.name] = 0.0
    for name, t in zip(owner, totals):
        out[name] += t
    return {u.name: out[u.name] / u.params for u in units}
