"""Quantization algorithms: each decides the codes of the selected weights; `method=` picks one.

An algorithm is one module with a frozen `Config` dataclass (its options; `method` names it, `needs_calib`
says whether it needs calibration data, checked before any work), pure tensor
functions, and a short handler `apply(model, plans, calib, config, ctx)` that calls `ctx.commit(plan, qtensor)`
for every planned layer (swapping it for its quantized module), in the order it chooses.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import importlib

# method name -> module in this package (imported on first use)
METHODS: dict[str, str] = {"rtn": "rtn", "gptq": "gptq", "awq": "awq", "smoothquant": "smoothquant",
                           "hqq": "hqq", "adaround": "adaround"}


@dataclass(frozen=True)
class ApplyContext:
    """What `quantize_` hands an algorithm's `apply`: how to commit a layer, the clipping choice, progress."""

    # commit(plan, qtensor, smooth=None, input_range=None, bias=None) -> quantized module; `bias` replaces the
    # layer's bias in the quantized module (methods never change the float layers: a failure leaves the model)
    commit: Callable[..., Any]
    mse: bool | None = None  # weight clipping search: None = the format's default
    progress: Callable[[str, int, int], None] | None = None


def get_method(method: Any) -> tuple[ModuleType, Any]:
    """(algorithm module, its config) for a method name or a config object (with a `method` attribute)."""
    name = method if isinstance(method, str) else getattr(method, "method", None)
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; available: {', '.join(METHODS)}")
    module = importlib.import_module(f"{__name__}.{METHODS[name]}")
    config = module.Config() if isinstance(method, str) else method
    if not isinstance(config, module.Config):
        raise TypeError(f"method config for {name!r} must be a {module.__name__}.Config, got {type(config).__name__}")
    return module, config


def rtn_then_sequential(model, plans, calib, ctx: ApplyContext, method: str, wanted: Callable[[Any], bool],
                        process: Callable[[Any, Any, list], None]) -> None:
    """The glue of data-driven methods: planned layers that `wanted` rejects get round-to-nearest first (so the
    layers consuming them see quantized inputs); the others go through the calibration runner in execution
    order, `process(plan, module, inputs)` committing each; a Linear's inputs at padded positions are left out
    (they are not data: an `attention_mask` of the batch says which)."""
    from torch import nn

    from ..calibrate import by_token, layer_masks, run_sequential
    from ..formats import quantize_tensor

    if calib is None:
        raise ValueError(f"method {method!r} needs calibration data (calib=...)")
    chosen = {p.name: p for p in plans if wanted(p)}
    for p in plans:
        if p.name not in chosen:
            ctx.commit(p, quantize_tensor(p.module.weight.detach(), p.weights, mse=ctx.mse))
    if chosen:
        masks = layer_masks(model, calib)
        run_sequential(model, calib, list(chosen),
                       lambda n, m, xs: process(chosen[n], m, by_token(xs, masks(n)) if isinstance(m, nn.Linear) else xs),
                       ctx.progress)
