"""Channel dependency groups: which output channels of which layers must be removed together.

The model is traced with torch.fx (fold_bn's tracer) and its shapes taken from one example input. Every tensor
gets a channel layout: its channel axis and the "spaces" along it. A space is a run of channels born at a layer
output (a Conv/Linear's output channels). Elementwise functions, pooling, BatchNorm and depthwise convolutions
pass layouts on; a concatenation along the channel axis concatenates them; flattening [B, C, H, W] spreads each
channel over H*W features; an addition (multiplication, ...) of two tensors ties their spaces together, index by
index (residual connections). A group is a set of tied spaces: removing channel i removes it from all of them,
and from every layer that produces, normalises or reads them.

Anything the analysis does not understand (an unknown module or function, a grouped non-depthwise
convolution, a normalisation over channels, the model's inputs and outputs, a layer called twice) blocks the
spaces it touches: they are never pruned. So the result is conservative: a model the analysis cannot follow
simply has fewer prunable groups.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..algorithms.fold_bn import call_counts, trace
from ..calibrate import call_model

# modules and functions that keep the channel layout of their (first) input
PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.Hardsigmoid, nn.Mish, nn.ELU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample)
PASS_FUNCS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh,
              F.hardswish, F.hardsigmoid, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
              F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, operator.pos,
              operator.neg, torch.neg}
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "neg"}
BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
          operator.iadd, operator.imul}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
REDUCE_METHODS = {"mean", "sum", "amax", "max"}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d)


@dataclass
class Seg:
    space: int
    size: int


@dataclass
class Layout:
    """The channel axis of a tensor (counted from the end, so broadcasting lines up) and its spaces."""

    axis: int  # negative: -1 = last
    segs: list[Seg]
    factor: int = 1  # features per channel (after flattening [C, H, W] -> C*H*W)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segs)


@dataclass
class Member:
    """A layer reading, producing or normalising channels: role "out" (weight dim 0, bias), "in" (weight dim 1
    or in_features, each channel `factor` features wide), "bn" (BatchNorm features), "dw" (depthwise conv)."""

    module: str
    role: str
    segs: list[Seg]
    factor: int = 1


@dataclass
class Group:
    """Spaces tied together (same length, index by index) and the layers that must shrink with them."""

    size: int
    spaces: list[int]
    members: list[Member] = field(default_factory=list)
    node: str | None = None  # the last feature map (>= 3-D, unpooled) holding these channels, for EZCrop
    node_segs: list[Seg] = field(default_factory=list)  # that node's channel layout

    def offsets(self, segs: list[Seg]) -> list[int]:
        """Where this group's channels start in a channel axis laid out as `segs` (once per segment of it)."""
        out, pos = [], 0
        for s in segs:
            if s.space in self.spaces:
                out.append(pos)
            pos += s.size
        return out

    @property
    def producers(self) -> list[str]:
        return [m.module for m in self.members if m.role == "out"]


class _Spaces:
    """Union-find over channel spaces, with sizes and a blocked flag."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: list[bool] = []

    def new(self, size: int, blocked: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.blocked.append(blocked)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.blocked[ra] = self.blocked[ra] or self.blocked[rb]

    def block(self, i: int) -> None:
        self.blocked[self.find(i)] = True


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _nodes(args) -> list[fx.Node]:
    out = []
    fx.node.map_arg(args, lambda n: out.append(n))
    return out


class _Analysis:
    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.model, self.graph = model, graph
        self.mods = dict(model.named_modules())
        self.calls = call_counts(graph)
        self.spaces = _Spaces()
        self.layout: dict[fx.Node, Layout] = {}
        self.members: list[Member] = []

    def fresh(self, node: fx.Node, blocked: bool = True) -> Layout | None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return Layout(-len(shape) + 1, [Seg(self.spaces.new(shape[1], blocked), shape[1])])

    def block(self, *nodes) -> None:
        for n in nodes:
            lay = self.layout.get(n)
            if lay is not None:
                for s in lay.segs:
                    self.spaces.block(s.space)

    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                lay = self.fresh(node)
            elif node.op == "output":
                self.block(*_nodes(node.args))
                continue
            elif node.op == "call_module":
                lay = self.module_node(node)
            else:
                lay = self.function_node(node)
            if lay is not None and _shape(node) is not None:
                self.layout[node] = lay

    def _in(self, node: fx.Node) -> Layout | None:
        return self.layout.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None

    def module_node(self, node: fx.Node) -> Layout | None:
        m = self.mods[node.target]
        src = self._in(node)
        ins = _nodes((node.args, node.kwargs))
        shape = _shape(node)
        simple = len(ins) == 1 and src is not None and self.calls[node.target] == 1
        if simple and type(m) in CONVS and src.axis == -(len(_shape(node.args[0])) - 1) and src.factor == 1:
            if m.groups == 1:
                self.members.append(Member(node.target, "in", src.segs))
                return self._produce(node, m.out_channels)
            if m.groups == m.in_channels == m.out_channels:  # depthwise: channel i in -> channel i out
                self.members.append(Member(node.target, "dw", src.segs))
                return Layout(src.axis, src.segs)
        if simple and type(m) is nn.Linear and src.axis == -1:
            self.members.append(Member(node.target, "in", src.segs, src.factor))
            return self._produce(node, m.out_features)
        if simple and type(m) in BATCHNORMS and src.factor == 1 and src.axis == -(len(shape) - 1):
            self.members.append(Member(node.target, "bn", src.segs))
            return Layout(src.axis, src.segs)
        if simple and isinstance(m, PASS_MODULES):
            return Layout(src.axis, src.segs, src.factor)
        if simple and type(m) is nn.Flatten:
            return self._flatten(node, m.start_dim, m.end_dim)
        self.block(*ins)
        return self.fresh(node)

    def _produce(self, node: fx.Node, size: int) -> Layout:
        sid = self.spaces.new(size)
        self.members.append(Member(node.target, "out", [Seg(sid, size)]))
        return Layout(-1 if type(self.mods[node.target]) is nn.Linear else -(len(_shape(node)) - 1),
                      [Seg(sid, size)])

    def _flatten(self, node: fx.Node, start: int, end: int) -> Layout | None:
        """[B, C, H, W] -> [B, C*H*W]: each channel becomes H*W consecutive features."""
        src, shape_in = self._in(node), _shape(node.args[0])
        nd = len(shape_in)
        if src is not None and start % nd == src.axis % nd and end % nd == nd - 1 and len(_shape(node)) == start % nd + 1:
            return Layout(-1, src.segs, src.factor * math.prod(shape_in[src.axis % nd + 1:]))
        self.block(node.args[0])
        return self.fresh(node)

    def function_node(self, node: fx.Node) -> Layout | None:
        t, src = node.target, self._in(node)
        ins = _nodes((node.args, node.kwargs))
        if _shape(node) is None:  # sizes, shapes, python values: no channels flow
            return None
        if (t in PASS_FUNCS or (node.op == "call_method" and t in PASS_METHODS)) and src is not None \
                and len(ins) == 1:
            return Layout(src.axis, src.segs, src.factor)
        if t in BINARY or (node.op == "call_method" and t in BINARY_METHODS):
            return self._binary(node, ins)
        if t is torch.cat:
            return self._cat(node)
        if node.op == "call_method" and t in REDUCE_METHODS and src is not None and len(ins) == 1:
            return self._reduce(node, src)
        if (t is torch.flatten or (node.op == "call_method" and t == "flatten")) and src is not None:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, int(start), int(end))
        if node.op == "call_method" and t in ("view", "reshape") and src is not None:
            shape_in, shape_out = _shape(node.args[0]), _shape(node)
            if len(shape_out) == 2 and shape_out[0] == shape_in[0] and len(shape_in) > 2:
                return self._flatten(node, 1, -1)
        self.block(*ins)
        return self.fresh(node)

    def _binary(self, node: fx.Node, ins: list[fx.Node]) -> Layout | None:
        lays = [self.layout.get(n) for n in ins]
        shapes = [_shape(n) for n in ins]
        out = _shape(node)
        full = [lay for lay, s in zip(lays, shapes) if lay is not None and s is not None and len(s) == len(out)
                and s[lay.axis] == out[lay.axis]]
        if len(full) == len(ins) and len({(la.axis, la.factor) for la in full}) == 1:
            first = full[0]
            for other in full[1:]:
                if [s.size for s in other.segs] != [s.size for s in first.segs]:
                    self.block(*ins)
                    return self.fresh(node)
                for a, b in zip(first.segs, other.segs):
                    self.spaces.union(a.space, b.space)
            return Layout(first.axis, first.segs, first.factor)
        if len(full) == 1 and all(s is None or s[full[0].axis] == 1 for lay, s in zip(lays, shapes)
                                  if lay is not full[0] and s is not None and len(s) >= -full[0].axis):
            return Layout(full[0].axis, full[0].segs, full[0].factor)  # x * scalar, x + per-sample value
        self.block(*ins)
        return self.fresh(node)

    def _cat(self, node: fx.Node) -> Layout | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        lays = [self.layout.get(n) for n in tensors]
        nd = len(_shape(node))
        if all(la is not None and la.factor == 1 and la.axis % nd == dim % nd for la in lays):
            return Layout(lays[0].axis, [s for la in lays for s in la.segs])
        self.block(*tensors)
        return self.fresh(node)

    def _reduce(self, node: fx.Node, src: Layout) -> Layout | None:
        """x.mean(dim=(2, 3)) and the like: the channel axis survives when it is not reduced."""
        nd = len(_shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        dims = (dims,) if isinstance(dims, int) else dims
        axis = src.axis % nd
        if not isinstance(dims, (tuple, list)) or src.factor != 1 or any(d % nd == axis for d in dims):
            self.block(node.args[0])
            return self.fresh(node)
        if keep:
            return Layout(src.axis, src.segs)
        before = sum(1 for d in dims if d % nd < axis)
        return Layout(axis - before - (nd - len(dims)), src.segs)


def channel_groups(model: nn.Module, example: Any) -> tuple[list[Group], fx.GraphModule]:
    """The prunable channel groups of `model` (traced with fx, shapes from `example`, one model input) and the
    traced GraphModule (to capture feature maps). Raises ValueError when the model cannot be traced."""
    from torch.fx.passes.shape_prop import ShapeProp

    graph = trace(model)
    if graph is None:
        raise ValueError(f"{type(model).__name__} cannot be traced with torch.fx: structured channel pruning needs "
                         "a traceable forward")
    gm = fx.GraphModule(model, graph)
    args = _as_args(gm, example)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    a = _Analysis(model, graph)
    a.run()
    return _groups(a), gm


def _as_args(gm: fx.GraphModule, example: Any) -> tuple:
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (tuple, list)):
        return tuple(example)
    if isinstance(example, dict):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        return tuple(example.get(n) for n in names)
    raise TypeError(f"an example input is a tensor, a tuple or a dict of tensors, got {type(example).__name__}")


def _groups(a: _Analysis) -> list[Group]:
    sp = a.spaces
    by_root: dict[int, Group] = {}
    for sid in range(len(sp.parent)):
        r = sp.find(sid)
        if not sp.blocked[r]:
            by_root.setdefault(r, Group(sp.size[r], []))
            by_root[r].spaces.append(sid)
    for mem in a.members:
        roots = {sp.find(s.space) for s in mem.segs}
        for r in roots:
            if r in by_root:
                by_root[r].members.append(mem)
    spatial: dict[int, tuple] = {}
    for node in a.graph.nodes:  # each group's last feature map at the size it is produced (before pooling)
        lay, shape = a.layout.get(node), _shape(node)
        if lay is None or shape is None or len(shape) < 3 or lay.factor != 1:
            continue
        for s in lay.segs:
            r = sp.find(s.space)
            if r in by_root and spatial.setdefault(r, shape[2:]) == shape[2:]:
                by_root[r].node, by_root[r].node_segs = node.name, lay.segs
    return [g for g in by_root.values() if g.producers]


def feature_maps(gm: fx.GraphModule, nodes: set[str], batches: list[Any]):
    """Yield {node name: value} of the given nodes for every batch (one forward each)."""
    class _Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in nodes:
                self.seen[n.name] = out.detach()
            return out

    cap = _Capture(gm)
    with torch.no_grad():
        for b in batches:
            cap.seen = {}
            cap.run(*_as_args(gm, b))
            yield cap.seen


__all__ = ["Group", "Member", "Seg", "channel_groups", "feature_maps", "call_model"]
