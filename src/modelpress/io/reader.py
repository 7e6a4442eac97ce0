"""`load`: rebuild a saved quantized model on its float architecture. Nothing is unpickled or executed."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant import QUANT_MODULES, QuantConv1d, QuantConv2d, QuantLinear, QuantMixin, quant_class
from ..quant.base import share_state
from ..quant.kernels import note_model
from ..select import set_submodule
from ..recipe.structure import replay
from ..hf import mark_quantized
from .hf_folder import model_for_saved
from .manifest import read_manifest, read_tensors
from .validate import FLOAT_DTYPES

FLOAT_TYPES = {q.__name__: f for f, q in QUANT_MODULES.items()}


def _float_model(model_or_folder: Any) -> nn.Module:
    if isinstance(model_or_folder, nn.Module):
        return model_or_folder
    if not isinstance(model_or_folder, (str, os.PathLike)):
        raise TypeError(f"load needs the float model (an nn.Module) or a Hugging Face folder, got "
                        f"{type(model_or_folder).__name__}")
    folder = Path(model_or_folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is neither an nn.Module nor a Hugging Face folder with a config.json")
    from ..hf import model_from_config

    return model_from_config(folder)


def _check_float(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            raise ValueError(f"the model given to load is already quantized (layer {name or '(root)'!r} is "
                             f"{type(m).__name__}): pass the float architecture (a fresh model or its Hugging Face "
                             "folder)")
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise ValueError(f"the model given to load has tensor {name!r} on the meta device (no data); build it "
                             "with real tensors (e.g. model.to_empty(device='cpu')) before loading")


def _replay(model: nn.Module, structure: list) -> None:
    try:
        replay(model, structure)
    except (TypeError, KeyError, AttributeError, IndexError) as e:  # a record the manifest check cannot judge
        raise ValueError(f"the manifest's structure records cannot be replayed on this model: {e}") from None


def load(path: "str | os.PathLike", model: Any = None) -> nn.Module:
    """Rebuild the quantized model saved at `path` on the float architecture `model` (an nn.Module, modified
    in place, or a local Hugging Face folder; optional when `path` holds a config.json, as Hugging Face models
    saved by modelpress do). Outputs are bit-identical to the saved model's. The folder is checked first
    (io/validate.py); a failed load leaves `model` as it was."""
    manifest = read_manifest(path)
    tensors = read_tensors(path, manifest)
    same = isinstance(model, (str, os.PathLike)) and Path(model).resolve() == Path(path).resolve()
    model = model_for_saved(path, manifest) if model is None or same else _float_model(model)
    _check_float(model)
    structure = manifest.get("structure") or []
    if structure:  # structural changes (BN folding, pruning) are replayed on a copy: a failure leaves the model
        work = copy.deepcopy(model)
        _replay(work, structure)
        _swap_and_fill(work, manifest, tensors, {})
        model.__dict__.clear()
        model.__dict__.update(work.__dict__)  # the caller's object becomes the loaded model
        mark_quantized(model)
        note_model(model)
        return model.eval()
    originals: dict[str, nn.Module] = {}
    try:
        _swap_and_fill(model, manifest, tensors, originals)
    except BaseException:
        for name, m in reversed(list(originals.items())):  # a failed load leaves the model as it was
            set_submodule(model, name, m)
        raise
    mark_quantized(model)  # transformers' save_pretrained now refuses it with a clear error
    note_model(model)  # the speed guard times each layer as this model's weights reach it
    return model.eval()


def _swap_and_fill(model: nn.Module, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                   originals: dict[str, nn.Module]) -> None:
    for alias, kept in manifest.get("aliases", {}).items():
        if kept in tensors:
            tensors[alias] = tensors[kept]
    for name, info in manifest["layers"].items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r} that the saved file quantized: wrong architecture?") from None
        qcls = quant_class(m)
        if qcls is None or qcls.__name__ != info["type"]:
            raise ValueError(f"layer {name!r} is {type(m).__name__} in the model but {info['type']} in the file")
        if list(qcls.qshape_of(m)) != info["shape"]:
            raise ValueError(f"layer {name!r} has weight shape {list(qcls.qshape_of(m))}, the file has {info['shape']}")
        originals[name] = m
        extra = {"smooth": True} if info.get("smooth") else {}
        qm = qcls.empty_like(m, info["weights"], info.get("activations"), **extra)
        if info.get("nnz") is not None:  # a pruned weight: bitmask + the kept codes only
            qm.make_sparse_(int(info["nnz"]))
        bias = tensors.get(f"{name}.bias")
        if bias is not None and isinstance(qm, (QuantLinear, QuantConv1d, QuantConv2d)) and qm.bias is None:
            # a bias the method added to a layer built without one (AdaRound's bias correction); validate.py
            # checked it is a float vector of the layer's outputs, covered by the file's checksum
            qm.bias = nn.Parameter(torch.empty_like(bias), requires_grad=False)
        set_submodule(model, name, qm)
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
    share_state(model, manifest.get("aliases", {}))  # tied weights: one tensor again, as when saved
    cast: dict[int, torch.Tensor] = {}  # one cast per tensor: a buffer shared by several modules stays shared
    for name, dt in manifest.get("buffer_dtypes", {}).items():  # buffers no file holds, in the dtype they were saved in
        owner, _, leaf = name.rpartition(".")
        try:
            m = model.get_submodule(owner)
        except AttributeError:
            continue  # (a buffer of a module the structure replay removed)
        b = m._buffers.get(leaf)
        if b is not None and b.is_floating_point() and b.dtype != FLOAT_DTYPES[dt]:
            m._buffers[leaf] = cast.setdefault(id(b), b.to(FLOAT_DTYPES[dt]))
