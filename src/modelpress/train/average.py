"""Polyak averaging of trained weights: an exponential moving average of the parameters, updated after every
optimizer step and swapped in when training ends (the `train` step's `ema` option).

The average of step t is a_t = d_t a_{t-1} + (1 - d_t) w_t with d_t = min(decay, (1 + t) / (10 + t)): the
warm-up lets the early average follow the weights instead of holding on to the starting point. For QAT layers the
averaged parameters are the latent float weights (and any learned scales); the fake-quant forward and `convert_`
both read them, so conversion stays bit-identical to the forward of the averaged model.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def average_decay(decay: float, step: int) -> float:
    """The decay used at update number `step` (1-based): `decay`, lowered during a short warm-up."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage(nn.Module):
    """The moving averages of `params` (kept as buffers, so a checkpoint saves and restores them)."""

    def __init__(self, params: Iterable[nn.Parameter], decay: float):
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"the weight average's decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = list(params)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        for i, p in enumerate(self.params):
            self.register_buffer(f"avg{i}", p.detach().clone())

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, f"avg{i}") for i in range(len(self.params))]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the averages (call after each optimizer step)."""
        self.count += 1
        weight = 1.0 - average_decay(self.decay, int(self.count))
        torch._foreach_lerp_(self.averages(), [p.detach() for p in self.params], weight)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the parameters with their averages (nothing happens before the first update)."""
        if int(self.count) == 0:
            return
        for p, a in zip(self.params, self.averages()):
            p.copy_(a)
