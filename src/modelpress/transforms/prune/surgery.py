"""Module surgery: shrink Linear / Conv / BatchNorm layers to the kept channels, remove whole blocks, rewrite a
Hugging Face config, and record it all on the model so `mp.load` can replay it on a fresh float model.

A record ("prune_structured") holds, per module, the kept output / input indices and the original sizes, the
integer attributes and config keys that changed, and the kept blocks of a block list. Replaying it only
rebuilds shapes (the saved tensors fill in the values) and is idempotent: a module that already has the kept
size (a model rebuilt by `from_pretrained` from the rewritten config) is left alone.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...recipe.structure import record

KIND = "prune_structured"
# what a record may set (nothing else is ever set from a manifest)
ATTRS = {"num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups", "all_head_size",
         "intermediate_size", "layer_idx"}
# the config key of the FFN width, per architecture family: Llama / BERT / GPT-NeoX..., OPT, GPT-2 / GPT-J /
# CodeGen (None: 4 * hidden), Falcon, T5-like, DistilBERT; the first one a config has is the one pruning rewrites
FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "hidden_dim")
CONFIG_KEYS = {*FFN_KEYS, "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim",
               "layer_types"}
SHRINKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _size(m: nn.Module, dim: str) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features if dim == "out" else m.in_features
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.out_channels if dim == "out" else m.in_channels
    return m.num_features


def _param(old: nn.Parameter | None, data: torch.Tensor | None) -> nn.Parameter | None:
    return None if old is None else nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)


def shrink_(m: nn.Module, out: torch.Tensor | None = None, inp: torch.Tensor | None = None) -> None:
    """Keep output channels `out` and input channels `inp` (index tensors, None = all) of m, in place.
    A depthwise convolution's input and output channels are the same: give `out` only."""
    if not isinstance(m, SHRINKABLE):
        raise TypeError(f"cannot shrink a {type(m).__name__}")
    with torch.no_grad():
        if isinstance(m, nn.Linear):
            w = m.weight
            w2 = w[out] if out is not None else w
            w2 = w2[:, inp] if inp is not None else w2
            m.weight = _param(w, w2)
            if out is not None:
                m.bias = _param(m.bias, None if m.bias is None else m.bias[out])
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if m.groups > 1 and not depthwise:
                raise ValueError("grouped (non-depthwise) convolutions are not shrunk")
            w = m.weight
            w2 = w[out] if out is not None else w
            if inp is not None and not depthwise:
                w2 = w2[:, inp]
            m.weight = _param(w, w2)
            if out is not None:
                m.bias = _param(m.bias, None if m.bias is None else m.bias[out])
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.out_channels if depthwise else m.weight.shape[1]
            if depthwise:
                m.groups = m.out_channels
        else:  # BatchNorm
            keep = out
            if keep is None:
                return
            m.weight = _param(m.weight, None if m.weight is None else m.weight[keep])
            m.bias = _param(m.bias, None if m.bias is None else m.bias[keep])
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name)
                if buf is not None:
                    setattr(m, name, buf[keep].clone())
            m.num_features = len(keep)


def find_config(model: nn.Module):
    """The Hugging Face config of the model (or of its first submodule that has one), else None."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict") and hasattr(cfg, "num_hidden_layers"):
            return cfg
    return None


def apply_record(model: nn.Module, options: dict[str, Any]) -> None:
    """Apply a structural record: blocks removed, modules shrunk, attributes and config keys set."""
    mods = dict(model.named_modules())
    blocks = options.get("blocks")
    if blocks:
        _keep_blocks(model, blocks["list"], blocks["keep"], blocks["size"])
        mods = dict(model.named_modules())
    for name, spec in (options.get("shrink") or {}).items():
        m = mods.get(name)
        if m is None or not isinstance(m, SHRINKABLE):
            raise ValueError(f"cannot replay pruning: the model has no prunable layer {name!r} (wrong architecture?)")
        idx = {}
        for dim in ("out", "in"):
            if dim not in spec:
                continue
            keep, orig = spec[dim], spec[f"{dim}_size"]
            now = _size(m, dim)
            if now == len(keep):
                continue  # already that size (rebuilt from a rewritten config)
            if now != orig:
                raise ValueError(f"cannot replay pruning of {name!r}: it has {now} {dim}put channels, the record "
                                 f"expects {orig} (or {len(keep)})")
            if not (isinstance(keep, list) and keep and all(isinstance(k, int) and not isinstance(k, bool)
                                                            for k in keep)
                    and all(0 <= k < orig for k in keep) and len(set(keep)) == len(keep)):
                raise ValueError(f"cannot replay pruning of {name!r}: the kept {dim}put channels must be distinct "
                                 f"indices below {orig}, got {str(keep)[:80]}")
            idx[dim] = torch.tensor(keep, dtype=torch.long)
        if idx:
            shrink_(m, idx.get("out"), idx.get("in"))
    for name, attrs in (options.get("attrs") or {}).items():
        m = mods.get(name)
        for a, v in attrs.items():
            if m is None or a not in ATTRS or not isinstance(v, int) or not hasattr(m, a):
                raise ValueError(f"cannot replay pruning: bad attribute record {name!r}.{a} = {v!r}")
            setattr(m, a, v)
    cfg = find_config(model)
    for k, v in (options.get("config") or {}).items():
        if k not in CONFIG_KEYS:
            raise ValueError(f"cannot replay pruning: config key {k!r} is not one pruning changes")
        if cfg is not None:
            setattr(cfg, k, v)


def _keep_blocks(model: nn.Module, list_name: str, keep: list[int], size: int) -> None:
    ml = model.get_submodule(list_name)
    if not isinstance(ml, nn.ModuleList):
        raise ValueError(f"cannot replay block removal: {list_name!r} is not a ModuleList")
    if len(ml) == len(keep):
        return
    if len(ml) != size:
        raise ValueError(f"cannot replay block removal: {list_name!r} has {len(ml)} blocks, the record expects {size}")
    kept = [ml[i] for i in keep]
    parent, _, child = list_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.ModuleList(kept))


def commit(model: nn.Module, shrink: dict[str, dict[str, torch.Tensor]], attrs: dict | None = None,
           config: dict | None = None, blocks: dict | None = None) -> dict[str, Any]:
    """Shrink the modules of `model` (name -> {"out": idx, "in": idx}), set attributes and config keys, remove
    blocks, and record it for replay. Returns the record's options."""
    mods = dict(model.named_modules())
    options: dict[str, Any] = {"shrink": {}, "attrs": attrs or {}, "config": config or {}}
    for name, dims in shrink.items():
        spec = {}
        for dim, idx in dims.items():
            spec[dim] = [int(i) for i in idx]
            spec[f"{dim}_size"] = _size(mods[name], dim)
        options["shrink"][name] = spec
    if blocks:
        options["blocks"] = blocks
    apply_record(model, options)
    record(model, KIND, options)
    return options


def replay(model: nn.Module, options: dict) -> None:
    """`structure.REPLAY` entry: rebuild the pruned shapes on a fresh float model."""
    if not isinstance(options, dict):
        raise ValueError("a prune_structured record must be a mapping")
    apply_record(model, options)
