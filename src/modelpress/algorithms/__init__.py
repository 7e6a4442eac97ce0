"""Quantization algorithms: each decides the codes of selected weights. `method=` names one of these."""
from __future__ import annotations

from types import ModuleType
from typing import Any

from . import rtn

METHODS: dict[str, ModuleType] = {"rtn": rtn}


def get_method(method: Any) -> ModuleType:
    """The algorithm module for a method name (or for a config object carrying a `method` name)."""
    name = method if isinstance(method, str) else getattr(method, "method", None)
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
