"""Fake quantization for training: the pure tensor functions behind the QAT modules (modelpress.quant.qat).

The forward value of every fake-quantized tensor is computed by the format's own encode/decode (the same
functions `quantize_tensor` / `dequantize_tensor` and the activation formats use), so the trained model and the
packed one it converts to compute the same numbers. The gradient comes from a differentiable *surrogate*:
`with_surrogate(exact, s)` returns a tensor whose value is exactly `exact` and whose gradient is that of `s`
(`exact.detach() + (s - s.detach())`: adding an exact zero changes no bit).

Surrogates: the straight-through estimator (identity inside the representable range, zero where values are
clipped), and LSQ (learned step size, Esser et al. 2020) for learned scales.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..formats import Format, QTensor, decode_float, encode_float, grid, max_value
from ..formats.integer import int_range


def with_surrogate(exact: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """The value of `exact` (bit for bit) with the gradient of `surrogate`."""
    return exact.detach() + (surrogate - surrogate.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x forward, gradient multiplied by `factor` (LSQ's step-size gradient scale)."""
    return x * factor + (x - x * factor).detach()


def to_grid(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Differentiable view of a weight on its format's [rows, groups, group] grid (zero padding at row ends)."""
    rows, groups, g = grid(fmt, tuple(w.shape))
    w2 = w.reshape(rows, -1)
    return F.pad(w2, (0, groups * g - w2.shape[1])).view(rows, groups, g)


def from_grid(wg: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_grid` (drops the padding), as `dequantize_tensor` does."""
    rows = wg.shape[0]
    return wg.reshape(rows, -1)[:, : math.prod(shape) // rows].reshape(shape)


def clip_mask(w: torch.Tensor, q: QTensor) -> torch.Tensor:
    """1 where the straight-through gradient passes (w inside the format's range under q's scales), else 0.

    Integer formats: codes strictly representable (q_min <= w / s + z <= q_max); small floats: |w / s| <= max.
    Other formats (binary, ternary, MX, NVFP4) pass every gradient."""
    fmt = q.fmt
    if fmt.kind not in ("int", "float"):
        return torch.ones_like(w)
    wg = to_grid(w.detach().float(), fmt)
    s = q.scale.float().unsqueeze(-1)
    if fmt.kind == "int":
        qmin, qmax = int_range(fmt.bits, fmt.symmetric)
        v = wg / s + (q.zero.float().unsqueeze(-1) if q.zero is not None else 0.0)
        inside = (v >= qmin - 0.5) & (v <= qmax + 0.5)
    else:
        inside = (wg / s).abs() <= max_value(fmt.name)
    return from_grid(inside.to(w.dtype), tuple(w.shape))


def lsq_surrogate(wg: torch.Tensor, fmt: Format, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable fake quantization on the grid with learned `scale` [rows, groups, 1] (and `zero` for
    asymmetric integers): LSQ gradients for the scale, straight-through (clipped) gradients for the weights."""
    g = wg.shape[-1]
    if fmt.kind == "int":
        qmin, qmax = int_range(fmt.bits, fmt.symmetric)
        s = grad_scale(scale, 1.0 / math.sqrt(g * qmax))
        if zero is None:
            return round_ste(torch.clamp(wg / s, qmin, qmax)) * s
        z = round_ste(grad_scale(zero, 1.0 / math.sqrt(g * qmax)))
        return (round_ste(torch.clamp(wg / s + z, qmin, qmax)) - z) * s
    s = grad_scale(scale, 1.0 / math.sqrt(g))
    v = wg / s
    if fmt.kind == "binary":
        vc = v.clamp(-1, 1)
        return (vc + (torch.where(v >= 0, 1.0, -1.0) - vc).detach()) * s
    if fmt.kind == "ternary":
        return round_ste(v.clamp(-1, 1)) * s
    if fmt.kind == "float":
        m = max_value(fmt.name)
        vc = v.clamp(-m, m)
        return (vc + (decode_float(encode_float(vc.detach(), fmt.name), fmt.name) - vc).detach()) * s
    raise ValueError(f"learned scales need an integer, binary, ternary or small-float format, not {fmt.name} "
                     "(its block scales are powers of two computed from the weights): use scales='dynamic'")


def block_mask(rows: int, cols: int, block: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] bool: exactly round(rate * n) of the n = rows * ceil(cols / block) blocks of `block`
    consecutive columns are True, chosen uniformly at random (QuantNoise / FST subsets)."""
    nb = -(-cols // block)
    total = rows * nb
    k = int(round(rate * total))
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=generator)[:k]] = True
    return flat.view(rows, nb).repeat_interleave(block, dim=1)[:, :cols]


def batch_range(x: torch.Tensor, kind: str, percentile: float = 99.9) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of one batch of activations x [N, ...] (N samples). `minmax`: the batch's min and max.
    `granular`: the mean over samples of each sample's (100 - p)-th and p-th percentiles, so that a few
    outlier values in a sample do not stretch the range (Granular EMA)."""
    x = x.detach().float()
    if kind == "granular" and x.dim() > 1 and x[0].numel() > 1:
        xs = x.reshape(x.shape[0], -1)
        q = torch.tensor([1 - percentile / 100, percentile / 100])
        lohi = torch.quantile(xs, q, dim=1)  # [2, N]
        return lohi[0].mean(), lohi[1].mean()
    return x.amin(), x.amax()


def per_sample_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's min and max: x [N, ...] -> ([N], [N])."""
    xs = x.detach().float()
    xs = xs.flatten(1) if xs.dim() > 1 else xs.reshape(-1, 1)  # (N = 0: empty ranges, where reshape(0, -1) fails)
    return xs.amin(1), xs.amax(1)


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix D [n, n] (rows are frequencies): X = x @ D.T, x = X @ D."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def frequency_transform(w: torch.Tensor, scaling: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """FAT: each row of w (output channel, flattened) taken to the DCT domain, each frequency scaled by
    `scaling` [cols], and taken back. With scaling = 1 it returns w (up to float rounding)."""
    w2 = w.reshape(w.shape[0], -1)
    return ((w2 @ d.t()) * scaling @ d).reshape(w.shape)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, D], assignment [N]) of k-means on x [N, D]: k-means++ seeding, Lloyd iterations."""
    x = x.detach().float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least {k} samples for {k} clusters, got {n}")
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, cent).pow(2).amin(1)
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        cent = torch.cat([cent, x[torch.multinomial(p, 1, generator=g)]])
    assign = torch.cdist(x, cent).argmin(1)
    for _ in range(iters):
        new = torch.stack([x[assign == c].mean(0) if (assign == c).any() else cent[c] for c in range(k)])
        new_assign = torch.cdist(x, new).argmin(1)
        cent = new
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return cent, assign
