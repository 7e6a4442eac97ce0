"""Running calibration data through a model: calling it on any input kind, observing layer inputs."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn


def call_model(model: nn.Module, inp: Any):
    """model(x) for a tensor, model(*x) for a tuple/list, model(**x) for a dict of keyword tensors."""
    if isinstance(inp, torch.Tensor):
        return model(inp)
    if isinstance(inp, Mapping):
        return model(**inp)
    if isinstance(inp, (tuple, list)):
        return model(*inp)
    raise TypeError(f"a model input must be a tensor, a tuple of tensors or a dict of tensors, got {type(inp).__name__}")


def observe_inputs(model: nn.Module, modules: Mapping[str, nn.Module], calib: Iterable[Any],
                   make_observer: Callable[[], Any], progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run every calibration input through `model`, feeding each listed module's first input to its observer."""
    if calib is None:
        raise ValueError("static activation quantization needs calibration data (calib=...)")
    observers = {name: make_observer() for name in modules}
    hooks = [m.register_forward_pre_hook(lambda _m, args, o=observers[n]: o.update(args[0]))
             for n, m in modules.items()]
    batches = 0
    try:
        with torch.inference_mode():
            for batch in calib:
                call_model(model, batch)
                batches += 1
                if progress:
                    progress(batches)
    finally:
        for h in hooks:
            h.remove()
    if batches == 0:
        raise ValueError("the calibration data is empty: no batch was given")
    return observers
