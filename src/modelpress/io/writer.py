"""`save`: safetensors + manifest written into a temporary sibling folder and renamed into place, so no
half-written folder is ever left under the final name (io/atomic.py: naming, recovery after a kill)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ..quant.qat import refuse_qat
from ..recipe.structure import recorded
from . import atomic, validate
from .hf_folder import HF_TENSORS, check_tokenizer, config_digest, is_hf_model, write_hf_files
from .manifest import FORMAT_VERSION, MANIFEST, TENSORS, _sha256, layer_manifest


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without aliases (tied weights), plus alias -> kept-name."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().clone() if not t.is_contiguous() else t.detach()
    return tensors, aliases


def _named_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    from ..quant.nnac import kept_out  # NNAC routers outside a container's children: buffers all the same

    return [*model.named_buffers(remove_duplicate=False),
            *((f"{name}.{n}", b) for name, r in kept_out(model) for n, b in r.named_buffers())]


def _buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """Floating buffers no file holds (rotary tables), every name a shared one has, and their dtype."""
    saved = set(model.state_dict())
    out = {}
    for n, b in model.named_buffers(remove_duplicate=False):
        name = str(b.dtype).removeprefix("torch.")
        if n not in saved and b.is_floating_point() and name in validate.FLOAT_DTYPES:
            out[n] = name
    return out


def _check_target(path: Path, overwrite: bool) -> str:
    return atomic.plan(path, overwrite)


def check_target(path: "str | os.PathLike", overwrite: bool = False) -> Path:
    """The folder `save` would write (symlinks resolved), after the checks `save` makes before writing:
    raises now, before any long work, when it could not or must not be written."""
    path = atomic.real(path)
    atomic.recover(path)
    _check_target(path, overwrite)
    return path


def _write_files(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str], tmp: Path,
                 metadata: dict[str, Any] | None, tensors_file: str = TENSORS,
                 hf_files: Callable[[], list[str]] | None = None,
                 extra: Callable[[Path], list[str]] | None = None) -> list[str]:
    """Write the tensor file, the Hugging Face files (`hf_files()` writes them into `tmp`), the caller's files
    (`extra(tmp)`) and the manifest into `tmp`, each synced; returns the files written, the manifest last."""
    manifest = {
        "format": "modelpress", "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "layers": layer_manifest(model), "aliases": aliases, "structure": recorded(model),
        "buffers": sorted(n for n, _ in _named_buffers(model) if n in tensors),
        # buffers no file holds (rotary tables): their dtype, which a model rebuilt from its config may not have
        # (transformers keeps them fp32; .to(torch.bfloat16) after loading had rounded them)
        "buffer_dtypes": _buffer_dtypes(model),
        "metadata": metadata or {},
    }
    stored = json.dumps(validate.records(manifest), sort_keys=True)  # covered by the file's checksum
    try:
        save_file(tensors, str(tmp / tensors_file), metadata={"format": "pt", "producer": "modelpress",
                                                              validate.META_KEY: stored})
    except SafetensorError as e:  # e.g. no space left on the device
        raise OSError(f"cannot write {tmp / tensors_file}: {e}") from None
    hf = hf_files() if hf_files is not None else []
    added = list(extra(tmp)) if extra is not None else []
    manifest["tensors"] = {"file": tensors_file, "sha256": _sha256(tmp / tensors_file),
                           "file_bytes": (tmp / tensors_file).stat().st_size,
                           "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    if hf_files is not None:
        manifest["hf_files"] = hf
        manifest["hf_config_sha256"] = config_digest(tmp / "config.json")  # load builds the model from it: hf_folder
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for f in (tmp / tensors_file, *(tmp / a for a in added), tmp / MANIFEST):
        atomic.usual_mode(f)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return [tensors_file, *hf, *added, MANIFEST]


def save(model: nn.Module, path: "str | os.PathLike", overwrite: bool = False,
         metadata: dict[str, Any] | None = None, tokenizer: Any = None,
         extra: Callable[[Path], list[str]] | None = None) -> Path:
    """Write the (quantized) model to the folder `path`; refuses a non-empty folder unless overwrite=True.
    A Hugging Face model also gets its config.json, generation config and `tokenizer` (an object with
    save_pretrained, or a folder to copy tokenizer files from), so `load(path)` needs nothing else.
    `extra(folder)` may write more files (a report) into the folder being built, returning their names: they
    arrive with the model in the same atomic step.

    Atomic: `path` is the old or the new complete folder at every moment (see io/atomic.py); a symlinked
    `path` keeps its link and its target is written; leftovers of killed saves are cleaned first."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save needs an nn.Module, got {type(model).__name__}")
    refuse_qat(model, "save")
    path = atomic.real(path)
    atomic.recover(path)
    how = _check_target(path, overwrite)
    meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise ValueError(f"tensor {meta[0]!r} is on the meta device (it holds no data): nothing to save")
    hf = is_hf_model(model)
    check_tokenizer(tokenizer)
    if tokenizer is not None and not hf:
        raise ValueError("tokenizer= applies to Hugging Face (transformers) models only")
    tensors_file = HF_TENSORS if hf else TENSORS  # a HF folder: keeps from_pretrained off the packed codes
    tensors, aliases = _unique_state(model)
    hf_files = (lambda: write_hf_files(model, tmp, tokenizer)) if hf else None
    if how == "inplace":  # an empty folder under a read-only parent: the manifest, moved in last, commits
        tmp = atomic.new_dir(path, atomic.INPLACE_TMP)
        try:
            for f in _write_files(model, tensors, aliases, tmp, metadata, tensors_file, hf_files, extra):
                os.replace(tmp / f, path / f)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        atomic.fsync_dir(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.new_dir(path.parent, f".{path.name}.tmp-")
    try:
        _write_files(model, tensors, aliases, tmp, metadata, tensors_file, hf_files, extra)
        _check_target(path, overwrite)  # again: something may have appeared meanwhile
        if path.exists():
            old = atomic.new_dir(path.parent, f".{path.name}.old-")
            os.replace(path, old / "x")
            os.replace(tmp, path)
            atomic.fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            atomic.fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
