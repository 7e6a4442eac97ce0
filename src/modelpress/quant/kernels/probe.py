"""A last check before trusting torch's integer kernels on this CPU: run each once on inputs built to overflow
int16 pair sums (uint8 codes of 255 against int8 weights of +-127, the case `vpmaddubsw` saturates) and compare
with the reference path. cpu.py already rules them out where their library lacks VNNI; this catches what the
flags cannot tell (a library built or configured differently). One probe per kernel and environment."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from . import torch_ops

PROBE_REL_L2 = 1e-4  # exact int32 sums differ from the fp32 reference by ~1e-7; saturation by ~1e-1


def _probe_layer():
    from ..linear import QuantLinear

    k, n = 256, 32
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        sign = torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0)
        lin.weight.copy_(sign.expand(n, k) * torch.linspace(0.5, 1.0, n).reshape(n, 1))  # codes +-127 per row
    return QuantLinear.from_float(lin, "int8", "int8")


@lru_cache(maxsize=None)
def _exact(name: str, env: tuple) -> bool:
    layer = _probe_layer()
    m = 1 if name == "linear_dynamic" else 20
    x = torch.linspace(0.9, 1.0, 256).repeat(m, 1)  # all positive: zero point 0, codes up to 255
    x[:, ::3] *= 0.999  # and not all equal
    try:
        with torch.no_grad():
            y = torch_ops.run(torch_ops.prepare(name, layer), name, layer, x)
            ref = layer.reference(x)
    except Exception:  # noqa: BLE001 - a kernel that fails here is simply not used
        return False
    if y is None:
        return False
    return bool(((y - ref).norm() / ref.norm()) <= PROBE_REL_L2)


def exact(name: str, cpu) -> bool:
    """Whether torch kernel `name` multiplies uint8 x int8 exactly here (cached per CPU / environment)."""
    return _exact(name, (cpu.key,))
