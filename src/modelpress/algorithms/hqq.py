"""HQQ: calibration-free half-quadratic optimisation of integer quantization parameters.

After Badri & Shaji (2023), "Half-Quadratic Quantization of Large Machine Learning Models". For each group,
minimise the sparsity-promoting error sum |W - (Q - z) s|^p (p < 1) by half-quadratic splitting: an auxiliary
error W_e is updated by generalized soft-thresholding (`shrink_lp`), then the zero point (and optionally the
scale) by least squares on W - W_e. Differences from the paper's code, on purpose:

- the shrinkage acts on the error in units of the quantization step, W_e = s * shrink_lp((W - W_r) / s),
  so that `beta` means the same for weights of any magnitude (the paper's beta=10 assumed LLM-sized weights;
  on weights ~0.02 its threshold never fires and HQQ reduces to plain least squares);
- the best iterate per group (lowest l_p error) is kept, not the last one;
- storage has an integer (uint8) zero point, kept within the code range as RTN's is (the int4 kernel folds
  (8 - z) s into bf16): the optimised float zero is rounded down and up, and for each the codes and the
  least-squares scale (in the stored scale dtype) are alternated a few times minimising the squared error;
- every group is compared with round-to-nearest (the format's own rule, clipping search included) by weight
  squared error and keeps RTN's parameters where HQQ is not better: never worse than RTN per group.
Symmetric formats have no zero point: HQQ then optimises the scale only (s = <W - W_e, Q> / <Q, Q>).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..formats import QTensor, codes_grid, grid, pack_bits, quantize_tensor, signed
from ..formats.integer import int_params
from ..formats.qtensor import _scale_dtype

POLISH_STEPS = 4  # alternations of codes and least-squares scale once the zero point is an integer


@dataclass(frozen=True)
class Config:
    method: ClassVar[str] = "hqq"
    iters: int = 20  # half-quadratic iterations
    p: float = 0.7  # l_p norm of the error (p < 1 promotes a sparse error: a few outliers, the rest exact)
    beta: float = 10.0  # initial penalty weight of the splitting (threshold ~ beta^(-1/(2-p)) steps)
    kappa: float = 1.01  # beta grows by this factor every iteration
    optimize_scale: bool = False  # asymmetric formats: also update the scale (symmetric ones always do)

    def __post_init__(self):
        if self.iters < 0 or not 0 < self.p <= 1 or self.beta <= 0 or self.kappa < 1:
            raise ValueError(f"hqq needs iters >= 0, 0 < p <= 1, beta > 0, kappa >= 1; got {self}")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: the proximal step of |x|^p / beta, sign(x) relu(|x| - |x|^(p-1) / beta)."""
    a = x.abs()
    return torch.sign(x) * F.relu(a - (a + 1e-12).pow(p - 1) / beta)


def _range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _msum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1, keepdim=True)  # [rows, groups, 1]


def _keep(ok: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` where it is a usable scale of the same sign as `old` (flip and int8 sign rules hold)."""
    return torch.where(ok & torch.isfinite(new) & (new * old > 0), new, old)


def _pick(better: torch.Tensor, new: tuple, old: tuple) -> tuple:
    """Per group: `new` where `better` [rows, groups, 1], else `old` (None entries stay None)."""
    return tuple(n if o is None else torch.where(better, n, o) for n, o in zip(new, old))


def hqq_optimize(W: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None, config: Config,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Optimise (scale, float zero) of W [rows, groups, g] starting from scale, zero [rows, groups, 1].

    zero=None: a symmetric format; only the scale is optimised and None is returned as zero. `mask`
    [.., g] marks real (1) and padding (0) entries. Returns the iterate with the lowest l_p error per group."""
    mask = torch.ones_like(W[:1]) if mask is None else mask  # [1 | rows, groups, g]
    sym = zero is None
    qmin, qmax = _range(bits, sym)
    s, z = scale.float(), torch.zeros_like(scale) if sym else zero.float()
    n = _msum(torch.ones_like(W), mask)  # [rows, groups, 1] real entries per group
    beta, best = config.beta, None
    for it in range(config.iters + 1):
        Q = torch.clamp(torch.round(W / s + z), qmin, qmax)  # codes
        E = W - (Q - z) * s  # reconstruction error
        err = _msum(E.abs().pow(config.p), mask)
        best = (s, z, err) if best is None else _pick(err < best[2], (s, z, err), best)
        if it == config.iters:
            break
        T = W - s * shrink_lp(E / s, beta, config.p)  # target: W minus its sparse error part
        if sym:  # T ~ Q s
            s = _keep(_msum(Q * Q, mask) > 0, _msum(T * Q, mask) / _msum(Q * Q, mask), s)
        else:
            if config.optimize_scale:  # T ~ (Q - z) s: least-squares line through the (Q, T) points
                qm, tm = _msum(Q, mask) / n, _msum(T, mask) / n
                var = _msum((Q - qm) ** 2, mask)
                s = _keep(var > 0, _msum((Q - qm) * (T - tm), mask) / var, s)
            z = _msum(Q - T / s, mask) / n
        beta *= config.kappa
    return best[0], (None if sym else best[1])


def finalize(W: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None, scale_dtype: torch.dtype,
             mask: torch.Tensor | None = None, steps: int = POLISH_STEPS):
    """Storable params for a fixed zero point (rounded to an integer code, 0..2^bits-1): alternate codes and the
    least-squares scale, the scale cast to `scale_dtype` (as stored), keeping per group the lowest squared error.
    Returns (codes [rows, groups, g] float, scale [rows, groups, 1], zero or None, err [rows, groups, 1])."""
    mask = torch.ones_like(W[:1]) if mask is None else mask
    sym = zero is None
    qmin, qmax = _range(bits, sym)
    s = scale.float()
    z = torch.zeros_like(s) if sym else torch.clamp(torch.round(zero.float()), qmin, qmax)
    best = None
    for it in range(steps + 1):
        s = s.to(scale_dtype).float()  # the scale that will be stored
        Q = torch.clamp(torch.round(W / s + z), qmin, qmax)  # [rows, groups, g]
        err = _msum((W - (Q - z) * s) ** 2, mask)
        best = (Q, s, err) if best is None else _pick(err < best[2], (Q, s, err), best)
        D = Q - z
        s = _keep(_msum(D * D, mask) > 0, _msum(W * D, mask) / _msum(D * D, mask), s)
    Q, s, err = best
    return Q, s, (None if sym else z), err


def quantize_hqq(w: torch.Tensor, fmt, config: Config, mse: bool | None = None) -> QTensor:
    """HQQ-quantize one weight tensor to an integer format; never worse than RTN (per group, squared error).

    HQQ runs from two starts, min-max (the paper's) and RTN's clipped parameters; each optimised zero point
    is rounded down and up (uint8 storage), the scale refitted for it, and each group keeps the best of
    these four candidates and RTN itself."""
    if fmt.kind != "int":
        raise ValueError(f"hqq works on integer formats (int2..int8, sym or :asym), not {fmt}; use rtn or gptq")
    rtn = quantize_tensor(w, fmt, mse=mse)
    rows, groups, g = grid(fmt, tuple(w.shape))
    w2 = w.detach().float().reshape(rows, -1)  # [rows, cols]
    cols = w2.shape[1]
    W = F.pad(w2, (0, groups * g - cols)).view(rows, groups, g)  # zero padding, masked out below
    mask = (torch.arange(groups * g) < cols).float().view(1, groups, g)
    u = codes_grid(rtn)  # [rows, groups, g] uint8
    s_r = rtn.scale.float().unsqueeze(-1)  # [rows, groups, 1]
    z_r = None if fmt.symmetric else rtn.zero.float().unsqueeze(-1)
    Q_r = signed(u, fmt.bits).float() if fmt.symmetric else u.float()
    err_r = _msum((W - (Q_r - (0 if z_r is None else z_r)) * s_r) ** 2, mask)
    best = (Q_r, s_r, z_r, err_r)
    for s0, z0 in _starts(W, fmt, s_r, z_r):
        s, z = hqq_optimize(W, fmt.bits, s0, z0, config, mask)
        for zi in ([None] if z is None else [torch.floor(z), torch.ceil(z)]):
            cand = finalize(W, fmt.bits, s, zi, _scale_dtype(fmt), mask)
            best = _pick(cand[3] < best[3], cand, best)  # NaN compares False: keeps the earlier candidate
    Q, s, z, _ = best
    codes = (Q.to(torch.int32) & (2**fmt.bits - 1)).to(torch.uint8)
    return QTensor(fmt, tuple(w.shape), pack_bits(codes, fmt.bits), s.squeeze(-1).to(_scale_dtype(fmt)).contiguous(),
                   None if z is None else z.squeeze(-1).to(torch.uint8))


def _starts(W, fmt, s_r, z_r):
    """Initial (scale, zero): min-max of each group (as in the paper) and RTN's own."""
    s_m, z_m = int_params(W, fmt.bits, fmt.symmetric)
    return [(s_m, None if fmt.symmetric else z_m), (s_r, z_r)]


def apply(model, plans, calib, config: Config, ctx) -> None:
    for p in plans:  # refuse before changing anything
        if p.weights.kind != "int":
            raise ValueError(f"hqq works on integer formats (int2..int8, sym or :asym); layer {p.name!r} asks "
                             f"for {p.weights}; use rtn or gptq for it")
    for p in plans:  # weight-only and data-free: `calib` is not used
        ctx.commit(p, quantize_hqq(p.module.weight.detach(), p.weights, config, mse=ctx.mse))
