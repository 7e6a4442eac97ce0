"""Training checkpoints: one safetensors file holding the model's state, the optimizer's tensors, extra modules'
state (distillation projections) and the RNG state, with the rest (step, losses, optimizer hyper-parameters,
the configuration it belongs to) as JSON in the file's metadata. Written to a temporary file in the same folder,
fsynced and renamed over the old one, so a checkpoint is always whole. Never pickle.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

KEY = "modelpress_checkpoint"
VERSION = 1


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().clone().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = t
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["groups"]}


def save_checkpoint(path: "str | os.PathLike", model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, info: dict[str, Any], extra: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write the checkpoint file `path` atomically. `info` must be JSON-serialisable (it holds the config)."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for name, module in (extra or {}).items():
        tensors.update({f"extra.{name}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng"] = torch.get_rng_state()
    meta = {"version": VERSION, "step": step, "info": info, "optimizer": opt_meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={KEY: json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: "str | os.PathLike") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint file; a clear error if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a modelpress training checkpoint")
    meta = json.loads(raw)
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer modelpress (checkpoint version {meta.get('version')})")
    return meta, tensors


def restore(meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: torch.nn.Module,
            extra: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Load the model (and extra modules) state and the RNG state; return the optimizer's state_dict."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    for name, module in (extra or {}).items():
        pre = f"extra.{name}."
        module.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, strict=True)
    torch.set_rng_state(tensors["rng"])
    return _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
