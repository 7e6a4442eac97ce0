"""`save`: safetensors + manifest written into a temporary sibling folder and renamed into place, so no
half-written folder is ever left under the final name."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..recipe.structure import recorded
from .hf_folder import HF_TENSORS, check_tokenizer, is_hf_model, write_hf_files
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


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file; save needs a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")


def save(model: nn.Module, path: "str | os.PathLike", overwrite: bool = False,
         metadata: dict[str, Any] | None = None, tokenizer: Any = None) -> Path:
    """Write the (quantized) model to the folder `path`; refuses a non-empty folder unless overwrite=True.
    A Hugging Face model also gets its config.json, generation config and `tokenizer` (an object with
    save_pretrained, or a folder to copy tokenizer files from), so `load(path)` needs nothing else."""
    path = Path(path)
    _check_target(path, overwrite)
    hf = is_hf_model(model)
    check_tokenizer(tokenizer)
    if tokenizer is not None and not hf:
        raise ValueError("tokenizer= applies to Hugging Face (transformers) models only")
    tensors_file = HF_TENSORS if hf else TENSORS  # a HF folder: keeps from_pretrained off the packed codes
    tensors, aliases = _unique_state(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / tensors_file), metadata={"format": "pt", "producer": "modelpress"})
        hf_files = write_hf_files(model, tmp, tokenizer) if hf else []
        manifest = {
            "format": "modelpress", "format_version": FORMAT_VERSION,
            "model_class": type(model).__name__,
            "layers": layer_manifest(model), "aliases": aliases, "structure": recorded(model),
            "buffers": sorted(n for n, _ in model.named_buffers(remove_duplicate=False) if n in tensors),
            "tensors": {"file": tensors_file, "sha256": _sha256(tmp / tensors_file),
                        "file_bytes": (tmp / tensors_file).stat().st_size,
                        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())},
            "metadata": metadata or {},
            **({"hf_files": hf_files} if hf else {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for f in (tmp / tensors_file, tmp / MANIFEST):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _check_target(path, overwrite)  # again: something may have appeared meanwhile
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
