"""Importance of structured units (channels, neurons, heads): pure tensor functions.

- `norm`: L1 / L2 norm of each unit's weights (rows of the producing layers), as in filter pruning.
- `taylor`: |sum of weight x gradient| over each unit's weights (first-order Taylor estimate of the loss change
  when the unit is removed), gradients summed over training batches.
- `ezcrop`: EZCrop (Lin et al., WACV 2022): the 2-D FFT of each channel's feature map, its log-magnitude
  spectrum centred (fftshift), and the share of that spectral energy *outside* the central low-frequency zone,
  averaged over images. Channels whose maps carry mostly low-frequency (smooth, near-constant, low-rank) content
  rank low; a dead channel scores 0.
- `activation`: the energy a unit feeds the next layer, ||x_c|| times the norm of that layer's weights reading
  it (no labels needed).
"""
from __future__ import annotations

import math

import torch

IMPORTANCE = ("l1", "l2", "taylor", "ezcrop", "activation")


def row_norms(w: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Norm of every output unit: w [C, ...] -> [C]."""
    return w.detach().float().reshape(w.shape[0], -1).norm(p=p, dim=1)


def col_norms(w: torch.Tensor, factor: int = 1, p: int = 2) -> torch.Tensor:
    """Norm of the weights reading every input channel: w [out, C * factor, ...] -> [C]."""
    w = w.detach().float()
    cols = w.transpose(0, 1).reshape(w.shape[1] // factor, -1)
    return cols.norm(p=p, dim=1)


def taylor(w: torch.Tensor, grad: torch.Tensor, dim: int = 0, factor: int = 1) -> torch.Tensor:
    """|sum over each unit's weights of w * grad|: along dim 0 (output units) or 1 (input channels)."""
    wg = (w.detach().float() * grad.float())
    if dim == 1:
        wg = wg.transpose(0, 1)
    return wg.reshape(wg.shape[0] // factor, -1).sum(1).abs()


def zone_step(h: int, w: int, alpha: float = 0.25) -> int:
    """Half-width of the central square zone of a centred h x w spectrum: alpha of the distance from the
    centre to the edge (rounded up), 0 for maps too small to have a zone beyond the centre."""
    ch, cw = h // 2, w // 2
    if ch < 2 or cw < 2:
        return 0
    return min(math.ceil((h - ch - 1) * alpha), math.ceil((w - cw - 1) * alpha))


def ezcrop(fmap: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """EZCrop scores [C] of feature maps fmap [N, C, H, W]: mean over images of the share of the centred
    log-magnitude spectrum's energy lying outside the central zone."""
    if fmap.dim() != 4:
        raise ValueError(f"EZCrop needs feature maps [N, C, H, W], got shape {tuple(fmap.shape)}")
    n, c, h, w = fmap.shape
    spec = torch.fft.fftshift(torch.fft.fft2(fmap.float()), dim=(-2, -1))
    energy = torch.log1p(spec.abs())  # [N, C, H, W]
    total = energy.sum(dim=(-2, -1))
    s = zone_step(h, w, alpha)
    ch, cw = h // 2, w // 2
    zone = energy[..., ch - s:ch + s + 1, cw - s:cw + s + 1].sum(dim=(-2, -1))
    ratio = torch.where(total > 0, 1 - zone / total.clamp_min(1e-30), torch.zeros_like(total))
    return ratio.mean(0)


def channel_energy(x: torch.Tensor, axis: int, factor: int = 1) -> torch.Tensor:
    """sum of x^2 per channel along `axis` (each channel `factor` consecutive features wide) -> [C], float64."""
    x = x.detach().float().movedim(axis, 0)
    return x.reshape(x.shape[0] // factor, -1).pow(2).sum(1).double()
