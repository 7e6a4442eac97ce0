"""NNAC (network-aware clustering of activation ranges): calibration inputs are clustered by k-means on an early
feature of the network, each quantized layer keeps one static activation range per cluster, and at run time
each sample uses the ranges of the cluster whose centroid is nearest to its feature.

How it is stored: an `NNACRouter` (`model._modelpress_nnac`) holds the centroids and, per layer, the per-cluster
ranges as buffers, saved with the model's tensors as `_modelpress_nnac.<buffer>`. It is a submodule of the model,
except on a container (nn.Sequential, ModuleList, ModuleDict), which would call or yield it as one of its layers
(and a root Sequential has no other module to host it: its layers are swapped by convert_). There it stays out of
the children (model.__dict__) and state-dict hooks save and load its buffers under the same names, so files read
the same either way; it follows the device of the tensors it sees and the model's train / eval mode. The model
carries the structural record `nnac` (feature layer, layer names, activation format, clusters, feature width),
so `mp.load` rebuilds the router before filling its buffers. The router quantizes the inputs of its layers
itself (forward pre-hooks, re-attached on every call to whatever module sits at each name, so swapping a QAT layer for its
packed layer keeps them); those layers therefore carry no activation format of their own. The feature is the
output of the `feature` layer, averaged over spatial / token positions; layers that run before it is known
(the feature layer itself, usually the first) use one range for all samples.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..calibrate import call_model
from .activation import ActFormat, fake_quant, parse_activation
from .fake_quant import kmeans, per_sample_range, with_surrogate
from .qat_quantizers import inside, static_params

ATTR = "_modelpress_nnac"


def pooled(out: Any, conv: bool) -> torch.Tensor:
    """Per-sample feature [N, C] of a layer output: conv [N, C, ...] averaged over positions, linear [N, ..., C]
    averaged over the middle dimensions."""
    t = out[0] if isinstance(out, (tuple, list)) else out
    t = t.detach().float()
    if t.dim() <= 2:  # (flatten, not reshape(N, -1): a batch of zero samples has no -1 to infer)
        return t.flatten(1) if t.dim() == 2 else t.reshape(-1, 1)
    return t.flatten(2).mean(2) if conv else t.flatten(1, -2).mean(1)


class NNACRouter(nn.Module):
    def __init__(self, feature: str, layers: list[str], act: "ActFormat | str", clusters: int, dim: int,
                 momentum: float = 0.9, conv_feature: bool = False):
        super().__init__()
        act = parse_activation(act)
        if act is None or not act.static:
            raise ValueError(f"NNAC keeps static activation ranges: use a ':static' activation format, got {act}")
        if clusters < 1:
            raise ValueError(f"NNAC needs at least one cluster, got {clusters}")
        self.feature, self.layers, self.act, self.clusters = feature, list(layers), act, clusters
        self.dim, self.momentum, self.conv_feature = dim, momentum, conv_feature
        self.register_buffer("centroids", torch.zeros(clusters, dim))
        self.register_buffer("lo", torch.zeros(len(layers), clusters + 1))  # column `clusters`: all samples
        self.register_buffer("hi", torch.ones(len(layers), clusters + 1))
        self.register_buffer("seen", torch.zeros(len(layers), clusters + 1, dtype=torch.bool))
        self._ids: torch.Tensor | None = None  # clusters of the samples of the current forward pass
        self.collect: dict[str, list] | None = None  # calibration: record features and ranges, quantize nothing
        self.observing = True  # update the ranges in training mode

    def options(self) -> dict[str, Any]:
        return {"feature": self.feature, "layers": self.layers, "act": str(self.act), "clusters": self.clusters,
                "dim": self.dim, "momentum": self.momentum, "conv_feature": self.conv_feature}

    def assign(self, feat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid for each row of feat [N, D]."""
        self._follow(feat)
        return torch.cdist(feat.float(), self.centroids).argmin(1)

    def _follow(self, t: torch.Tensor) -> None:
        # a router outside the model's children is not moved by model.to(): it moves to the tensors it is given
        if self.centroids.device != t.device:
            self.to(t.device)

    def ranges(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) [n] for layer i's n samples: their clusters' ranges, or the all-samples range."""
        ids = self._ids
        if ids is None or ids.numel() != n:
            col = torch.full((n,), self.clusters, dtype=torch.long)
        else:
            col = torch.where(self.seen[i, ids], ids, torch.full_like(ids, self.clusters))
        return self.lo[i, col], self.hi[i, col]

    def _update(self, i: int, x: torch.Tensor) -> None:
        if x.shape[0] == 0:  # a batch of no samples has no range to learn from
            return
        lo, hi = per_sample_range(x)
        groups = [(self.clusters, torch.ones_like(lo, dtype=torch.bool))]
        if self._ids is not None and self._ids.numel() == lo.numel():
            groups += [(c, self._ids == c) for c in self._ids.unique().tolist()]
        m = self.momentum
        with torch.no_grad():
            for c, sel in groups:
                blo, bhi = lo[sel].min(), hi[sel].max()
                if self.seen[i, c]:
                    blo, bhi = m * self.lo[i, c] + (1 - m) * blo, m * self.hi[i, c] + (1 - m) * bhi
                self.lo[i, c], self.hi[i, c], self.seen[i, c] = blo, bhi, True

    def quantize(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize layer i's input x [N, ...] per sample with its cluster's range (STE gradient)."""
        if self.collect is not None:
            self.collect["ranges"][i].append(per_sample_range(x))
            return x
        self._follow(x)
        if self.training and self.observing:
            self._update(i, x)
        lo, hi = self.ranges(i, x.shape[0])
        scale, zero = static_params(self.act, lo, hi)
        shape = (-1,) + (1,) * (x.dim() - 1)
        scale, zero = scale.reshape(shape), zero.reshape(shape)
        exact = fake_quant(x.detach(), self.act, scale, zero)
        return with_surrogate(exact, x * inside(x, self.act, scale, zero))

    def attach(self, root: nn.Module) -> None:
        """Make sure the feature hook and the input hooks sit on the modules now at those names."""
        m = root.get_submodule(self.feature)
        if not any(isinstance(h, _FeatureHook) and h.router is self for h in m._forward_hooks.values()):
            m.register_forward_hook(_FeatureHook(self))
        for i, name in enumerate(self.layers):
            m = root.get_submodule(name)
            if not any(isinstance(h, _InputHook) and h.router is self for h in m._forward_pre_hooks.values()):
                m.register_forward_pre_hook(_InputHook(self, i))

    def extra_repr(self) -> str:
        return f"{self.act}, clusters={self.clusters}, feature={self.feature!r}, layers={len(self.layers)}"


class _RootHook:
    def __init__(self, router: NNACRouter):
        self.router = router

    def __call__(self, module, args):
        self.router._ids = None
        self.router.training = module.training  # model.train() / eval() do not reach a router kept out of children
        self.router.attach(module)


class _SaveHook:
    """state_dict post-hook: the buffers of a router kept out of the model's children, named as a child's."""

    def __init__(self, router: NNACRouter):
        self.router = router

    def __call__(self, module, state_dict, prefix, local_metadata):
        self.router.state_dict(destination=state_dict, prefix=prefix + ATTR + ".")


class _LoadHook:
    """load_state_dict pre-hook: takes the router's entries out (the model would report them as unexpected) and
    loads them into the router, reporting missing / unexpected / mismatched ones as torch does for a child."""

    def __init__(self, router: NNACRouter):
        self.router = router

    def __call__(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        p = prefix + ATTR + "."
        mine = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(p)]}
        self.router._load_from_state_dict(mine, p, {}, strict, missing, unexpected, errors)


class _FeatureHook:
    def __init__(self, router: NNACRouter):
        self.router = router

    def __call__(self, module, args, out):
        r = self.router
        feat = pooled(out, r.conv_feature)
        if r.collect is not None:
            r.collect["features"].append(feat)
        else:
            r._ids = r.assign(feat)


class _InputHook:
    def __init__(self, router: NNACRouter, index: int):
        self.router, self.index = router, index

    def __call__(self, module, args):
        return (self.router.quantize(self.index, args[0]), *args[1:])


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # they run / yield every child as a layer


def kept_out(model: nn.Module) -> list[tuple[str, NNACRouter]]:
    """(name, router) of the routers kept out of their container's children, which named_modules() and
    named_buffers() miss although their tensors are saved."""
    return [(f"{n}.{ATTR}" if n else ATTR, m.__dict__[ATTR]) for n, m in model.named_modules()
            if isinstance(m.__dict__.get(ATTR), NNACRouter)]


def install(model: nn.Module, router: NNACRouter) -> NNACRouter:
    if hasattr(model, ATTR):
        raise ValueError("the model already has NNAC activation ranges")
    router.train(model.training)
    if isinstance(model, CONTAINERS):  # not a child: Sequential would call it as its last layer (see the module doc)
        model.__dict__[ATTR] = router
        model._register_state_dict_hook(_SaveHook(router))
        model._register_load_state_dict_pre_hook(_LoadHook(router))
    else:
        model.add_module(ATTR, router)
    model.register_forward_pre_hook(_RootHook(router))
    router.attach(model)
    return router


def remove(model: nn.Module) -> None:
    """Take the router and all its hooks off the model."""
    router = getattr(model, ATTR, None)
    if router is None:
        return
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks, m._state_dict_hooks, m._load_state_dict_pre_hooks):
            for k in [k for k, h in hooks.items() if getattr(getattr(h, "hook", h), "router", None) is router]:
                del hooks[k]  # (torch wraps load_state_dict pre-hooks: the hook is `.hook`)
    delattr(model, ATTR)


def apply_nnac_(model: nn.Module, calib: Iterable[Any], layers: list[str], act: "ActFormat | str",
                clusters: int = 4, feature: str | None = None, momentum: float = 0.9, seed: int = 0) -> NNACRouter:
    """Cluster the calibration inputs (k-means on the feature layer's pooled output), give each of `layers` one
    static input range per cluster (min/max of the cluster's samples, then moving averages in training), and
    install the router. The layers must not quantize their inputs themselves. Returns the router."""
    from ..recipe.structure import record

    if not layers:
        raise ValueError("NNAC needs at least one layer to quantize the inputs of")
    feature = feature or layers[0]
    conv = isinstance(model.get_submodule(feature), (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    probe = NNACRouter(feature, layers, act, 1, 1, momentum, conv)
    probe.collect = {"features": [], "ranges": [[] for _ in layers]}
    install(model, probe)
    try:
        with torch.no_grad():
            for batch in calib:
                call_model(model, batch)
    finally:
        remove(model)
    feats = torch.cat(probe.collect["features"]) if probe.collect["features"] else None
    if feats is None or any(not r for r in probe.collect["ranges"]):
        raise ValueError("NNAC calibration saw no data for the feature layer or for some layer (empty calib?)")
    cent, assign = kmeans(feats, clusters, seed=seed)
    router = NNACRouter(feature, layers, act, clusters, feats.shape[1], momentum, conv)
    router.centroids.copy_(cent)
    for i, rs in enumerate(probe.collect["ranges"]):
        lo, hi = torch.cat([r[0] for r in rs]), torch.cat([r[1] for r in rs])
        router.lo[i, clusters], router.hi[i, clusters] = lo.min(), hi.max()
        if lo.numel() == assign.numel():  # the layer sees one input per sample: per-cluster ranges
            for c in range(clusters):
                sel = assign == c
                if sel.any():
                    router.lo[i, c], router.hi[i, c] = lo[sel].min(), hi[sel].max()
                    router.seen[i, c] = True
        router.seen[i, clusters] = True
    install(model, router)
    record(model, "nnac", router.options())
    return router


def replay(model: nn.Module, options: dict[str, Any]) -> None:
    """Structure replay (mp.load): an empty router of the saved shape, filled by the saved tensors."""
    install(model, NNACRouter(**options))
