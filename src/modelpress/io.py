"""Save, load and dequantize: safetensors + a JSON manifest. Nothing is ever unpickled or executed.

A saved folder holds `model.safetensors` (every tensor of the state dict: packed codes, scales, float
parameters) and `modelpress.json` (format version, per-layer formats, sha256 and byte size of the tensor file).
`save` writes into a temporary sibling folder and renames it into place, so no half-written folder is ever
left under the final name.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .quant import QUANT_MODULES, QUANT_TYPES, QuantMixin
from .select import set_submodule

FORMAT_VERSION = 1
MANIFEST = "modelpress.json"
TENSORS = "model.safetensors"
FLOAT_TYPES = {q.__name__: f for f, q in QUANT_MODULES.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def layer_manifest(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: {"type": type(m).__name__, "weights": str(m.weight_format),
                   "activations": None if m.act is None else str(m.act), "shape": list(m.weight_shape),
                   **({"smooth": True} if hasattr(m, "input_smooth") else {})}
            for name, m in model.named_modules() if isinstance(m, QuantMixin)}


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
         metadata: dict[str, Any] | None = None) -> Path:
    """Write the (quantized) model to the folder `path`; refuses a non-empty folder unless overwrite=True."""
    path = Path(path)
    _check_target(path, overwrite)
    tensors, aliases = _unique_state(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt", "producer": "modelpress"})
        manifest = {
            "format": "modelpress", "format_version": FORMAT_VERSION,
            "model_class": type(model).__name__,
            "layers": layer_manifest(model), "aliases": aliases,
            "buffers": sorted(n for n, _ in model.named_buffers(remove_duplicate=False) if n in tensors),
            "tensors": {"file": TENSORS, "sha256": _sha256(tmp / TENSORS), "file_bytes": (tmp / TENSORS).stat().st_size,
                        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())},
            "metadata": metadata or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for f in (tmp / TENSORS, tmp / MANIFEST):
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


def read_manifest(path: "str | os.PathLike") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    mf = path / MANIFEST
    if not mf.is_file():
        raise ValueError(f"{path} is not a modelpress folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mf} is corrupt (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "modelpress":
        raise ValueError(f"{mf} is not a modelpress manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{mf} has format version {manifest.get('format_version')}; this modelpress reads up to "
                         f"{FORMAT_VERSION}: upgrade modelpress")
    return manifest


def read_tensors(path: "str | os.PathLike", manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor file, after checking its size and checksum against the manifest."""
    info = manifest["tensors"]
    f = Path(path) / info["file"]
    if not f.is_file():
        raise ValueError(f"{f} is missing")
    size = f.stat().st_size
    if size != info["file_bytes"]:
        raise ValueError(f"{f} is truncated or was changed: {size} bytes, the manifest says {info['file_bytes']}")
    if _sha256(f) != info["sha256"]:
        raise ValueError(f"{f} is corrupt: its sha256 checksum does not match the manifest")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f} could not be read as safetensors: {e}") from None


def _float_model(model_or_folder: Any) -> nn.Module:
    if isinstance(model_or_folder, nn.Module):
        return model_or_folder
    folder = Path(model_or_folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is neither an nn.Module nor a Hugging Face folder with a config.json")
    from .hf import model_from_config

    return model_from_config(folder)


def load(path: "str | os.PathLike", model: Any) -> nn.Module:
    """Rebuild the quantized model saved at `path` on the float architecture `model` (an nn.Module, modified
    in place, or a local Hugging Face folder). Outputs are bit-identical to the saved model's."""
    manifest = read_manifest(path)
    tensors = read_tensors(path, manifest)
    model = _float_model(model)
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
        set_submodule(model, name, qcls.empty_like(m, info["weights"], info["activations"], **extra))
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


def _float_module(m: QuantMixin) -> nn.Module:
    ftype = FLOAT_TYPES[type(m).__name__]
    w = m.dequantized_weight(torch.float32)
    if hasattr(m, "input_smooth"):  # y = (x / s) (W s)^T = x W^T
        w = w / m.input_smooth.reshape(1, -1)
    if ftype is nn.Linear:
        f = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    elif ftype in (nn.Conv1d, nn.Conv2d):
        f = ftype(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                  dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    elif ftype is nn.Embedding:
        f = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
    else:
        f = nn.EmbeddingBag(m.num_embeddings, m.embedding_dim, mode=m.mode, padding_idx=m.padding_idx,
                            include_last_offset=m.include_last_offset)
    with torch.no_grad():
        f.weight.copy_(w)
        if getattr(m, "bias", None) is not None:
            f.bias.copy_(m.bias)
    return f.train(m.training)


def dequantize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain float nn.Module (no modelpress modules) with the dequantized weights. Activation
    quantization is not reproduced: the result computes with float activations."""
    if not inplace:
        model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantMixin):
            set_submodule(model, name, _float_module(m))
    return model


def save_dequantized(model: nn.Module, file: "str | os.PathLike", overwrite: bool = False) -> Path:
    """Write the dequantized float state dict as one safetensors file (atomically)."""
    file = Path(file)
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file} exists; pass overwrite=True to replace it")
    tensors, _ = _unique_state(dequantize(model))
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.tmp-", dir=file.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file
