"""What an allocation chooses among: the model's quantizable weights ("units") and the exact bytes of each
candidate format on each of them.

A unit is one stored weight: a layer, or a group of layers sharing a tied weight (embedding and lm_head), which
must get one format to stay stored once. Its bytes under a format are `expected_nbytes` of each quantized
matrix; everything else in the model (biases, norms, layers that stay float) keeps its bytes, so the model's
true bytes after applying a plan are `fixed_bytes + sum(unit bytes)` exactly (tested against `model_bytes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..config import QuantConfig
from ..formats import expected_nbytes, parse_format
from ..plan import plan_layers
from ..quant import QuantConv1d, QuantConv2d, QuantEmbedding, QuantEmbeddingBag

# candidate weight formats when the caller names none: 8 bits down to 2, group sizes that trade scale bytes
DEFAULT_FORMATS = ("int8", "int6:g64", "int5:g64", "int4:g32", "int4:g128", "int3:g32", "int3:g128", "int2:g32",
                   "int2:g128")


@dataclass(frozen=True)
class Unit:
    name: str  # the layer that quantizes the weight (the tie's leader)
    members: tuple[str, ...]  # every layer that uses the weight (the leader first)
    kind: str  # "linear" | "conv" | "embedding" | "multi" (attention / recurrent layers)
    shapes: dict[str, tuple[int, ...]] = field(hash=False)  # quantized matrix name -> shape (the format's view)
    float_bytes: int = 0  # bytes the float matrices take now (once for a tie)
    block: str | None = None  # the repeated block (encoder/decoder layer) holding it, if any

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def nbytes(self, fmt: str | None) -> int:
        """Stored bytes of the unit's weights in format `fmt` (None: float, as now)."""
        if fmt is None:
            return self.float_bytes
        return sum(expected_nbytes(fmt, s) for s in self.shapes.values())


def _kind(qcls: type) -> str:
    if issubclass(qcls, (QuantEmbedding, QuantEmbeddingBag)):
        return "embedding"
    if issubclass(qcls, (QuantConv1d, QuantConv2d)):
        return "conv"
    from ..quant import MULTI_WEIGHT

    return "multi" if issubclass(qcls, MULTI_WEIGHT) else "linear"


def find_units(model: nn.Module, include: Iterable[str] | None = None,
               exclude: Iterable[str] | None = None) -> list[Unit]:
    """The quantizable weights of `model` (those `quantize_` would quantize with these patterns), in order."""
    from ..calibrate import find_blocks

    plans = plan_layers(model, QuantConfig(weights="int8", include=include, exclude=exclude)).plans
    blocks = [n for n, _ in find_blocks(model)]
    followers: dict[str, list[str]] = {}
    for p in plans:
        if p.tied_to is not None:
            followers.setdefault(p.tied_to, []).append(p.name)
    units = []
    for p in plans:
        if p.tied_to is not None:
            continue
        weights = p.qcls.float_weights(p.module)  # the Linear view of a transformers Conv1D: [out, in]
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        fbytes = sum(w.numel() * w.element_size() for w in weights.values())
        block = next((b for b in blocks if p.name.startswith(b + ".")), None)
        units.append(Unit(p.name, (p.name, *followers.get(p.name, ())), _kind(p.qcls), shapes, fbytes, block))
    return units


def fits(unit: Unit, fmt: str) -> bool:
    """Whether `fmt` is worth offering for `unit`: it must store fewer bytes than the float weights."""
    return unit.nbytes(fmt) < unit.float_bytes


def options_for(unit: Unit, formats: Iterable[str]) -> list[str]:
    """The candidate formats of `unit` (deduplicated by their canonical spec), those smaller than float."""
    seen, out = set(), []
    for f in formats:
        spec = str(parse_format(f))
        if spec not in seen and fits(unit, spec):
            seen.add(spec)
            out.append(spec)
    return out


def model_fixed_bytes(model: nn.Module, units: list[Unit]) -> int:
    """Bytes of everything the units do not cover: model_bytes minus the units' float weights."""
    from ..evaluate import model_bytes

    return model_bytes(model) - sum(u.float_bytes for u in units)


def unit_weights(model: nn.Module, unit: Unit) -> dict[str, torch.Tensor]:
    """The unit's float weight tensors as the format sees them ([out, in] for a transformers Conv1D)."""
    from ..quant import quant_class
    from ..quant.conv1d_hf import QuantHFConv1D

    m = model.get_submodule(unit.name)
    qcls = quant_class(m)
    if qcls is not None and issubclass(qcls, QuantHFConv1D):
        return {"weight": m.weight.t()}
    return qcls.float_weights(m)
