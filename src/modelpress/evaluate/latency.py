"""Latency: median wall time of a forward pass after warm-up, under torch.inference_mode()."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from ..calibrate import call_model as _call


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_latency(model: nn.Module, inp: Any, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds per call of model on inp (a Tensor, tuple or dict of tensors)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            _call(model, inp)
        _sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            _call(model, inp)
            _sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare_latency(
    reference: nn.Module, compressed: nn.Module, inp: Any, warmup: int = 3, repeats: int = 10
) -> dict[str, float]:
    """Median seconds of both models on the same input in the same run, and speedup = reference / compressed."""
    r = measure_latency(reference, inp, warmup, repeats)
    c = measure_latency(compressed, inp, warmup, repeats)
    return {"reference": r, "compressed": c, "speedup": r / c if c > 0 else float("inf")}
