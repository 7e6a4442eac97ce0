"""The `prune_` verb: remove individual weights (a sparsity ratio, or an N:M pattern such as 2:4) from the selected
Linear / Conv layers, in place, and store what is left sparsely: a bitmask plus the kept values
(formats/sparse.py), so memory and disk bytes fall with sparsity. A pruned float layer becomes a `QuantLinear` /
`QuantConv*d` of the raw format of its dtype (`fp32`, `bf16`, `fp16`) with a mask; `quantize_` later keeps its
pruned weights at exactly zero (GPTQ compensates for them), `dequantize` gives back a plain float layer.

How weights are chosen is the method's business (modelpress.algorithms): `magnitude` (|W|, no data), `wanda`
(|W| times the input column norm, per output row) and `sparsegpt` (OBS updates through the layer Hessian, the
calibration runner GPTQ uses).
"""
from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .formats import parse_format, quantize_tensor
from .formats.sparse import parse_pattern, sparsify, unpack_mask
from .quant import QuantConv1d, QuantConv2d, QuantLinear, QuantMixin, quant_class
from .quant.base import check_float_weight
from .quant.conv1d_hf import is_conv1d, linear_view
from .quant.kernels import note_model
from .recipe.options import build
from .select import check_patterns, lookup, selected, set_submodule

# method name -> module in modelpress.algorithms (imported on first use)
PRUNE_METHODS: dict[str, str] = {"magnitude": "magnitude", "wanda": "wanda", "sparsegpt": "sparsegpt"}
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)  # (tables: not pruned, nothing to say)
RAW_FORMAT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _tuple(v):
    return None if v is None else ((v,) if isinstance(v, str) else tuple(v))


def parse_target(value: Any) -> tuple[float | None, tuple[int, int] | None]:
    """A layer's target: a sparsity in [0, 1) or an "N:M" pattern -> (sparsity, None) or (None, (N, M))."""
    if isinstance(value, str):
        return None, parse_pattern(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"a pruning target is a sparsity in [0, 1) or an 'N:M' pattern, got {value!r}")
    return float(value), None


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how much.

    sparsity: the fraction of weights removed in every selected layer; or pattern: "N:M" (N weights kept in
    every M consecutive input weights: "2:4", "4:8"). method: magnitude | wanda | sparsegpt, with
    method_options (sparsegpt: damp, block_size). include / exclude: layer-name patterns (modelpress.select).
    overrides: pattern -> sparsity, "N:M" or None (left dense) per layer; the first matching pattern wins. A
    sparsity of 0 leaves a layer dense too (it is not stored sparse: a bitmask of all ones only adds bytes).
    """

    sparsity: float | None = None
    pattern: str | None = None
    method: str = "magnitude"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    overrides: Mapping[str, float | str | None] | None = None
    method_options: Mapping[str, Any] | None = None

    def __post_init__(self):
        object.__setattr__(self, "include", _tuple(self.include))
        object.__setattr__(self, "exclude", _tuple(self.exclude))
        if self.sparsity is not None and self.pattern is not None:
            raise ValueError("give either sparsity (unstructured) or pattern (N:M), not both")
        if not self.sparsity and self.pattern is None and not any((self.overrides or {}).values()):
            raise ValueError("PruneConfig prunes nothing (a sparsity of 0 removes no weight): give sparsity=0.5 or "
                             "pattern='2:4'")
        if self.sparsity is not None:
            parse_target(self.sparsity)
        if self.pattern is not None:
            parse_pattern(self.pattern)
        for v in (self.overrides or {}).values():
            if v is not None:
                parse_target(v)
        check_patterns(self.include)
        check_patterns(self.exclude)
        check_patterns((self.overrides or {}).keys())
        self.method_config()

    def target(self, name: str) -> Any:
        default = self.sparsity if self.sparsity is not None else self.pattern
        return lookup(name, self.overrides, default)

    def method_config(self):
        module = get_prune_method(self.method)
        return build(module.Config, self.method_options, f"pruning method {self.method!r}")


def get_prune_method(name: str):
    if name not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(PRUNE_METHODS)}")
    return importlib.import_module(f"modelpress.algorithms.{PRUNE_METHODS[name]}")


@dataclass(frozen=True)
class PrunePlan:
    name: str
    module: nn.Module  # a float Linear / Conv in the model while the method runs
    sparsity: float | None
    nm: tuple[int, int] | None
    keep: torch.Tensor | None = None  # bool [weight shape]: what an earlier pruning kept (already sparse layers)


@dataclass(frozen=True)
class PruneContext:
    """What `prune_` hands a method's `apply`: commit(plan, weight, keep) stores a layer sparsely; progress."""

    commit: Callable[[PrunePlan, torch.Tensor, torch.Tensor], nn.Module]
    progress: Callable[[str, int, int], None] | None = None


def holds_weight_matrix(m: nn.Module) -> bool:
    """`m` has a weight matrix of its own (a `*weight*` parameter of 2 or more dimensions), not an embedding table:
    a layer a pruning verb should name when it cannot prune it."""
    return not isinstance(m, EMBEDDINGS) and any(p.dim() >= 2 and "weight" in n
                                                 for n, p in m.named_parameters(recurse=False))


def float_of(m: nn.Module) -> tuple[nn.Module, torch.Tensor | None] | None:
    """(float module, kept-values mask or None) of a prunable layer; None for layers that cannot be pruned
    (quantized ones: prune before quantizing). transformers' Conv1D (GPT-2) is pruned as the Linear it is
    (its linear_view: rows are outputs, N:M groups along the inputs) and stored back as a Conv1D."""
    if type(m) in PRUNABLE:
        return m, None
    if is_conv1d(m):
        return linear_view(m), None
    if isinstance(m, (QuantLinear, QuantConv1d, QuantConv2d)) and m.weight_format.kind == "raw":
        keep = unpack_mask(m.weight_mask, m.weight_shape) if "weight_mask" in m._buffers else None
        f = m.to_float()
        return (linear_view(f) if is_conv1d(f) else f), keep
    return None


def plan_pruning(model: nn.Module, config: PruneConfig) -> tuple[list[PrunePlan], list[tuple[str, str]]]:
    """The layers to prune with their targets, and the selected layers that stay as they are (name, reason)."""
    plans, skipped = [], []
    users: dict[int, dict[int, str]] = {}  # a parameter -> the module objects holding it (tied weights) -> a name
    for name, m in model.named_modules():  # (one object registered under two names is one user: it stays shared)
        for p in m.parameters(recurse=False):
            users.setdefault(id(p), {})[id(m)] = name
    for name, m in model.named_modules():
        if not name or not selected(name, config.include, config.exclude):
            continue
        target = config.target(name)
        if target is None or (not isinstance(target, str) and target == 0):
            continue
        fm = float_of(m)
        if fm is None:
            if isinstance(m, QuantMixin):
                skipped.append((name, "already quantized: prune before quantizing"))
            elif holds_weight_matrix(m):
                skipped.append((name, f"{type(m).__name__} is not a layer prune_ handles (Linear, Conv1d, Conv2d, "
                                      "transformers' Conv1D)"))
            continue
        f, keep = fm
        if type(f) not in PRUNABLE:  # e.g. an embedding stored as bf16
            continue
        tied = [u for k, u in users.get(id(getattr(m, "weight", None)), {}).items() if k != id(m)]
        if tied:
            skipped.append((name, f"its weight is tied to {tied[0]}'s: pruning would store it twice"))
            continue
        sparsity, nm = parse_target(target)
        cols = math.prod(f.weight.shape[1:])
        if nm is not None and cols % nm[1]:
            skipped.append((name, f"{cols} input weights per output are not a multiple of {nm[1]}"))
            continue
        if not torch.is_floating_point(f.weight) or f.weight.dtype not in RAW_FORMAT:
            skipped.append((name, f"weight dtype {f.weight.dtype} is not float32/16"))
            continue
        plans.append(PrunePlan(name, f, sparsity, nm, keep))
    return plans, skipped


def sparse_module(m: nn.Module, weight: torch.Tensor, keep: torch.Tensor) -> nn.Module:
    """The sparse storage module of the float layer m pruned to `weight` where `keep` (bool, weight shape) is
    True: the raw values of the kept weights (m's dtype) plus the bitmask; pruned weights are exactly zero."""
    shape = m.weight.shape
    keep = keep.reshape(shape).bool()
    w = torch.where(keep, weight.detach().reshape(shape).to(m.weight.dtype), 0)
    fmt = parse_format(RAW_FORMAT[m.weight.dtype])
    q = sparsify(quantize_tensor(w, fmt), keep)
    return quant_class(getattr(m, "_conv1d", m)).from_float(m, fmt, None, qweight=q).train(m.training)


def prune_(model: nn.Module, config: "PruneConfig | float | str", calib: Iterable[Any] | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> nn.Module:
    """Prune the selected Linear/Conv layers of `model` in place and return it.

    config: a PruneConfig, a sparsity (0.5) or an N:M pattern ("2:4") for magnitude pruning. calib: model
    inputs for the data-driven methods (wanda, sparsegpt). A failure leaves the model as it was."""
    if isinstance(config, (float, int, str)) and not isinstance(config, bool):
        config = PruneConfig(sparsity=config) if not isinstance(config, str) else PruneConfig(pattern=config)
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, a sparsity or an 'N:M' pattern, got {type(config).__name__}")
    method = get_prune_method(config.method)
    method_config = config.method_config()
    plans, skipped = plan_pruning(model, config)
    if getattr(method_config, "needs_calib", False) and plans:
        if calib is None:
            raise ValueError(f"pruning method {config.method!r} needs calibration data (calib=...)")
        from .calibrate import as_batches, dry_run

        calib = as_batches(calib)
        dry_run(model, calib[0])  # a wrong input fails in a second, before any work
    for p in plans:
        check_float_weight(p.name, p.module.weight, "prune")
    before = {p.name: model.get_submodule(p.name) for p in plans}
    committed: set[str] = set()

    def commit(p: PrunePlan, weight: torch.Tensor, keep: torch.Tensor) -> nn.Module:
        keep = keep.reshape(p.module.weight.shape).bool()
        qm = sparse_module(p.module, weight, keep if p.keep is None else keep & p.keep)
        set_submodule(model, p.name, qm)
        committed.add(p.name)
        if progress:
            progress("prune", len(committed), len(plans))
        return qm

    try:
        for p in plans:  # layers pruned before (sparse storage) take part as float layers
            set_submodule(model, p.name, p.module)
        method.apply(model, plans, calib, method_config, PruneContext(commit, progress))
        missing = [p.name for p in plans if p.name not in committed]
        if missing:
            raise RuntimeError(f"pruning method {config.method!r} left layers unpruned: {missing[:5]}")
    except BaseException:
        for name, m in before.items():
            set_submodule(model, name, m)
        raise
    note_model(model)
    if skipped:
        listed = "; ".join(f"{n} ({why})" for n, why in skipped)
        warnings.warn(f"{len(skipped)} layer(s) not pruned: {listed}", stacklevel=2)
    if not plans and not skipped:
        warnings.warn("prune_ selected no layer to prune (check include/exclude patterns)", stacklevel=2)
    return model


def sparsity_summary(model: nn.Module) -> dict[str, Any]:
    """Pruned layers of `model`: their count, weights, kept weights and overall sparsity."""
    from .formats.sparse import nnz

    layers = total = kept = 0
    for m in model.modules():
        if isinstance(m, QuantMixin) and hasattr(m, "weight_mask"):
            layers += 1
            total += math.prod(m.weight_shape)
            kept += nnz(m.qweight)
    return {"sparse_layers": layers, "weights": total, "kept": kept,
            "sparsity": 1.0 - kept / total if total else 0.0}
