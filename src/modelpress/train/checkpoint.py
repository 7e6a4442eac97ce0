"""Training checkpoints: one safetensors file holding the model's state, the optimizer's tensors, extra modules'
state (distillation projections) and the RNG state, with the rest (step, losses, optimizer hyper-parameters,
the configuration it belongs to) as JSON in the file's metadata. Written to a temporary file in the same folder,
fsynced and renamed over the old one, so a checkpoint is always whole. Never pickle.
"""
from __future__ import annotations

import hashlib

import json
import os
import re
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


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, values): which model a checkpoint started from."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # (the tensor's bytes, not a copy)
    return h.hexdigest()


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
    """(metadata, tensors) of a checkpoint file; a clear error if it is not one or if what resuming reads is
    damaged (the metadata's fields and their types, the tensor names, the RNG state)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a modelpress training checkpoint")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable checkpoint: its metadata is not valid JSON ({e})") from None
    problem = _meta_problem(meta) or _tensors_problem(tensors)
    if problem == "newer":
        raise ValueError(f"{path} was written by a newer modelpress (checkpoint version {meta['version']})")
    if problem:
        raise ValueError(f"{path} is not a readable checkpoint: {problem}")
    return meta, tensors


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with checkpoint metadata (None: nothing; "newer": a later version)."""
    if not isinstance(meta, dict):
        return f"its metadata is a JSON {type(meta).__name__}, not an object"
    for key, check, kind in (("version", _is_int, "an integer"), ("step", _is_int, "an integer"),
                             ("info", lambda v: isinstance(v, dict), "an object"),
                             ("optimizer", lambda v: isinstance(v, dict), "an object")):
        if key not in meta:
            return f"its metadata has no {key!r}"
        if not check(meta[key]):
            return f"{key!r} in its metadata is {meta[key]!r}, not {kind}"
        if key == "version" and meta[key] > VERSION:
            return "newer"  # its layout may differ: nothing else is checked
    if meta["version"] < 1 or meta["step"] < 0:
        key = "version" if meta["version"] < 1 else "step"
        return f"{key!r} in its metadata is {meta[key]}, below {int(key == 'version')}"
    opt = meta["optimizer"]
    groups, scalars = opt.get("groups"), opt.get("scalars")
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                             and all(map(_is_int, g["params"])) for g in groups)):
        return f"the optimizer's parameter groups in its metadata are damaged: {groups!r:.200}"
    if not (isinstance(scalars, dict) and all(re.fullmatch(r"\d+\..+", k) for k in scalars)):
        return f"the optimizer's scalars in its metadata are damaged: {scalars!r:.200}"
    return None


def _tensors_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    odd = [k for k in tensors
           if k != "rng" and not k.startswith(("model.", "extra.")) and not re.fullmatch(r"optim\.\d+\..+", k)]
    if odd:
        return f"it holds tensors of unknown names: {odd[:5]}"
    rng, want = tensors.get("rng"), torch.get_rng_state()
    if rng is None or rng.dtype != want.dtype or rng.shape != want.shape:
        return (f"its RNG state is {'missing' if rng is None else f'{rng.dtype} {list(rng.shape)}'}, "
                f"not {want.dtype} {list(want.shape)}")
    return None


def _mismatch(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """How the tensors `got` from a checkpoint differ from a module's state (names, shapes), or None."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = [f"{k} is {list(got[k].shape)} there, {list(want[k].shape)} here" for k in want
              if k in got and got[k].shape != want[k].shape]
    parts = [f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
             for what, names in (("missing", missing), ("unexpected", unexpected), ("shapes", shapes)) if names]
    return "; ".join(parts) or None


def check_fits(tensors: dict[str, torch.Tensor], model: torch.nn.Module,
               extra: dict[str, torch.nn.Module] | None = None, path: "str | os.PathLike | None" = None) -> dict:
    """The checkpoint's states by module, after checking each against its module (names and shapes)."""
    states = {"": (model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})}
    for name, module in (extra or {}).items():
        pre = f"extra.{name}."
        states[name] = (module, {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    for name, (module, state) in states.items():
        problem = _mismatch(module.state_dict(), state)
        if problem:
            where = f"checkpoint {path}" if path else "the checkpoint"
            raise ValueError(f"{where} belongs to another model ({f'{name}: ' if name else ''}{problem}); "
                             "remove it or use another checkpoint path")
    return states


def restore(meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: torch.nn.Module,
            extra: dict[str, torch.nn.Module] | None = None,
            path: "str | os.PathLike | None" = None) -> dict[str, Any]:
    """Load the model (and extra modules) state and the RNG state; return the optimizer's state_dict. Every
    state is checked against its module (names and shapes) before anything is loaded."""
    states = check_fits(tensors, model, extra, path)
    for module, state in states.values():
        module.load_state_dict(state, strict=True)
    torch.set_rng_state(tensors["rng"])
    return _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
