"""Round-to-nearest: each weight quantized on its own by the format's scale rule (no data needed)."""
from __future__ import annotations

from ..formats import QTensor, quantize_tensor


def quantize_weights(model, plans, calib=None, mse=None, progress=None) -> dict[str, QTensor]:
    out = {}
    for i, p in enumerate(plans):
        out[p.name] = quantize_tensor(p.module.weight.detach(), p.weights, mse=mse)
        if progress:
            progress("quantize", i + 1, len(plans))
    return out
