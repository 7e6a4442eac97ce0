"""`prune_channels_`: remove whole output channels of Conv / Linear layers, so the layers truly shrink.

Channels are removed per dependency group (modelpress.graph.channels: a layer's outputs together with the
BatchNorms, depthwise convolutions, residual additions and concatenations they flow through, and the layers that
read them), the same fraction of every prunable group, ranked by an importance score (importance.py). The
result is an ordinary smaller nn.Module; the change is recorded so `mp.load` rebuilds it on a fresh float model.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ...calibrate import _one_line, call_model, dry_run, run_hooked
from ...graph.channels import Group, Member, channel_groups, feature_maps
from ...quant.base import check_float_weight
from ...quant.kernels import note_model
from ...recipe import structure
from ...select import check_patterns, selected
from . import importance as imp
from .surgery import SHRINKABLE, commit


@dataclass(frozen=True)
class ChannelPruneConfig:
    """ratio: fraction of the channels of every prunable group removed. importance: l1 | l2 | taylor (needs
    (input, target) batches) | ezcrop (needs feature maps: calibration inputs) | activation (calibration
    inputs). include / exclude: patterns on the names of the layers producing the channels. round_to: kept
    channels are a multiple of this. alpha: EZCrop's low-frequency zone size. batches: data batches used.
    recalibrate_bn: re-estimate BatchNorm running statistics on the calibration inputs after removal (the
    layers after a pruned one see other inputs than the statistics were taken on)."""

    ratio: float = 0.5
    importance: str = "l2"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    round_to: int = 1
    alpha: float = 0.25
    batches: int = 8
    recalibrate_bn: bool = True

    def __post_init__(self):
        for k in ("include", "exclude"):
            v = getattr(self, k)
            object.__setattr__(self, k, None if v is None else ((v,) if isinstance(v, str) else tuple(v)))
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"channel pruning ratio must be in [0, 1), got {self.ratio}")
        if self.importance not in imp.IMPORTANCE:
            raise ValueError(f"unknown importance {self.importance!r}; use one of {', '.join(imp.IMPORTANCE)}")
        if self.round_to < 1 or self.batches < 1 or not 0 < self.alpha <= 1:
            raise ValueError("round_to and batches must be >= 1 and alpha in (0, 1]")
        check_patterns(self.include)
        check_patterns(self.exclude)


def kept_count(size: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept of `size`: (1 - ratio) of them, a multiple of round_to, at least round_to (or size)."""
    keep = round(size * (1.0 - ratio) / round_to) * round_to
    return min(size, max(keep, min(round_to, size)))


def _gather(group: Group, member_segs, vec: torch.Tensor) -> torch.Tensor:
    """A per-position vector of a layer's channel axis -> the group's channels (summed over repeats)."""
    out = torch.zeros(group.size, dtype=torch.float64)
    for off in group.offsets(member_segs):
        out += vec[off:off + group.size].double()
    return out


def _positions(m: Member, keep: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """Kept positions of a layer's channel axis (space id -> kept indices), expanded by its factor; None when
    none of its spaces is pruned."""
    parts, pos, touched = [], 0, False
    for s in m.segs:
        k = keep.get(s.space)
        touched |= k is not None
        parts.append(pos + (k if k is not None else torch.arange(s.size)))
        pos += s.size
    if not touched:
        return None
    idx = torch.cat(parts)
    if m.factor > 1:
        idx = (idx[:, None] * m.factor + torch.arange(m.factor)).reshape(-1)
    return idx


def recalibrate_bn_(model: nn.Module, batches: list[Any], what: str = "calib") -> int:
    """Re-estimate the running statistics of every BatchNorm from `batches` (model inputs; a cumulative average,
    nothing else changes). Returns the number of BatchNorms updated. A batch that does not run through the model
    raises a ValueError naming it (`what`: where the batches came from) with the statistics half re-estimated:
    prune_channels_ undoes its whole step then."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not batches:
        return 0
    momenta = [m.momentum for m in bns]
    flags = [(m, m.training) for m in model.modules()]  # every module's own (a frozen BatchNorm in a training model)
    model.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches
            m.train()
        with torch.no_grad():
            for i, b in enumerate(batches):
                try:
                    call_model(model, b)
                except Exception as e:
                    raise ValueError(f"{what}: batch {i} does not run through the pruned model "
                                     f"({_one_line(e)})") from e
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, tr in flags:
            m.training = tr
    return len(bns)


def _bn_stats(model: nn.Module) -> list:
    """Every BatchNorm's buffers (running statistics, batch count), copied: _put_bn_stats writes them back in place."""
    return [(m, {k: v.clone() for k, v in m._buffers.items() if v is not None}) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _put_bn_stats(stats: list) -> None:
    with torch.no_grad():
        for m, bufs in stats:
            for k, v in bufs.items():
                m._buffers[k].copy_(v)


def _undo_point(model: nn.Module, names) -> Callable[[], None]:
    """What undoes a failed prune_channels_ after the cut: the shrunk modules' tensors and sizes (shrink_ puts
    new tensors in), every BatchNorm's statistics (re-estimated in place after the cut) and the structure records."""
    mods = dict(model.named_modules())
    shrunk = [(mods[n], dict(mods[n].__dict__), dict(mods[n]._parameters), dict(mods[n]._buffers)) for n in names]
    stats = _bn_stats(model)
    records = structure.saved(model)

    def undo() -> None:
        for m, d, params, bufs in shrunk:
            m.__dict__.update(d)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(bufs)
        _put_bn_stats(stats)
        structure.put_back(model, records)
        note_model(model)  # (the cut had noted its smaller weights on the quantized layers, for the speed guard)
    return undo


def _inputs(batches: list[Any]) -> list[Any]:
    return [b[0] if isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], torch.Tensor) else b
            for b in batches]


def group_scores(model: nn.Module, groups: list[Group], gm, config: ChannelPruneConfig, calib: list[Any] | None,
                 train: list[Any] | None) -> list[torch.Tensor]:
    """Importance [size] of every group's channels."""
    mods = dict(model.named_modules())
    kind = config.importance
    if kind in ("l1", "l2"):
        p = 1 if kind == "l1" else 2
        return [sum((_gather(g, m.segs if m.role == "dw" else m.segs, imp.row_norms(mods[m.module].weight, p))
                     for m in g.members if m.role in ("out", "dw")), torch.zeros(g.size, dtype=torch.float64))
                for g in groups]
    if kind == "taylor":
        return _taylor(model, groups, mods, config, train)
    data = list(itertools.islice(calib or _inputs(train or []), config.batches))
    if not data:
        raise ValueError(f"{kind} importance needs calibration inputs (calib=...)")
    if kind == "ezcrop":
        return _ezcrop(model, groups, gm, config, data)
    return _activation(model, groups, mods, data)


def weight_grads(model: nn.Module, names: Iterable[str], batches) -> dict[str, torch.Tensor]:
    """Gradients of the supervised loss with respect to the weights of modules `names`, summed over `batches`
    ((input, target) pairs), in eval mode; the model's gradients and training flag are restored afterwards."""
    from ...recipe.context import NO_CLI_TRAIN
    from ...train.loop import supervised_loss

    if not batches:
        raise ValueError(f"taylor importance needs (input, target) training batches (train=...; {NO_CLI_TRAIN})")
    mods = dict(model.named_modules())
    acc = {n: torch.zeros_like(mods[n].weight) for n in names}
    was = model.training
    model.eval()
    try:
        for b in batches:
            model.zero_grad(set_to_none=True)
            supervised_loss(model, b).backward()
            for n in acc:
                if mods[n].weight.grad is not None:
                    acc[n] += mods[n].weight.grad
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return acc


def _taylor(model, groups, mods, config, train) -> list[torch.Tensor]:
    batches = list(itertools.islice(train or [], config.batches))
    grads = weight_grads(model, {m.module for g in groups for m in g.members}, batches)
    out = []
    for g in groups:
        s = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            w = mods[m.module].weight
            if m.role in ("out", "dw", "bn"):
                s += _gather(g, m.segs, imp.taylor(w, grads[m.module], 0))
            else:
                s += _gather(g, m.segs, imp.taylor(w, grads[m.module], 1, m.factor))
        out.append(s)
    return out


def _ezcrop(model, groups, gm, config, data) -> list[torch.Tensor]:
    nodes = {g.node for g in groups if g.node is not None}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for seen in feature_maps(gm, nodes, data):
        count += 1
        for name, fmap in seen.items():
            if fmap.dim() == 4:
                s = imp.ezcrop(fmap, config.alpha) * fmap.shape[0]
                sums[name] = s if name not in sums else sums[name] + s
    n_images = sum(_batch_size(b) for b in data)
    out = []
    mods = dict(model.named_modules())
    for g in groups:
        if g.node in sums:
            out.append(_gather(g, g.node_segs, sums[g.node] / max(n_images, 1)))
        else:  # no 2-D feature map (e.g. Linear layers): L2 norms
            out.append(sum((_gather(g, m.segs, imp.row_norms(mods[m.module].weight))
                            for m in g.members if m.role in ("out", "dw")), torch.zeros(g.size, dtype=torch.float64)))
    return out


def _batch_size(b) -> int:
    t = b if isinstance(b, torch.Tensor) else next(v for v in (b.values() if isinstance(b, dict) else b)
                                                 if isinstance(v, torch.Tensor))
    return t.shape[0]


def _activation(model, groups, mods, data) -> list[torch.Tensor]:
    readers = {m.module: m for g in groups for m in g.members if m.role == "in"}
    energy: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, args):
            x = args[0]
            axis = -1 if isinstance(mod, nn.Linear) else 1
            e = imp.channel_energy(x, axis)
            energy[name] = e if name not in energy else energy[name] + e
        return f

    run_hooked(model, data, [mods[n].register_forward_pre_hook(hook(n)) for n in readers])
    out = []
    for g in groups:
        s = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            if m.role == "in" and m.module in energy:
                w = mods[m.module].weight
                e = energy[m.module]
                if m.factor > 1:
                    e = e.reshape(-1, m.factor).sum(1)
                s += _gather(g, m.segs, e.sqrt() * imp.col_norms(w, m.factor).double())
        out.append(s)
    return out


def plan_channels(model: nn.Module, config: ChannelPruneConfig, calib: list[Any] | None,
                  train: list[Any] | None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """What `prune_channels_` removes, without changing the model: module name -> {"out": kept indices,
    "in": kept indices}, and counts (groups, channels_removed)."""
    example = (calib or _inputs(train or []) or [None])[0]
    if example is None:
        raise ValueError("channel pruning needs an example input to trace the model: give calib=[inputs]")
    dry_run(model, example, "calib" if calib else "train")  # a wrong input named as such, not as a tracing error
    stats = _bn_stats(model)  # (a model in training mode updates them in the passes below: they are put back)
    try:
        groups, gm = channel_groups(model, example)
        mods = dict(model.named_modules())
        groups = [g for g in groups
                  if all(selected(n, config.include, config.exclude) for n in g.producers)
                  and all(type(mods[m.module]) in SHRINKABLE for m in g.members)]
        scores = group_scores(model, groups, gm, config, calib, train) if groups else []
    finally:
        _put_bn_stats(stats)
    keep: dict[int, torch.Tensor] = {}
    removed = 0
    for g, s in zip(groups, scores):
        k = kept_count(g.size, config.ratio, config.round_to)
        if k == g.size:
            continue
        idx = torch.sort(torch.topk(s, k).indices).values
        for sid in g.spaces:
            keep[sid] = idx
        removed += g.size - k
    shrink: dict[str, dict[str, torch.Tensor]] = {}
    for g in groups:
        for m in g.members:
            pos = _positions(m, keep)
            if pos is None:
                continue
            dim = "in" if m.role == "in" else "out"
            shrink.setdefault(m.module, {})[dim] = pos
    return shrink, {"groups": len(groups), "channels_removed": removed}


def prune_channels_(model: nn.Module, config: "ChannelPruneConfig | float" = ChannelPruneConfig(),
                    calib: Iterable[Any] | None = None, train: Iterable[Any] | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Remove `config.ratio` of the channels of every prunable group of `model`, in place.

    calib: model inputs (one is needed to trace shapes; ezcrop / activation importance use them); train:
    (input, target) batches for taylor importance. Returns what was done: groups, channels and parameters
    before and after."""
    if not isinstance(config, ChannelPruneConfig):
        config = ChannelPruneConfig(ratio=config)
    calib = list(calib) if calib is not None else None
    train = list(train) if train is not None else None
    params_before = sum(p.numel() for p in model.parameters())
    if progress:
        progress("prune_channels", 0, 1)
    shrink, counts = plan_channels(model, config, calib, train)
    if not counts["channels_removed"]:
        warnings.warn(f"prune_channels_ removed no channel ({counts['groups']} prunable channel group(s) at ratio "
                      f"{config.ratio}: the channels a convolution or Linear produces, read only by layers that can "
                      "shrink with it)", stacklevel=2)
    mods = dict(model.named_modules())
    for name in shrink:  # (the layers cut: as prune_, not the ones left whole)
        w = getattr(mods[name], "weight", None)
        if isinstance(w, torch.Tensor):
            check_float_weight(name, w.detach(), "prune")
    if shrink:
        undo = _undo_point(model, shrink)
        try:
            commit(model, shrink)
            if config.recalibrate_bn:
                recalibrate_bn_(model, list(itertools.islice(calib or _inputs(train or []), config.batches)),
                                "calib" if calib else "train")
        except BaseException:
            undo()
            raise
    if progress:
        progress("prune_channels", 1, 1)
    return {**counts, "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters())}
