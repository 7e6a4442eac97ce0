"""Exact fusions: merge layers whose composition is again one layer, keeping the float outputs (up to rounding).

- BatchNorm after a Conv/Linear (`algorithms.fold_bn`).
- Linear -> Linear with nothing but nn.Identity between them: y = W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2).
- Conv -> 1 x 1 Conv (stride 1, no padding, no groups): a pointwise layer after a k x k convolution mixes its
  output channels only, so the pair is the k x k convolution with weight W2 . W1 (contracted over the middle
  channels) and bias W2 b1 + b2, with the first convolution's stride, padding and dilation.

Pairs come from the torch.fx graph (the first layer's output used by the second only), or from neighbours in
nn.Sequential containers when the model cannot be traced. The fused layer takes the first one's place and the
second becomes nn.Identity. By default a pair is fused only when the merged weight is not larger than the two
(a bottleneck such as a low-rank pair is left alone); `allow_growth=True` fuses anyway.
"""
from __future__ import annotations

import copy
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from ..algorithms.fold_bn import call_counts, only_input, sequential_chains, trace
from ..nn.factorized import LowRankConv, LowRankLinear
from ..select import check_patterns, selected
from ._common import Swaps

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- pure math ---------------------------------------------------------------------------------------------

def fuse_weights(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of layer 2 after layer 1, for a Linear pair (w [out, in]) or a conv followed by a pointwise conv
    (w2 [out, mid, 1, ...]). Computed in float64, returned in w1's dtype; b is None when neither has a bias."""
    out, mid = w2.shape[0], w2.shape[1]
    a = w2.reshape(out, mid).double()
    w = (a @ w1.reshape(mid, -1).double()).reshape(out, *w1.shape[1:])
    if b1 is None and b2 is None:
        return w.to(w1.dtype), None
    b = (a @ b1.double() if b1 is not None else torch.zeros(out, dtype=torch.float64))
    b = b + (b2.double() if b2 is not None else 0.0)
    return w.to(w1.dtype), b.to(w1.dtype)


# --- finding pairs -----------------------------------------------------------------------------------------

def _pointwise(m: nn.Module) -> bool:
    return (type(m) in _CONVS and all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride)
            and m.groups == 1 and (m.padding == "valid" or all(p == 0 for p in m.padding)))


def pair_kind(a: nn.Module | None, b: nn.Module | None) -> str | None:
    """"linear" or "conv" when layer b directly after layer a can be merged exactly, else None."""
    if type(a) is nn.Linear and type(b) is nn.Linear and a.out_features == b.in_features:
        return "linear"
    if (type(a) in _CONVS and type(b) is type(a) and a.groups == 1 and _pointwise(b)
            and a.out_channels == b.in_channels):
        return "conv"
    return None


def _grows(a: nn.Module, b: nn.Module) -> bool:
    """The merged weight [out_b, in_a...] would hold more numbers than the two weights."""
    return b.weight.shape[0] * a.weight[0].numel() > a.weight.numel() + b.weight.numel()


def find_pairs(model: nn.Module, allow_growth: bool = False, include=None, exclude=None) -> list[tuple[str, str]]:
    """(first, second) layer names that can be fused, each layer in at most one pair."""
    mods = dict(model.named_modules())
    candidates: list[tuple[str, str]] = []
    graph = trace(model)
    if graph is not None:
        calls = call_counts(graph)
        for node in graph.nodes:
            if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
                continue
            src = only_input(node)
            while (src is not None and src.op == "call_module" and isinstance(mods[src.target], nn.Identity)
                   and len(src.users) == 1):
                src = only_input(src)
            if src is None or src.op != "call_module" or calls[src.target] != 1:
                continue
            users = src.users
            while len(users) == 1 and next(iter(users)) is not node:  # through the Identity nodes skipped above
                u = next(iter(users))
                if u.op != "call_module" or not isinstance(mods[u.target], nn.Identity):
                    break
                users = u.users
            if len(users) == 1 and next(iter(users)) is node:
                candidates.append((src.target, node.target))
    else:
        for chain in sequential_chains(model):
            chain = [(n, m) for n, m in chain if not isinstance(m, nn.Identity)]
            candidates += [(a, b) for (a, _), (b, _) in pairwise(chain)]
    inside = [n + "." for n, m in mods.items() if isinstance(m, (LowRankLinear, LowRankConv))]
    pairs, used = [], set()
    for a, b in candidates:
        if any(a.startswith(p) or b.startswith(p) for p in inside):
            continue  # a low-rank pair is a deliberate bottleneck
        if a in used or b in used or pair_kind(mods.get(a), mods.get(b)) is None:
            continue
        if not (selected(a, include, exclude) and selected(b, include, exclude)):
            continue
        if not allow_growth and _grows(mods[a], mods[b]):
            continue
        pairs.append((a, b))
        used |= {a, b}
    return pairs


# --- the verb ----------------------------------------------------------------------------------------------

def _empty_fused(a: nn.Module, b: nn.Module) -> nn.Module:
    bias = a.bias is not None or b.bias is not None
    if type(a) is nn.Linear:
        return nn.Linear(a.in_features, b.out_features, bias=bias, dtype=a.weight.dtype)
    return type(a)(a.in_channels, b.out_channels, a.kernel_size, stride=a.stride, padding=a.padding,
                   dilation=a.dilation, bias=bias, padding_mode=a.padding_mode, dtype=a.weight.dtype)


def _fuse_pairs(model: nn.Module, pairs, swaps: Swaps, compute: bool = True) -> None:
    for a_name, b_name in pairs:
        a, b = model.get_submodule(a_name), model.get_submodule(b_name)
        new = _empty_fused(a, b).train(a.training)
        if compute:
            w, bias = fuse_weights(a.weight.detach(), None if a.bias is None else a.bias.detach(),
                                   b.weight.detach(), None if b.bias is None else b.bias.detach())
            with torch.no_grad():
                new.weight.copy_(w)
                if bias is not None:
                    new.bias.copy_(bias)
        swaps(a_name, new)
        swaps(b_name, nn.Identity())


def fuse_(model: nn.Module, batchnorm: bool = True, layers: bool = True, allow_growth: bool = False,
          include: list[str] | None = None, exclude: list[str] | None = None) -> dict[str, Any]:
    """Apply the exact fusions in place: BatchNorm folding (`batchnorm`), then Linear->Linear and
    Conv->pointwise Conv pairs (`layers`), repeated until nothing more fuses (chains of three and more).
    Both layers of a pair must be picked by include/exclude. Returns {"fold_bn": [[layer, bn]], "fused":
    [[first, second]]}; the changes are recorded on the model for `save` / `load`."""
    from ..algorithms.fold_bn import _fold_pairs
    from ..algorithms.fold_bn import find_pairs as bn_pairs
    from ..recipe.structure import record

    check_patterns(include)
    check_patterns(exclude)
    folded, fused, swaps = [], [], Swaps(model)
    try:
        if batchnorm:
            folded = [p for p in bn_pairs(model)
                      if selected(p[0], include, exclude) and selected(p[1], include, exclude)]
            for layer, bn in folded:  # folding changes the layer in place: keep a copy to roll back to
                swaps.originals[layer] = copy.deepcopy(model.get_submodule(layer))
                swaps.originals[bn] = model.get_submodule(bn)
            _fold_pairs(model, folded)
        while layers:
            pairs = find_pairs(model, allow_growth, include, exclude)
            if not pairs:
                break
            _fuse_pairs(model, pairs, swaps)
            fused += pairs
    except BaseException:
        swaps.rollback()
        raise
    if folded:
        record(model, "fold_bn", {"pairs": [list(p) for p in folded]})
    if fused:
        record(model, "fuse", {"pairs": [list(p) for p in fused]})
    return {"fold_bn": [list(p) for p in folded], "fused": [list(p) for p in fused]}


def replay(model: nn.Module, options: dict) -> None:
    """Rebuild recorded fusions (shapes only: values come from the saved tensors)."""
    pairs = options.get("pairs")
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise ValueError(f"fuse record needs 'pairs' [[first, second], ...], got {pairs!r}")
    swaps = Swaps(model)
    for a, b in pairs:
        mods = dict(model.named_modules())
        if pair_kind(mods.get(a), mods.get(b)) is None:
            swaps.rollback()
            raise ValueError(f"cannot replay fusion: the model has no fusible pair {a!r} -> {b!r} "
                             "(wrong architecture?)")
        _fuse_pairs(model, [(a, b)], swaps, compute=False)
