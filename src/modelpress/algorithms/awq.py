"""AWQ (activation-aware weight quantization, Lin et al. 2023): protect the weights of salient input channels.

Per Linear layer, with calibration inputs x [T, K] and weight W [N, K]:
1. scale search: s = mean|x|^alpha (normalised to sqrt(max * min) = 1); alpha on a grid in [0, 1] minimises
   || x W^T - (x / s) Q(W * s)^T ||^2. alpha = 0 is plain quantization, so the search never does worse on x.
2. clip search: per scale group (or row), a shrink of the group's range in [0.5, 1] that minimises the
   group's output error || x_g (w_g - q_g)^T ||^2 (not the weight error).
The layer keeps s as its `input_smooth` buffer (it divides its input by s); no other module changes.
Only Linear layers are searched; other planned layers (embeddings, convolutions) get round-to-nearest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import rtn_then_sequential
from ..formats import Format, QTensor, dequantize_tensor, parse_format, quantize_tensor
from .smoothquant import static_input_range, subsample


@dataclass(frozen=True)
class Config:
    method: ClassVar[str] = "awq"
    needs_calib: ClassVar[bool] = True
    grid: int = 20  # alpha steps in [0, 1]
    clip_search: bool = True
    clip_grid: int = 20  # max-shrink steps from 1.0 to 0.5
    n_tokens: int = 4096  # calibration tokens per layer used by the searches (evenly spaced, deterministic)


def output_error(h: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """|| x dW^T ||^2 from h = x^T x [K, K] and dW [N, K] (cheaper than the tokens when T > K)."""
    return ((dw @ h) * dw).sum()


def scale_candidates(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = mean|x|^alpha over tokens, floored away from 0 and normalised so that sqrt(max * min) = 1."""
    m = x.abs().float().mean(0)  # [K]
    m = m.clamp(min=max(m.max().item() * 1e-4, 1e-12))
    s = m.pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def search_scale(x: torch.Tensor, w: torch.Tensor, fmt: Format | str, n_grid: int = 20,
                 mse: bool | None = False) -> torch.Tensor:
    """Per-input-channel smoothing s [K] for inputs x [T, K] and weight w [N, K] (see module docstring)."""
    fmt = parse_format(fmt)
    x, w = x.float(), w.detach().float()
    h = x.T @ x  # [K, K]
    best, best_s = None, torch.ones(w.shape[1])
    for alpha in torch.linspace(0, 1, n_grid + 1).tolist():
        s = scale_candidates(x, alpha)
        wq = dequantize_tensor(quantize_tensor(w * s, fmt, mse=mse)) / s  # effective weight [N, K]
        err = output_error(h, w - wq).item()
        if best is None or err < best:
            best, best_s = err, s
    return best_s


def _group_view(t: torch.Tensor, fmt: Format) -> torch.Tensor:
    """[N, K] -> [N, G, g] along the scale groups (one group per row for per-channel/tensor scales)."""
    n, k = t.shape
    if fmt.granularity != "group":
        return t.reshape(n, 1, k)
    g = fmt.group_size
    pad = -k % g
    return nn.functional.pad(t, (0, pad)).reshape(n, -1, g)


def search_clip(x: torch.Tensor, w: torch.Tensor, fmt: Format | str, n_grid: int = 20,
                min_shrink: float = 0.5) -> QTensor:
    """Quantize w [N, K] (already scaled) with, per scale group, the range shrink in [min_shrink, 1] that
    minimises the group's output error on inputs x [T, K] (already divided by s). Clipping is done by
    clamping a copy of the weight to shrink * [min, max] of each group, then quantizing it min-max."""
    fmt = parse_format(fmt)
    x, w = x.float(), w.detach().float()
    wg = _group_view(w, fmt)  # [N, G, g]
    xg = _group_view(x, fmt)  # [T, G, g]
    hg = torch.einsum("tgi,tgj->gij", xg, xg)  # [G, g, g] block-diagonal part of x^T x
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)  # [N, G, 1]
    if fmt.granularity == "tensor":  # one range for the whole tensor
        lo, hi = lo.amin().expand_as(lo), hi.amax().expand_as(hi)
    shrinks = torch.linspace(1.0, min_shrink, max(n_grid, 1)).tolist()
    best_err, best_shrink = None, None
    for sh in shrinks:
        clamped = torch.minimum(torch.maximum(wg, lo * sh), hi * sh)  # [N, G, g]
        wq = dequantize_tensor(quantize_tensor(_ungroup(clamped, w.shape), fmt, mse=False))
        d = wg - _group_view(wq, fmt)  # [N, G, g]
        err = torch.einsum("ngi,gij,ngj->ng", d, hg, d)  # [N, G]
        if fmt.granularity == "tensor":
            err = err.sum().expand_as(err)  # one scale for the whole tensor: one shrink
        if best_err is None:
            best_err, best_shrink = err, torch.full_like(err, sh)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_shrink = torch.where(better, torch.full_like(err, sh), best_shrink)
    sh = best_shrink.unsqueeze(-1)  # [N, G, 1]
    clamped = torch.minimum(torch.maximum(wg, lo * sh), hi * sh)
    return quantize_tensor(_ungroup(clamped, w.shape), fmt, mse=False)


def _ungroup(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[N, G, g] -> [N, K] (drops the padding of the last group)."""
    return t.reshape(shape[0], -1)[:, : shape[1]]


def quantize_layer(x: torch.Tensor, w: torch.Tensor, fmt: Format | str, config: Config,
                   mse: bool | None = None) -> tuple[QTensor, torch.Tensor]:
    """(quantized W * s, s) for one Linear weight w [N, K] given its inputs x [T, K]."""
    x = subsample(x.reshape(-1, w.shape[1]).float(), config.n_tokens)
    s = search_scale(x, w, fmt, config.grid, mse=False if config.clip_search else mse)
    ws = w.detach().float() * s  # [N, K]
    if config.clip_search:
        return search_clip(x / s, ws, fmt, config.clip_grid), s
    return quantize_tensor(ws, fmt, mse=mse), s


def apply(model, plans, calib, config: Config, ctx) -> None:
    def process(p, module: nn.Module, inputs: list[torch.Tensor]) -> None:
        x = torch.cat([t.reshape(-1, module.in_features) for t in inputs]).float()  # [T, K]
        q, s = quantize_layer(x, module.weight, p.weights, config, ctx.mse)
        smooth = None if bool((s == 1).all()) else s  # alpha = 0 won: nothing to divide by
        ctx.commit(p, q, smooth=smooth, input_range=static_input_range(x / s, p.activations))

    # embeddings and convolutions: round-to-nearest; Linear layers through the calibration runner
    rtn_then_sequential(model, plans, calib, ctx, "awq", lambda p: type(p.module) is nn.Linear, process)
