"""Cross-layer equalization (CLE): balance the per-channel weight ranges of two layers that feed each other.

For y = W2 f(W1 x + b1) with f positive-homogeneous per channel (f(s x) = s f(x) for s > 0: ReLU, LeakyReLU,
identity, and between convolutions max/average pooling), scaling output channel i of the first layer by
1/s_i and input channel i of the second by s_i leaves the float function unchanged. With r1_i the range of
output channel i of W1 and r2_i that of input channel i of W2,
    s_i = sqrt(r1_i * r2_i) / r2_i
makes both ranges sqrt(r1_i * r2_i): channels that per-tensor quantization would crush get a share of the
range. Ranges are max |w| (modelpress integer formats are symmetric by default). Iterating over all pairs
converges for chains (conv -> depthwise conv -> conv: the depthwise layer is second of one pair and first of
the next). ReLU6, GELU, SiLU and other non-homogeneous functions end a pair, as does a BatchNorm: fold
BatchNorms first (fold_bn_). Pairs come from the torch.fx graph (the first layer's output used only by the
activations, each used only by the next, and the last only by the second layer), or from nn.Sequential
neighbours when the model cannot be traced.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fold_bn import call_counts, only_input, sequential_chains, trace

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
# elementwise and positive-homogeneous: allowed between any two layers
ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)
ELEMENTWISE_FUNCS = {F.relu, torch.relu, torch.relu_, F.leaky_relu, F.dropout, operator.pos}
ELEMENTWISE_METHODS = {"relu", "relu_"}
# per-channel over spatial dimensions: allowed between two convolutions only
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}


# --- pure tensor functions -------------------------------------------------------------------------------------

def out_ranges(w: torch.Tensor) -> torch.Tensor:
    """max |w| per output channel: w [out, ...] -> [out]."""
    return w.detach().reshape(w.shape[0], -1).abs().amax(1)


def _by_input(w: torch.Tensor, groups: int) -> torch.Tensor:
    """w [out, in/groups, *k] (or Linear [out, in]) viewed as [groups, out/groups, in/groups, prod(k)]."""
    return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)


def in_ranges(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """max |w| per input channel: w [out, in/groups, *k] -> [in]. Input channel g * in/groups + j of a grouped
    conv feeds the outputs of group g through column j (a depthwise conv: channel i <-> filter i)."""
    return _by_input(w.detach(), groups).abs().amax(dim=(1, 3)).reshape(-1)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s_i = sqrt(r1_i r2_i) / r2_i, so that r1_i / s_i == r2_i * s_i; 1 where a channel is all zeros."""
    r1, r2 = r1.double(), r2.double()
    ok = (r1 > 0) & (r2 > 0)
    s = torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2))
    return torch.where(ok, s, torch.ones_like(s))


def scale_out(w: torch.Tensor, b: torch.Tensor | None, inv_s: torch.Tensor):
    """(w, b) with output channel i multiplied by inv_s[i]."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    w2 = (w.double() * inv_s.view(shape)).to(w.dtype)
    return w2, None if b is None else (b.double() * inv_s).to(b.dtype)


def scale_in(w: torch.Tensor, s: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """w with input channel i multiplied by s[i] (same grouping as in_ranges)."""
    g = _by_input(w.double(), groups)
    return (g * s.double().view(groups, 1, -1, 1)).reshape(w.shape).to(w.dtype)


# --- finding pairs -----------------------------------------------------------------------------------------------

def _groups(m: nn.Module) -> int:
    return getattr(m, "groups", 1)


def _compatible(a: nn.Module, b: nn.Module) -> bool:
    """Same family (Linear->Linear acts on the last dim, ConvNd->ConvNd on dim 1) and matching channels."""
    if type(a) is not type(b) or not isinstance(a, LAYERS):
        return False
    if isinstance(a, nn.Linear):
        return a.out_features == b.in_features
    return a.out_channels == b.in_channels


def _passes(node: fx.Node, mods: dict, conv: bool) -> bool:
    """Does this node apply an allowed per-channel positive-homogeneous function to its only tensor input?"""
    if only_input(node) is None:
        return False
    if node.op == "call_module":
        m = mods[node.target]
        return isinstance(m, ELEMENTWISE_MODULES) or (conv and isinstance(m, POOL_MODULES))
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCS or (conv and node.target in POOL_FUNCS)
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


def _graph_pairs(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    mods = dict(model.named_modules())
    calls = call_counts(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or type(mods[node.target]) not in LAYERS:
            continue
        first, cur = mods[node.target], node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if (nxt.op == "call_module" and calls[nxt.target] == 1 and only_input(nxt) is cur
                    and _compatible(first, mods[nxt.target])):
                pairs.append((node.target, nxt.target))
                break
            if only_input(nxt) is not cur or not _passes(nxt, mods, not isinstance(first, nn.Linear)):
                break
            cur = nxt
    return pairs


def _chain_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for chain in sequential_chains(model):
        for i, (name, first) in enumerate(chain):
            if first is None or type(first) not in LAYERS:
                continue
            for nxt_name, nxt in chain[i + 1:]:
                if nxt is not None and _compatible(first, nxt):
                    pairs.append((name, nxt_name))
                    break
                allowed = ELEMENTWISE_MODULES if isinstance(first, nn.Linear) else ELEMENTWISE_MODULES + POOL_MODULES
                if nxt is None or not isinstance(nxt, allowed):
                    break
    return pairs


def find_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(first, second) layer names of every pair that cross-layer equalization can rescale."""
    graph = trace(model)
    return _graph_pairs(model, graph) if graph is not None else _chain_pairs(model)


# --- the in-place verb -------------------------------------------------------------------------------------------

def equalize_pair_(first: nn.Module, second: nn.Module) -> torch.Tensor:
    """Equalize one pair in place; returns the scales s [channels] applied."""
    s = equalization_scales(out_ranges(first.weight), in_ranges(second.weight, _groups(second)))
    w1, b1 = scale_out(first.weight.detach(), None if first.bias is None else first.bias.detach(), 1.0 / s)
    w2 = scale_in(second.weight.detach(), s, _groups(second))
    with torch.no_grad():
        first.weight.copy_(w1)
        if b1 is not None:
            first.bias.copy_(b1)
        second.weight.copy_(w2)
    return s


def equalize_(model: nn.Module, iterations: int = 20, tol: float = 1e-6) -> list[tuple[str, str]]:
    """Cross-layer equalization of `model` in place (float outputs unchanged); returns the equalized pairs.

    Sweeps over all pairs `iterations` times at most, stopping once no scale moves more than `tol`. A failure
    (or an interrupt) puts the weights back as they were."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    pairs = find_pairs(model)
    mods = [(model.get_submodule(a), model.get_submodule(b)) for a, b in pairs]
    touched = list({id(m): m for pair in mods for m in pair}.values())
    saved = [(m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for m in touched]
    try:
        for _ in range(iterations):
            moved = 0.0
            for first, second in mods:
                s = equalize_pair_(first, second)
                moved = max(moved, (s - 1).abs().max().item())
            if moved <= tol:
                break
    except BaseException:  # a failure (or an interrupt) leaves the model as it was
        with torch.no_grad():
            for m, w, b in saved:
                m.weight.copy_(w)
                if b is not None:
                    m.bias.copy_(b)
        raise
    return pairs
