"""Size in true bytes: what the model's state_dict actually stores."""
from __future__ import annotations

import torch
from torch import nn


def model_bytes(model: nn.Module) -> int:
    """Sum of numel * element_size over the tensors of model.state_dict(), each distinct view
    (data pointer, byte count) counted once, so tied weights are not counted twice."""
    seen: set[tuple] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        if not isinstance(t, torch.Tensor):
            continue
        nbytes = t.numel() * t.element_size()
        key = ("meta", id(t)) if t.device.type == "meta" else (t.device, t.data_ptr(), nbytes)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def compression_ratio(reference: nn.Module, compressed: nn.Module) -> float:
    """model_bytes(reference) / model_bytes(compressed)."""
    return model_bytes(reference) / model_bytes(compressed)
