"""BatchNorm folding: a BatchNorm that directly follows a Conv/Linear is merged into that layer's weight and bias.

In eval semantics (running statistics) BN(y) = (y - mean) * gamma / sqrt(var + eps) + beta is a per-channel
affine map, so for y = W x + b it equals W' x + b' with
    W'[o] = W[o] * k[o],   b'[o] = (b[o] - mean[o]) * k[o] + beta[o],   k = gamma / sqrt(var + eps).
The BatchNorm is replaced by nn.Identity. Pairs are found on the torch.fx graph of the model (a BN whose only
input is the layer's output, that output used by nothing else); a model that fx cannot trace falls back to
neighbouring children of nn.Sequential containers (nested Sequentials are flattened). A folded model keeps
its eval outputs but no longer has batch statistics: fold after training, before quantization.

The graph helpers here (`trace`, `sequential_chains`, `call_counts`) are shared with equalize.py.
"""
from __future__ import annotations

from collections import Counter
from itertools import pairwise

import torch
from torch import fx, nn

from ..quant import QuantMixin

# layer type -> the BatchNorm types that may follow it (Linear: BatchNorm1d over features of a 2-D input)
FOLDABLE: dict[type, tuple[type, ...]] = {
    nn.Linear: (nn.BatchNorm1d,),
    nn.Conv1d: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d,),
    nn.Conv3d: (nn.BatchNorm3d,),
}


def fold(w: torch.Tensor, b: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor, eps: float,
         gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold BN(mean, var, eps, gamma, beta) into a layer with weight w [out, ...] and bias b [out] (or None).

    Returns (w', b') in w's dtype; gamma/beta None mean an affine-free BN (1 and 0). Computed in float64."""
    out = w.shape[0]
    if mean.shape != (out,) or var.shape != (out,):
        raise ValueError(f"BatchNorm statistics of shape {tuple(mean.shape)} do not match {out} output channels")
    k = torch.rsqrt(var.double() + eps)  # [out]
    if gamma is not None:
        k = k * gamma.double()
    shift = -mean.double() if b is None else b.double() - mean.double()
    b_new = shift * k + (beta.double() if beta is not None else 0.0)
    w_new = w.double() * k.view(out, *([1] * (w.dim() - 1)))
    return w_new.to(w.dtype), b_new.to(w.dtype)


# --- finding layers that feed each other: torch.fx graph, or nn.Sequential neighbours -----------------------

class _Tracer(fx.Tracer):
    """torch.nn modules and modelpress quantized modules are leaves (kept as call_module nodes)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantMixin) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph | None:
    """The fx graph of `model`, or None when it cannot be traced symbolically (data-dependent control flow,
    unsupported Python in forward, ...): callers then fall back to nn.Sequential containers."""
    try:
        return _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - fx raises TraceError, TypeError, NotImplementedError...: all mean no graph
        return None


def call_counts(graph: fx.Graph) -> Counter:
    """How many times each submodule is called in the graph (a layer called twice cannot be rewritten)."""
    return Counter(n.target for n in graph.nodes if n.op == "call_module")


def only_input(node: fx.Node) -> fx.Node | None:
    """The node's tensor input when it is its first argument and no other argument is a graph node."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return None if any(isinstance(a, fx.Node) for a in rest) else node.args[0]


def _is_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def sequential_chains(model: nn.Module) -> list[list[tuple[str, nn.Module | None]]]:
    """(name, module) runs of the outermost nn.Sequential containers, nested Sequentials flattened: the
    modules of one run are applied one after the other to one tensor. A module that the model uses at more
    than one place is listed as None (rewriting it would change its other uses)."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    chains: list[list[tuple[str, nn.Module]]] = []

    def flat(prefix: str, seq: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        for name, child in seq.named_children():
            full = f"{prefix}.{name}" if prefix else name
            out += flat(full, child) if _is_sequential(child) else [(full, child if uses[id(child)] == 1 else None)]
        return out

    def visit(prefix: str, m: nn.Module, in_chain: bool) -> None:
        if _is_sequential(m) and not in_chain:
            chains.append(flat(prefix, m))
        for name, child in m.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child, _is_sequential(m) and _is_sequential(child))

    visit("", model, False)
    return chains


# --- pairs and the in-place verb -----------------------------------------------------------------------------

def _compatible(layer: nn.Module | None, bn: nn.Module | None) -> bool:
    kinds = None if layer is None or bn is None else FOLDABLE.get(type(layer))
    if kinds is None or type(bn) not in kinds or not bn.track_running_stats or bn.running_mean is None:
        return False  # without running statistics a BN normalises with batch statistics even in eval
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return bn.num_features == out


def find_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, BN name) for every BatchNorm that can be folded into the layer before it."""
    graph = trace(model)
    mods = dict(model.named_modules())
    pairs = []
    if graph is not None:
        calls = call_counts(graph)
        for node in graph.nodes:
            if node.op != "call_module" or calls[node.target] != 1:
                continue
            src = only_input(node)
            if (src is None or src.op != "call_module" or calls[src.target] != 1 or len(src.users) != 1
                    or len(node.args) != 1 or node.kwargs):
                continue
            if _compatible(mods[src.target], mods[node.target]):
                pairs.append((src.target, node.target))
        return pairs
    for chain in sequential_chains(model):
        for (ln, layer), (bn_name, bn) in pairwise(chain):
            if _compatible(layer, bn):
                pairs.append((ln, bn_name))
    return pairs


def fold_bn_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm1d/2d(/3d) that directly follows a Linear/Conv1d/Conv2d(/Conv3d) into it, in place.

    Uses running statistics (eval semantics); each folded BN becomes nn.Identity, and a layer without bias
    gets one. Returns the folded (layer name, BatchNorm name) pairs. The change is recorded on the model, so
    that a saved model reloads onto a fresh float one (`load` replays it)."""
    from ..recipe.structure import record

    pairs = find_pairs(model)
    _fold_pairs(model, pairs)
    if pairs:
        record(model, "fold_bn", {"pairs": [list(p) for p in pairs]})
    return pairs


def _fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold the pairs in place: all new values are computed first, and a failure (or an interrupt) while they
    are written puts every layer and BatchNorm back as it was."""
    todo = []
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        w, b = fold(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                    bn.running_mean, bn.running_var, bn.eps,
                    bn.weight.detach() if bn.affine else None, bn.bias.detach() if bn.affine else None)
        if not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
            raise ValueError(f"folding {bn_name!r} into {layer_name!r} gives NaN or infinite weights (NaN/Inf in the "
                             "layer's weights or the BatchNorm's parameters or statistics); refusing to fold")
        todo.append((layer, bn_name, bn, w, b))
    undo = []
    try:
        for layer, bn_name, bn, w, b in todo:
            undo.append((layer, layer.weight.detach().clone(), layer.bias,
                         None if layer.bias is None else layer.bias.detach().clone(), bn_name, bn))
            with torch.no_grad():
                layer.weight.copy_(w)
                if layer.bias is None:
                    layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
                else:
                    layer.bias.copy_(b)
            model.set_submodule(bn_name, nn.Identity())
    except BaseException:
        for layer, w0, bias, b0, bn_name, bn in reversed(undo):
            with torch.no_grad():
                layer.weight.copy_(w0)
                if bias is not None:
                    bias.copy_(b0)
            layer.bias = bias
            model.set_submodule(bn_name, bn)
        raise


def replay(model: nn.Module, options: dict) -> None:
    """Re-apply a recorded folding to a fresh float model (structure only matters: values are reloaded)."""
    pairs = options.get("pairs")
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p)
                                              for p in pairs):
        raise ValueError(f"fold_bn record needs 'pairs' [[layer, batchnorm], ...], got {pairs!r}")
    mods = dict(model.named_modules())
    for layer_name, bn_name in pairs:
        if not _compatible(mods.get(layer_name), mods.get(bn_name)):
            raise ValueError(f"cannot replay BatchNorm folding: the model has no foldable pair "
                             f"{layer_name!r} -> {bn_name!r} (wrong architecture?)")
    _fold_pairs(model, [tuple(p) for p in pairs])
