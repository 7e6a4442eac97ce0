"""Round-to-nearest: each weight quantized on its own by the format's scale rule (no data needed)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..formats import quantize_tensor


@dataclass(frozen=True)
class Config:
    method: ClassVar[str] = "rtn"


def apply(model, plans, calib, config: Config, ctx) -> None:
    for p in plans:
        ctx.commit(p, quantize_tensor(p.module.weight.detach(), p.weights, mse=ctx.mse))
