"""Structural changes (BatchNorm folding, and pruning that removes channels) recorded on the model, so that
`save` can write them to the manifest and `load` can replay them on a fresh float model before filling it.

A record is `{"kind": ..., "options": {...}}` appended to `model._modelpress_structure` by the verb that
made the change; `replay` maps each kind to a function `replay(model, options)` named here (imported on use).
Replay functions only rebuild the structure: the saved tensors then fill in the values.
"""
from __future__ import annotations

import copy
import importlib
from typing import Any

from torch import nn

ATTR = "_modelpress_structure"

# kind -> "module:function" with signature function(model, options) -> None
REPLAY: dict[str, str] = {
    "fold_bn": "modelpress.algorithms.fold_bn:replay",
    "prune_structured": "modelpress.transforms.prune.surgery:replay",
    "fuse": "modelpress.transforms.fuse:replay",
    "factorize": "modelpress.transforms.factorize:replay",
    "butterfly": "modelpress.transforms.butterfly:replay",
    "product_quantize": "modelpress.transforms.product_quantize:replay",
    "nnac": "modelpress.quant.nnac:replay",
}


def record(model: nn.Module, kind: str, options: dict[str, Any] | None = None) -> None:
    """Note on `model` that the structural change `kind` was applied (with what `replay` needs), and note its new
    weight bytes on its quantized layers (kernels.note_model): every structural transform records through here."""
    if kind not in REPLAY:
        raise KeyError(f"structural change {kind!r} has no replay function in modelpress.recipe.structure.REPLAY")
    entries = model.__dict__.setdefault(ATTR, [])
    entries.append({"kind": kind, "options": copy.deepcopy(options or {})})
    from ..quant.kernels import note_model  # (here: quant imports this module)

    note_model(model)  # the weight bytes the speed guard times a quantized layer against have changed


def recorded(model: nn.Module) -> list[dict[str, Any]]:
    """The structural changes applied to `model`, in order (a copy)."""
    return copy.deepcopy(model.__dict__.get(ATTR, []))


def saved(model: nn.Module) -> list[dict[str, Any]] | None:
    """The records as they are now (a copy; None: none yet), for `put_back` when a transform fails after recording."""
    return copy.deepcopy(model.__dict__.get(ATTR))


def put_back(model: nn.Module, records: list[dict[str, Any]] | None) -> None:
    """Restore the records `saved` returned (a failed transform undoes its own record)."""
    if records is None:
        model.__dict__.pop(ATTR, None)
    else:
        model.__dict__[ATTR] = records


def replay(model: nn.Module, entries: list[dict[str, Any]]) -> None:
    """Re-apply recorded structural changes to a fresh float model (as `load` does)."""
    if not isinstance(entries, list):
        raise ValueError("the manifest's 'structure' must be a list of {kind, options} records")
    done = model.__dict__.get(ATTR, [])
    if done:
        if done == entries[:len(done)]:  # the model was already transformed that far: replay the rest
            entries = entries[len(done):]
        else:
            raise ValueError(f"the model already had structural changes {[e['kind'] for e in done]} that differ "
                             f"from the saved ones {[e.get('kind') for e in entries]}: pass the float model")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or e.get("kind") not in REPLAY or not isinstance(e.get("options", {}), dict):
            raise ValueError(f"structure record {i + 1} in the manifest is not valid: {e!r}")
        mod, _, fn = REPLAY[e["kind"]].partition(":")
        getattr(importlib.import_module(mod), fn)(model, e.get("options", {}))
        record(model, e["kind"], e.get("options", {}))
