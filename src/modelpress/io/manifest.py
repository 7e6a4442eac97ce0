"""The manifest of a saved folder (`modelpress.json`) and reading the tensor file it describes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..formats.sparse import nnz
from ..quant import QuantMixin
from . import atomic, validate

FORMAT_VERSION = 1
MANIFEST = "modelpress.json"
TENSORS = "model.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def layer_manifest(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: {"type": type(m).__name__, "weights": str(m.weight_format),
                   "activations": None if m.act is None else str(m.act), "shape": list(m.weight_shape),
                   **({"smooth": True} if hasattr(m, "input_smooth") else {}),
                   **({"nnz": nnz(m.qweight)} if hasattr(m, "weight_mask") else {}),
                   **({"shapes": {n: list(s) for n, s in m.qshapes.items()}} if m.qnames != ("weight",) else {})}
            for name, m in model.named_modules() if isinstance(m, QuantMixin)}


def read_manifest(path: "str | os.PathLike") -> dict[str, Any]:
    """The manifest of the saved folder `path`, with its fields checked (see validate.check_manifest). Leftovers
    of an interrupted save of `path` are recovered first (io/atomic.py)."""
    if not str(path).strip():
        raise ValueError("no folder given (an empty path)")
    path = Path(path)
    atomic.recover(atomic.real(path))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist{atomic.missing_hint(atomic.real(path))}")
    if path.is_file():
        folder = "its folder" if path.name == MANIFEST else "the folder it was saved in"
        raise ValueError(f"{path} is a file; give {folder} (a modelpress folder holds {MANIFEST} and the tensors)")
    mf = path / MANIFEST
    if not mf.is_file():
        raise ValueError(f"{path} is not a modelpress folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # (also a number too long to convert)
        raise ValueError(f"{mf} is corrupt (not valid JSON: {e})") from None
    except RecursionError:
        raise ValueError(f"{mf} is corrupt (nested too deeply)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "modelpress":
        raise ValueError(f"{mf} is not a modelpress manifest")
    v = manifest.get("format_version")
    if validate._is_int(v) and v > FORMAT_VERSION:
        raise ValueError(f"{mf} has format version {v}; this modelpress reads up to {FORMAT_VERSION}: upgrade modelpress")
    validate.check_manifest(manifest, str(mf))
    return manifest


def checked_header(path: "str | os.PathLike", manifest: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """(tensor file, its safetensors header) after checking the file against the manifest: inside the folder,
    size, sha256 checksum, a sane header, and the tensors every layer's formats imply."""
    f = validate.tensor_path(Path(path), manifest)
    info = manifest["tensors"]
    if not f.is_file():
        raise ValueError(f"{f} is missing")
    size = f.stat().st_size
    if size != info["file_bytes"]:
        raise ValueError(f"{f} is truncated or was changed: {size} bytes, the manifest says {info['file_bytes']}")
    if _sha256(f) != info["sha256"]:
        raise ValueError(f"{f} is corrupt: its sha256 checksum does not match the manifest")
    header = validate.read_header(f)
    validate.check_tensors(manifest, header, f)
    return f, header


def read_tensors(path: "str | os.PathLike", manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor file, after checking it against the manifest (see checked_header)."""
    f, _ = checked_header(path, manifest)
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f} could not be read as safetensors: {e}") from None
    validate.check_values(manifest, tensors, f)
    return tensors
