"""Which layers `quantize_` quantizes, with which formats, and how tied weights are handled.

Tied weights (one float parameter used by several modules, e.g. embedding <-> lm_head, T5's shared embeddings):
- every user selected, with one format and one layout: the weight is quantized once (by its first embedding user,
  else its first user) and all users share the same packed buffers; saved once, reloaded shared;
- some users not selected (excluded, or of a type that stays float): the whole group stays float, since
  quantizing part of it would keep the float weight *and* a quantized copy; the warning names them;
- users with different formats (mixed-precision overrides) or layouts: each user gets its own quantized copy,
  and the warning says the weight is now stored once per user.
A module registered under several names is one layer: quantized once and swapped under every name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .config import QuantConfig
from .formats import Format, parse_format
from .quant import MULTI_WEIGHT, QuantConv1d, QuantConv2d, QuantEmbedding, QuantEmbeddingBag, QuantHFConv1D, \
    QuantLinear, QuantMixin, quant_class
from .quant.activation import ActFormat, parse_activation
from .quant.conv1d_hf import linear_view
from .select import lookup, selected

_DIRECT_READERS = (nn.modules.linear.NonDynamicallyQuantizableLinear,)  # their owner reads .weight, never calls them


@dataclass(frozen=True)
class LayerPlan:
    name: str
    module: nn.Module  # what the algorithm quantizes: the model's layer, or a Linear view of a transformers Conv1D
    weights: Format
    activations: ActFormat | None
    qcls: type | None = None  # the quantized module type
    original: nn.Module | None = None  # the model's layer, when `module` stands in for it
    tied_to: str | None = None  # a tied weight's user that shares the packed weight of layer `tied_to`

    @property
    def layer(self) -> nn.Module:
        return self.original if self.original is not None else self.module

    @property
    def standin(self) -> bool:
        return self.original is not None

    @property
    def multi_weight(self) -> bool:
        """MultiheadAttention / LSTM / GRU / RNN: several matrices, quantized weight-only by round-to-nearest."""
        return self.qcls is not None and issubclass(self.qcls, MULTI_WEIGHT)


class Planned(NamedTuple):
    plans: list[LayerPlan]
    skipped: list[tuple[str, str]]  # selected layers with weights that stay float: (name, why)
    notes: list[str]  # what else the user should know (weight-only layers, untied weights)


def _weight_matrices(m: nn.Module) -> bool:
    return any(p is not None and p.dim() >= 2 for p in m._parameters.values())


def plan_layers(model: nn.Module, config: QuantConfig) -> Planned:
    """Which layers get which formats, which selected layers with weights stay float, and why."""
    plans, skipped, notes = [], [], []
    act = parse_activation(config.activations)
    for name, m in model.named_modules():
        if not name or not selected(name, config.include, config.exclude) or isinstance(m, QuantMixin):
            continue
        spec = lookup(name, config.overrides, config.weights)
        if spec is None and (act is None or (config.overrides and lookup(name, config.overrides, "unset") is None)):
            continue  # nothing asked of this layer, or kept float on purpose by an override
        qcls = quant_class(m)
        if qcls is None:
            if _weight_matrices(m):
                why = "computes its own weight" if hasattr(type(m), "weight") else "is not a supported layer type"
                skipped.append((name, f"{type(m).__name__} {why}"))
            continue
        if spec is None:
            skipped.append((name, "activation-only quantization needs a weight format"))
            continue
        weights = qcls.float_weights(m)
        bad = [n for n, w in weights.items() if not torch.is_floating_point(w)]
        if bad:
            skipped.append((name, f"weight dtype {weights[bad[0]].dtype} is not floating point"))
            continue
        if getattr(m, "max_norm", None) is not None:
            skipped.append((name, "embeddings with max_norm are not supported"))
            continue
        layer_act = act if issubclass(qcls, (QuantLinear, QuantConv1d, QuantConv2d)) else None
        if act is not None and (layer_act is None or isinstance(m, _DIRECT_READERS)) and \
                not issubclass(qcls, (QuantEmbedding, QuantEmbeddingBag)):
            layer_act = None
            notes.append(f"{name} is quantized weight-only ({type(m).__name__}: its activations are not seen)")
        if issubclass(qcls, QuantHFConv1D):
            plans.append(LayerPlan(name, linear_view(m), parse_format(spec), layer_act, qcls, m))
        else:
            plans.append(LayerPlan(name, m, parse_format(spec), layer_act, qcls))
    plans = _tie(model, plans, skipped, notes)
    return Planned(plans, skipped, notes)


def _tie(model: nn.Module, plans: list[LayerPlan], skipped: list, notes: list) -> list[LayerPlan]:
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                users.setdefault(id(p), []).append((name, m))
    groups: dict[int, list[LayerPlan]] = {}
    out = []
    for p in plans:
        ws = p.qcls.float_weights(p.layer)
        shared = [n for n, w in ws.items() if len(users.get(id(w), ())) > 1]
        if shared and p.multi_weight:
            skipped.append((p.name, f"its {shared[0]} is shared with another module (tied)"))
        elif shared:
            groups.setdefault(id(ws["weight"]), []).append(p)
        else:
            out.append(p)
    for key, group in groups.items():
        names = [n for n, _ in users[key]]
        planned = {id(p.layer) for p in group}
        missing = [n for n, m in users[key] if id(m) not in planned]
        if missing:
            for p in group:
                skipped.append((p.name, f"its weight is tied to {', '.join(missing)}, which stay(s) float "
                                        "(quantizing only some users would keep the float weight and a quantized copy)"))
            continue
        formats = {str(p.weights) for p in group}
        shapes = {p.qcls.qshape_of(p.layer) for p in group}
        if len(formats) > 1 or len(shapes) > 1:
            why = f"formats {', '.join(sorted(formats))}" if len(formats) > 1 else "layouts differ"
            notes.append(f"the tied weight of {', '.join(names)} is quantized once per user ({why}): "
                         f"stored {len(group)} times")
            out.extend(group)
            continue
        leader = next((p for p in group if issubclass(p.qcls, (QuantEmbedding, QuantEmbeddingBag))), group[0])
        out.append(leader)
        out.extend(LayerPlan(p.name, p.module, p.weights, p.activations, p.qcls, p.original, leader.name)
                   for p in group if p is not leader)
    order = {p.name: i for i, p in enumerate(plans)}
    return sorted(out, key=lambda p: order[p.name])
