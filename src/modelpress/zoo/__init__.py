"""Reference models and data that run offline: `build("digits-cnn")` returns a ZooEntry."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

# name -> (module, builder function, one-line description)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "digits-cnn": ("modelpress.zoo.digits", "build_cnn", "small CNN with BatchNorm on scikit-learn's 8x8 digits"),
    "digits-dwcnn": ("modelpress.zoo.digits", "build_dwcnn", "depthwise-separable CNN on scikit-learn's 8x8 digits"),
    "minilm": ("modelpress.zoo.minilm", "build", "all-MiniLM-L6-v2 sentence embeddings on Shakespeare lines"),
    "shakespeare-lm": ("modelpress.zoo.shakespeare", "build", "small LlamaForCausalLM trained on Shakespeare"),
    "ctr": ("modelpress.zoo.ctr", "build", "DLRM-style click-through model on synthetic power-law click logs"),
}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    model: nn.Module  # float reference model, in eval mode
    calib: list[Any]  # calibration inputs: tensors, tuples or dicts of keyword tensors
    task: Any  # a modelpress.evaluate.tasks task on held-out data
    description: str = ""
    train: list[Any] | None = None  # training batches ((input, target) pairs, or inputs), never evaluation data


def list_models() -> list[str]:
    return list(_REGISTRY)


def describe(name: str) -> str:
    return _lookup(name)[2]


def default_cache_dir() -> Path:
    """`$MODELPRESS_CACHE/zoo`, else `~/.cache/modelpress/zoo` (the modelpress cache's zoo folder, beside the kernel
    builds in its `kernels` folder: MODELPRESS_CACHE names the same folder for both)."""
    env = os.environ.get("MODELPRESS_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "modelpress") / "zoo"


def build(name: str, tiny: bool = False, cache_dir: Path | None = None, rebuild: bool = False) -> ZooEntry:
    """Build (or load from the cache) the zoo model `name` with its data and evaluation task."""
    module, fn, _ = _lookup(name)
    builder = getattr(importlib.import_module(module), fn)
    return builder(tiny=tiny, cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(), rebuild=rebuild)


def _lookup(name: str) -> tuple[str, str, str]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
