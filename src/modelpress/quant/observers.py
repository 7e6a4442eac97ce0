"""Observers: turn the activations seen during calibration into a range (lo, hi).

minmax: running min and max.  ema: exponential moving average of each batch's min and max.
percentile: the p-th percentile of the values (and 100 - p for the low end) over a bounded sample.
mse: the clipping range, on a grid of shrink factors of min/max, minimising the uint8 quantization
error of a bounded sample.
"""
from __future__ import annotations

import torch

MAX_SAMPLES = 1 << 20  # values kept per observer for percentile / mse


class Observer:
    def __init__(self, kind: str = "minmax", percentile: float = 99.99, momentum: float = 0.9, bits: int = 8):
        if kind not in ("minmax", "ema", "percentile", "mse"):
            raise ValueError(f"unknown observer {kind!r}; use minmax, ema, percentile or mse")
        self.kind, self.p, self.momentum, self.bits = kind, percentile, momentum, bits  # bits: code width for mse
        self.lo = self.hi = None
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN or infinite values")
        self.count += 1
        lo, hi = x.min(), x.max()
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.kind == "ema":
            m = self.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        if self.kind in ("percentile", "mse") and self.kept < MAX_SAMPLES:
            take = x if x.numel() <= MAX_SAMPLES - self.kept else x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(self.count))[: MAX_SAMPLES - self.kept]]
            self.samples.append(take)
            self.kept += take.numel()

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise ValueError("observer saw no data: the calibration set is empty")
        if self.kind == "percentile":
            s = torch.cat(self.samples)
            q = torch.quantile(s[: 1 << 24], torch.tensor([1 - self.p / 100, self.p / 100]))
            return q[0], q[1]
        if self.kind == "mse":
            return self._mse_range()
        return self.lo, self.hi

    def _mse_range(self):
        from .activation import quantize_uint8, uint8_params

        s = torch.cat(self.samples)
        best = None
        for f in torch.linspace(1.0, 0.2, 41).tolist():
            lo, hi = self.lo * f, self.hi * f
            scale, zero = uint8_params(lo, hi, self.bits)
            err = ((quantize_uint8(s, scale, zero, self.bits).float() - zero) * scale - s).pow(2).mean()
            if best is None or err < best[0]:
                best = (err, lo, hi)
        return best[1], best[2]
