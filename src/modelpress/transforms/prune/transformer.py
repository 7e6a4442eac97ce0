"""`prune_transformer_`: remove FFN neurons, attention heads and whole blocks of a transformer so its layers
truly shrink, the same count in every block, and rewrite its Hugging Face config to match.

Found from the module structure, with no per-architecture code: the blocks are the calibration runner's
(the largest ModuleList of one module type; of a one-block model, its largest ModuleList of one module); in
each, the FFN is the Linear layers producing the config's FFN width (`intermediate_size`, or another key in
surgery.FFN_KEYS) features and the one reading them; the attention module is the one with query/key/value
projections (q_proj/k_proj/v_proj, query/key/value), its output projection o_proj / out_proj / the sibling
output.dense. With grouped-query attention (fewer key/value heads) the same number of query heads is removed
from every group, so key/value heads and their sharing stay valid.

The config is rewritten where it can express the result: the FFN width key, `num_hidden_layers` (and
`layer_types`), and the head counts (with `head_dim`) when the architecture, built from the rewritten config, has
the pruned attention's shapes (Llama-like, and Qwen2, which reads `head_dim` when the config has it). BERT derives
the head size from the head count, so its config cannot describe pruned heads: `from_pretrained` then cannot rebuild
the model (a warning says so), but `mp.load` replays the recorded structure.
"""
from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ...calibrate import dry_run, find_blocks, run_hooked
from ...prune import holds_weight_matrix
from ...recipe import structure
from . import importance as imp
from .channels import kept_count, weight_grads
from .surgery import FFN_KEYS, commit, find_config

QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
OUT = ("o_proj", "out_proj", "output.dense", "dense")
HEAD_ATTRS = ("num_heads", "num_attention_heads")


@dataclass(frozen=True)
class TransformerPruneConfig:
    """ffn: fraction of FFN neurons removed in every block. heads: fraction of attention (query) heads removed
    in every block (within every key/value group). layers: number of whole blocks removed (those that change
    their input least on calibration data). importance of neurons and heads: l1 | l2 | taylor ((input, target)
    batches) | activation (calibration inputs). batches: data batches used."""

    ffn: float = 0.0
    heads: float = 0.0
    layers: int = 0
    importance: str = "activation"
    batches: int = 8

    def __post_init__(self):
        for k in ("ffn", "heads"):
            v = getattr(self, k)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{k} ratio must be in [0, 1), got {v}")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 0:
            raise ValueError(f"layers must be a number of blocks >= 0, got {self.layers!r}")
        if self.importance not in ("l1", "l2", "taylor", "activation"):
            raise ValueError(f"unknown importance {self.importance!r}; use l1, l2, taylor or activation")
        if not (self.ffn or self.heads or self.layers):
            raise ValueError("TransformerPruneConfig removes nothing: give ffn, heads and/or layers")


@dataclass
class Attention:
    module: str
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    n_q: int
    n_kv: int


def _linear(mods, name) -> bool:
    return type(mods.get(name)) is nn.Linear


def find_attention(mods: dict[str, nn.Module], block: str, hidden: int, n_heads: int) -> Attention | None:
    for name, m in mods.items():
        if not (name == block or name.startswith(block + ".")):
            continue
        for q, k, v in QKV:
            qn, kn, vn = f"{name}.{q}", f"{name}.{k}", f"{name}.{v}"
            if not all(_linear(mods, x) for x in (qn, kn, vn)):
                continue
            parent = name.rpartition(".")[0]
            o = next((f"{base}.{oo}" for base in (name, parent) for oo in OUT
                      if _linear(mods, f"{base}.{oo}") and mods[f"{base}.{oo}"].in_features == mods[qn].out_features),
                     None)
            if o is None:
                return None
            a = mods[name]
            hd = getattr(a, "head_dim", None) or getattr(a, "attention_head_size", None) or hidden // n_heads
            return Attention(name, qn, kn, vn, o, hd, mods[qn].out_features // hd, mods[kn].out_features // hd)
    return None


def find_ffn(mods: dict[str, nn.Module], block: str, size: int) -> tuple[list[str], list[str]]:
    """(producers, readers): Linear layers of the block writing / reading `size` features. A producer sits beside a
    reader (Llama's gate/up/down_proj, OPT's fc1/fc2) or alone in its module (BERT's intermediate.dense): a Linear
    that shares its module with other layers than the FFN's, e.g. a fused qkv_proj as wide as the FFN, is not one."""
    lin = [(n, m) for n, m in mods.items() if n.startswith(block + ".") and type(m) is nn.Linear]
    readers = [n for n, m in lin if m.in_features == size]
    reader_parents = {n.rpartition(".")[0] for n in readers}

    def alone(n: str) -> bool:
        parent = n.rpartition(".")[0]
        return sum(isinstance(c, nn.Linear) for c in mods[parent].children()) == 1
    writers = [n for n, m in lin if m.out_features == size and (n.rpartition(".")[0] in reader_parents or alone(n))]
    return writers, readers


def _fused_gate_up(mods: dict[str, nn.Module], readers: list[str], size: int, hidden: int) -> str | None:
    """A Linear beside an FFN reader that reads the hidden state and writes 2 x `size` features (Phi-3's
    gate_up_proj: gate and up in one). The readers themselves are not (down_proj writes the hidden size, which
    can be 2 x the FFN width after an earlier pruning)."""
    for r in readers:
        parent = r.rpartition(".")[0]
        for c, m in mods[parent].named_children():
            name = f"{parent}.{c}"
            if name not in readers and type(m) is nn.Linear and m.out_features == 2 * size and m.in_features == hidden:
                return name
    return None


def _energy(model, names: list[str], data) -> dict[str, torch.Tensor]:
    """Sum of squares of each feature of the listed layers' inputs over the data."""
    mods = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}

    def hook(n):
        def f(_m, args):
            e = imp.channel_energy(args[0], -1)
            out[n] = e if n not in out else out[n] + e
        return f

    run_hooked(model, data, [mods[n].register_forward_pre_hook(hook(n)) for n in names])
    return out


def unit_scores(kind: str, mods, writers: list[str], readers: list[str], energy, grads) -> torch.Tensor:
    """Importance of every feature between `writers` (rows) and `readers` (columns): [features]."""
    if kind in ("l1", "l2"):
        p = 1 if kind == "l1" else 2
        return (sum(imp.row_norms(mods[n].weight, p) for n in writers)
                + sum(imp.col_norms(mods[n].weight, 1, p) for n in readers)).double()
    if kind == "taylor":
        return (sum(imp.taylor(mods[n].weight, grads[n], 0) for n in writers)
                + sum(imp.taylor(mods[n].weight, grads[n], 1) for n in readers)).double()
    return sum(energy[n].sqrt() * imp.col_norms(mods[n].weight).double() for n in readers)


def _head_dims(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd)).reshape(-1)


def ffn_width(cfg) -> tuple[str, int]:
    """(config key, value) of the FFN width; raises naming the config class when no known key is there."""
    for key in FFN_KEYS:
        if hasattr(cfg, key):
            v = getattr(cfg, key)
            return key, 4 * cfg.hidden_size if v is None else v  # GPT-2 / GPT-J: n_inner None means 4 * hidden
    raise ValueError(f"{type(cfg).__name__} names its FFN width with none of the config keys prune_transformer_ "
                     f"knows ({', '.join(FFN_KEYS)}): its FFNs cannot be pruned (heads and layers can)")


def _units(mods, blocks, cfg, config: TransformerPruneConfig) -> list:
    """(block, attention, FFN writers, FFN readers) of every block; raises when one lacks what is pruned."""
    ffn_key, ffn_size = ffn_width(cfg) if config.ffn else (None, 0)
    plan = []
    for bname, _ in blocks:
        att = find_attention(mods, bname, cfg.hidden_size, cfg.num_attention_heads) if config.heads else None
        if config.heads and att is None:
            raise ValueError(f"no attention with separate query/key/value nn.Linear projections found in block "
                             f"{bname!r}{_others(mods, bname)}")
        ffn = find_ffn(mods, bname, ffn_size) if config.ffn else ([], [])
        fused = _fused_gate_up(mods, ffn[1], ffn_size, cfg.hidden_size) if config.ffn else None
        if fused:
            raise ValueError(f"{fused} computes two halves of the FFN in one layer (2 x {ffn_key} {ffn_size} outputs, "
                             "e.g. gate and up): pruning such fused FFNs is not supported (heads and layers can be)")
        if config.ffn and not (ffn[0] and ffn[1]):
            raise ValueError(f"no FFN nn.Linear layers of {ffn_key} {ffn_size} found in block {bname!r}"
                             f"{_others(mods, bname)}")
        plan.append((bname, att, *ffn))
    return plan


def _others(mods: dict[str, nn.Module], block: str) -> str:
    """", whose weight layers are X, Y": what the block holds instead of plain nn.Linear layers (GPT-2's Conv1D)."""
    kinds = sorted({type(m).__name__ for n, m in mods.items() if n.startswith(block + ".") and type(m) is not nn.Linear
                    and holds_weight_matrix(m)})
    return f" (its weight layers are {', '.join(kinds)}: prune_transformer_ handles nn.Linear ones)" if kinds else ""


def transformer_blocks(model: nn.Module, cfg) -> list[tuple[str, nn.Module]]:
    """The calibration runner's blocks (find_blocks), which takes a list of more than one; a one-block model's
    are the largest ModuleList of exactly one module, as its config's num_hidden_layers == 1 says."""
    blocks = find_blocks(model)
    if blocks or getattr(cfg, "num_hidden_layers", None) != 1:
        return blocks
    return find_blocks(model, min_blocks=1)  # (no list of several: the lists of one module are what is left)


def _checked(model, config: TransformerPruneConfig, calib, train):
    cfg = find_config(model)
    if cfg is None:
        raise ValueError("prune_transformer_ needs a Hugging Face transformer (a model with a config that has "
                         "num_hidden_layers)")
    if getattr(cfg, "is_encoder_decoder", False):  # one stack of blocks is found, but the config's widths and head
        # counts are shared by both stacks: the rewritten config would describe neither
        raise ValueError(f"prune_transformer_ prunes one stack of blocks; {type(cfg).__name__} is an encoder-decoder "
                         "whose config describes both stacks with shared sizes: not supported (prune_channels_ / "
                         "prune_ still apply)")
    blocks = transformer_blocks(model, cfg)
    if not blocks:
        raise ValueError(f"prune_transformer_ found no list of transformer blocks in {type(model).__name__}: it "
                         "looks for an nn.ModuleList of blocks of one type (config.num_hidden_layers = "
                         f"{getattr(cfg, 'num_hidden_layers', None)})")
    calib = list(itertools.islice(calib or [], config.batches))
    train = list(itertools.islice(train or [], config.batches))
    data = calib or [b[0] for b in train]
    if config.importance == "activation" and (config.ffn or config.heads) and not data:
        raise ValueError("activation importance needs calibration inputs (calib=...)")
    if config.layers and not data:
        raise ValueError("removing blocks needs calibration inputs (calib=...) to measure each block's influence")
    _units(dict(model.named_modules()), blocks, cfg, config)  # before any change (blocks are removed first)
    if data:  # a wrong batch named as such (not as the error of the first pass that would meet it)
        dry_run(model, data[0], "calib" if calib else "train")
    if config.layers >= len(blocks):
        raise ValueError(f"cannot remove {config.layers} of the model's {len(blocks)} blocks")
    return cfg, blocks, data, train


def plan_transformer(model: nn.Module, config: TransformerPruneConfig, calib: Iterable[Any] | None = None,
                     train: Iterable[Any] | None = None, progress=None):
    """What `prune_transformer_` removes from FFNs and attention, without changing the model: (shrink: module ->
    {"out"/"in": kept indices}, attrs: module -> {attribute: value}, config keys, info)."""
    cfg, blocks, data, train = _checked(model, config, calib, train)
    mods = dict(model.named_modules())
    plan = _units(mods, blocks, cfg, config)
    readers = [r for _, att, _, rs in plan for r in ([att.o] if att else []) + rs]
    writers = [w for _, att, ws, _ in plan for w in ([att.q, att.k, att.v] if att else []) + ws]
    energy = _energy(model, readers, data) if config.importance == "activation" and readers else {}
    grads = weight_grads(model, readers + writers, train) if config.importance == "taylor" else {}
    shrink: dict[str, dict[str, torch.Tensor]] = {}
    attrs: dict[str, dict[str, int]] = {}
    info: dict[str, Any] = {}
    for i, (bname, att, ws, rs) in enumerate(plan):
        if ws:
            s = unit_scores(config.importance, mods, ws, rs, energy, grads)
            k = kept_count(len(s), config.ffn)
            keep = torch.sort(torch.topk(s, k).indices).values
            for n in ws:
                shrink.setdefault(n, {})["out"] = keep
            for n in rs:
                shrink.setdefault(n, {})["in"] = keep
            parent = ws[0].rpartition(".")[0]
            if isinstance(getattr(mods[parent], "intermediate_size", None), int):  # Llama's MLP keeps it
                attrs[parent] = {"intermediate_size": k}
            info["ffn"] = (len(s), k)
        if att:
            _prune_heads(att, config, mods, energy, grads, shrink, attrs, info)
        if progress:
            progress("prune_transformer", i + 1, len(plan))
    new_cfg: dict[str, Any] = {}
    if "ffn" in info:
        new_cfg[ffn_width(cfg)[0]] = info["ffn"][1]
    hf_ok = True
    if "heads" in info:
        n_q, n_kv = info["heads"][1], info["kv_heads"]
        if n_q == info["heads"][0]:
            warnings.warn(f"heads={config.heads} removes no attention head (kept {n_q} of {n_q}: with grouped-query "
                          "attention the share is taken of each group's query heads, rounded)", stacklevel=2)
        heads = {"num_attention_heads": n_q}
        if hasattr(cfg, "num_key_value_heads"):
            heads["num_key_value_heads"] = n_kv
        att = next(att for _, att, _, _ in plan if att)
        if not getattr(cfg, "head_dim", None):
            heads["head_dim"] = att.head_dim  # read by architectures that take it from the config when given (Qwen2)
        rebuilds = _config_rebuilds(model, cfg, {**new_cfg, **heads}, att, mods, shrink)
        # (a class that could not be built to check it: the config's own head_dim says the head size does not follow
        # the head count)
        if rebuilds or (rebuilds is None and getattr(cfg, "head_dim", None)):
            new_cfg.update(heads)
        else:
            hf_ok = False
            why = ("its class could not be built from the rewritten config to check it" if rebuilds is None else
                   "its attention, built from the rewritten config, takes the head size from the head count")
            warnings.warn(f"{type(cfg).__name__} cannot describe pruned heads ({why}), so from_pretrained cannot "
                          "rebuild this model; mp.load(folder, float_model) can", stacklevel=2)
    info["hf_config_complete"] = hf_ok
    return shrink, attrs, new_cfg, info


def _config_rebuilds(model: nn.Module, cfg, changes: dict[str, Any], att: Attention, mods, shrink) -> bool | None:
    """Whether the model's class, built (on the meta device) from the config with `changes`, has the pruned
    attention projections' shapes: whether from_pretrained of the rewritten folder can rebuild it; None when the
    class cannot be built that way (a constructor with other arguments)."""
    owner = next(((n, m) for n, m in model.named_modules() if getattr(m, "config", None) is cfg), None)
    if owner is None:
        return None
    prefix = owner[0] + "." if owner[0] else ""
    c = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(c, k, v)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = dict(type(owner[1])(c).named_modules())
    except Exception:  # noqa: BLE001 - a class that cannot be built this way
        return None
    for name in (att.q, att.k, att.v, att.o):
        w = mods[name].weight.shape
        dims = shrink.get(name, {})
        want = (len(dims["out"]) if "out" in dims else w[0], len(dims["in"]) if "in" in dims else w[1])
        got = fresh.get(name[len(prefix):]) if name.startswith(prefix) else None
        if got is None or tuple(got.weight.shape) != want:
            return False
    return True


def prune_transformer_(model: nn.Module, config: TransformerPruneConfig, calib: Iterable[Any] | None = None,
                       train: Iterable[Any] | None = None,
                       progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Remove FFN neurons, attention heads and blocks of the transformer `model` in place (see the module doc).
    Returns what was done (units before/after, parameters, whether the HF config describes the result)."""
    cfg, blocks, data, _ = _checked(model, config, calib, train)
    params_before = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {"hf_config_complete": True}
    undo = _undo_point(model, blocks, cfg)
    try:
        layers = _remove_blocks(model, blocks, config.layers, data, cfg) if config.layers else None
        if config.ffn or config.heads:  # in the blocks that are left (so the record names what the final model has)
            shrink, attrs, new_cfg, info = plan_transformer(model, replace(config, layers=0), calib, train, progress)
            if shrink:
                commit(model, shrink, attrs, new_cfg)
    except BaseException:
        undo()
        raise
    if layers:
        info["layers"] = layers
    info.update(params_before=params_before, params_after=sum(p.numel() for p in model.parameters()))
    return info


def _undo_point(model: nn.Module, blocks, cfg) -> Callable[[], None]:
    """What undoes a failed prune_transformer_: the block list's modules, the config keys and layer_idx attributes
    block removal rewrites, and the structure records. (FFN / head shrinking is committed last, in one step.)"""
    list_name = blocks[0][0].rpartition(".")[0]
    parent_name, _, child = list_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    ml = getattr(parent, child) if child else None  # block removal puts a new ModuleList there: this one is kept
    keys = {k: copy.deepcopy(getattr(cfg, k)) for k in ("num_hidden_layers", "layer_types") if hasattr(cfg, k)}
    idx = [(m, m.layer_idx) for _, b in blocks for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    records = structure.saved(model)

    def undo() -> None:
        if ml is not None:
            setattr(parent, child, ml)
        for k, v in keys.items():
            setattr(cfg, k, v)
        for m, v in idx:
            m.layer_idx = v
        structure.put_back(model, records)
    return undo


def _prune_heads(att: Attention, config, mods, energy, grads, shrink, attrs, info) -> None:
    hd, n_q, n_kv = att.head_dim, att.n_q, att.n_kv
    mha = n_q == n_kv
    writers = [att.q, att.k, att.v] if mha else [att.q]
    dims = unit_scores(config.importance, mods, writers, [att.o], energy, grads)  # [n_q * hd]
    head = dims.reshape(n_q, hd).sum(1)
    per = n_q // n_kv  # query heads per key/value head
    if mha:
        keep = torch.sort(torch.topk(head, kept_count(n_q, config.heads)).indices).values
        new_kv = len(keep)
    else:
        k = kept_count(per, config.heads)
        top = torch.topk(head.reshape(n_kv, per), k, dim=1).indices  # [n_kv, k]
        keep = torch.sort((top + torch.arange(n_kv)[:, None] * per).reshape(-1)).values
        new_kv = n_kv
    d = _head_dims(keep, hd)
    for n in writers:
        shrink.setdefault(n, {})["out"] = d
    shrink.setdefault(att.o, {})["in"] = d
    a = mods[att.module]
    new = {name: len(keep) for name in HEAD_ATTRS if hasattr(a, name)}
    if hasattr(a, "all_head_size"):
        new["all_head_size"] = len(keep) * hd
    if hasattr(a, "num_key_value_heads"):
        new["num_key_value_heads"] = new_kv
    if hasattr(a, "num_key_value_groups"):
        new["num_key_value_groups"] = len(keep) // new_kv
    attrs[att.module] = new
    info["heads"] = (n_q, len(keep))
    info["kv_heads"] = new_kv


def block_influence(model, blocks, data) -> torch.Tensor:
    """1 - mean cosine similarity between each block's input and output hidden states, per block [B]."""
    sims = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)

    def hook(i):
        def f(_m, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            y = out[0] if isinstance(out, (tuple, list)) else out
            c = nn.functional.cosine_similarity(x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, y.shape[-1]))
            sims[i] += c.double().sum()
            counts[i] += c.numel()
        return f

    run_hooked(model, data, [b.register_forward_hook(hook(i), with_kwargs=True) for i, (_, b) in enumerate(blocks)])
    return 1 - sims / counts.clamp_min(1)


def _remove_blocks(model, blocks, n: int, data, cfg) -> tuple[int, int]:
    bi = block_influence(model, blocks, data)
    keep = sorted(torch.topk(bi, len(blocks) - n).indices.tolist())
    list_name = blocks[0][0].rpartition(".")[0]
    attrs = {}
    for new_i, old_i in enumerate(keep):
        for sub, m in blocks[old_i][1].named_modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                attrs[f"{list_name}.{new_i}" + (f".{sub}" if sub else "")] = {"layer_idx": new_i}
    new_cfg: dict[str, Any] = {"num_hidden_layers": len(keep)}
    if isinstance(getattr(cfg, "layer_types", None), list):
        new_cfg["layer_types"] = [cfg.layer_types[i] for i in keep]
    commit(model, {}, attrs, new_cfg, blocks={"list": list_name, "keep": keep, "size": len(blocks)})
    return len(blocks), len(keep)
