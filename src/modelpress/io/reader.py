"""`load`: rebuild a saved quantized model on its float architecture. Nothing is unpickled or executed."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant import QUANT_MODULES, QUANT_TYPES
from ..select import set_submodule
from ..recipe.structure import replay
from .manifest import read_manifest, read_tensors

FLOAT_TYPES = {q.__name__: f for f, q in QUANT_MODULES.items()}


def _float_model(model_or_folder: Any) -> nn.Module:
    if isinstance(model_or_folder, nn.Module):
        return model_or_folder
    folder = Path(model_or_folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is neither an nn.Module nor a Hugging Face folder with a config.json")
    from ..hf import model_from_config

    return model_from_config(folder)


def load(path: "str | os.PathLike", model: Any) -> nn.Module:
    """Rebuild the quantized model saved at `path` on the float architecture `model` (an nn.Module, modified
    in place, or a local Hugging Face folder). Outputs are bit-identical to the saved model's."""
    manifest = read_manifest(path)
    tensors = read_tensors(path, manifest)
    model = _float_model(model)
    structure = manifest.get("structure") or []
    if structure:  # structural changes (BN folding, pruning) are replayed on a copy: a failure leaves the model
        work = copy.deepcopy(model)
        replay(work, structure)
        _swap_and_fill(work, manifest, tensors, {})
        model.__dict__.clear()
        model.__dict__.update(work.__dict__)  # the caller's object becomes the loaded model
        return model.eval()
    originals: dict[str, nn.Module] = {}
    try:
        _swap_and_fill(model, manifest, tensors, originals)
    except BaseException:
        for name, m in reversed(list(originals.items())):  # a failed load leaves the model as it was
            set_submodule(model, name, m)
        raise
    return model.eval()


def _swap_and_fill(model: nn.Module, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                   originals: dict[str, nn.Module]) -> None:
    for name, info in manifest["layers"].items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r} that the saved file quantized: wrong architecture?") from None
        qcls, ftype = QUANT_TYPES.get(info["type"]), FLOAT_TYPES.get(info["type"])
        if qcls is None or type(m) is not ftype:
            raise ValueError(f"layer {name!r} is {type(m).__name__} in the model but {info['type']} in the file")
        if list(m.weight.shape) != info["shape"]:
            raise ValueError(f"layer {name!r} has weight shape {list(m.weight.shape)}, the file has {info['shape']}")
        originals[name] = m
        extra = {"smooth": True} if info.get("smooth") else {}
        qm = qcls.empty_like(m, info["weights"], info["activations"], **extra)
        if info.get("nnz") is not None:  # a pruned weight: bitmask + the kept codes only
            qm.make_sparse_(int(info["nnz"]))
        set_submodule(model, name, qm)
    for alias, kept in manifest.get("aliases", {}).items():
        if kept in tensors:
            tensors[alias] = tensors[kept]
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the saved tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                         f"{' (and more)' if len(missing) > 5 or len(unexpected) > 5 else ''}")
    for k, t in expected.items():
        if t.shape != tensors[k].shape or t.dtype != tensors[k].dtype:
            raise ValueError(f"tensor {k!r}: the model expects {t.dtype} {tuple(t.shape)}, the file has "
                             f"{tensors[k].dtype} {tuple(tensors[k].shape)}")
    model.load_state_dict(tensors, strict=True)
