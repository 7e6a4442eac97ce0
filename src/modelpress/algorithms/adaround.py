"""AdaRound (Nagel et al. 2020): learn whether each weight rounds up or down, layer by layer, plus bias correction.

With the scales of round-to-nearest fixed, every weight's code is floor(w / s) + h, h in {0, 1}. h is relaxed
to the rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1) and V is learned with Adam to
minimise the layer's output error on its calibration inputs,
    ||W X - W~ X||^2 = sum_g || (W_g - W~_g) R_g^T ||^2,   R_g^T R_g = X_g^T X_g / n  (X_g: [n, K] input rows
or conv patches of group g), plus reg_weight * sum(1 - |2 h - 1|^beta), beta annealed from beta_start to
beta_end after a warm-up without it, which drives every h to 0 or 1. The output error is measured relative
to round-to-nearest's (see ERR_PER_WEIGHT), so the balance with the regulariser does not depend on the scale
of the weights or inputs. Layers are done in execution order (calibrate.run_sequential): each sees inputs
produced by the already-quantized layers before it.

Bias correction: E[W x] - E[W_q x] = (W - W_q) E[x] is added to the quantized layer's bias (a conv uses its
mean input patch, which accounts for zero padding); a layer without a bias gets one when `bias_correction` is
on. The float layers are never changed (a failed run leaves the model exactly as it was).
Integer formats only; embeddings in the plan are rounded to nearest (a lookup's error is per weight).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import by_token, layer_masks, run_sequential
from ..formats import QTensor, dequantize_tensor, grid, pack_bits, quantize_tensor
from ..formats.integer import int_range
from ..formats.qtensor import _to_grid

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid
# Output error unit: round-to-nearest's error is ERR_PER_WEIGHT per weight. With reg_weight 0.01 an undecided
# weight then weighs 1000x its share of RTN's error, about the balance of the paper's experiments. Measured on
# Linear / conv / depthwise layers of 72..65536 weights at int2..int4 (500 steps): output error 0.07-0.72x
# RTN's, flat for units <= 1e-4; a unit of 1 left most roundings undecided (0.5-1.4x RTN's).
ERR_PER_WEIGHT = 1e-5


@dataclass(frozen=True)
class Config:
    method: ClassVar[str] = "adaround"
    needs_calib: ClassVar[bool] = True
    iters: int = 500  # Adam steps per layer (0: round to nearest, then bias correction)
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of the steps without the rounding regulariser
    bias_correction: bool = True
    n_samples: int = 1024  # calibration rows used per layer: tokens for Linear, images for convolutions

    def __post_init__(self):
        if self.iters < 0 or self.n_samples < 1 or self.lr <= 0 or self.reg_weight < 0:
            raise ValueError(f"adaround needs iters >= 0, n_samples >= 1, lr > 0, reg_weight >= 0; got {self}")
        if not 0 <= self.warmup < 1 or not self.beta_start >= self.beta_end > 0:
            raise ValueError(f"adaround needs 0 <= warmup < 1 and beta_start >= beta_end > 0; got {self}")


# --- pure tensor functions -------------------------------------------------------------------------------------

def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) == frac (the fractional part of w / s), the start of the optimisation."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def round_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): 0 when every h is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def beta_at(step: int, total: int, cfg: Config) -> float | None:
    """Annealed exponent (None during warm-up): linear from beta_start to beta_end."""
    start = cfg.warmup * total
    if step < start:
        return None
    t = (step - start) / max(total - start, 1)
    return cfg.beta_start + (cfg.beta_end - cfg.beta_start) * t


def bias_correction(w: torch.Tensor, w_q: torch.Tensor, x_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """(W - W_q) E[x]: the bias change [out] that restores the layer's mean output.

    w, w_q: [out, in] or [out, in/groups, *kernel]; x_mean: [in] per input channel (broadcast over kernel
    positions for a conv) or [in, *kernel], the mean input patch."""
    dw = (w.double() - w_q.double()).reshape(groups, w.shape[0] // groups, -1)  # [G, out/G, in/G * k]
    cin, kshape = w.shape[1] * groups, tuple(w.shape[2:])
    m = x_mean.double()
    if tuple(m.shape) == (cin,):
        m = m.reshape(cin, *([1] * len(kshape))).expand(cin, *kshape)
    elif tuple(m.shape) != (cin, *kshape):
        raise ValueError(f"x_mean must have shape ({cin},) or {(cin, *kshape)}, got {tuple(m.shape)}")
    return torch.einsum("gok,gk->go", dw, m.reshape(groups, -1)).reshape(-1).to(w.dtype)


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies its weight with: [G, n, K] (Linear: G = 1, K = in; conv: im2col patches of
    each group, K = in/groups * prod(kernel), in the order of weight.reshape(out, -1))."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, module.in_features)
    if x.dim() == module.weight.dim() - 1:  # an unbatched input
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)  # (before a Conv1d's input becomes 2-D: the
    # reflect / replicate / circular modes pad only the dimensions the convolution has)
    if isinstance(module, nn.Conv1d):  # as a 2-D conv of height 1
        x = x.unsqueeze(2)
        k, st, dil = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
    else:
        k, st, dil = module.kernel_size, module.stride, module.dilation
    cols = F.unfold(x, k, dilation=dil, stride=st)  # [N, C * prod(k), L]
    n, ck, length = cols.shape
    g = module.groups
    return cols.view(n, g, ck // g, length).permute(1, 0, 3, 2).reshape(g, n * length, ck // g)


def input_factor(module: nn.Module, xs: list[torch.Tensor], n_samples: int):
    """(R [G, r, K], mean row [G, K]) with R^T R = X^T X / n over the first `n_samples` samples of xs."""
    gram = total = None
    count, left = 0, n_samples
    for x in xs:
        x = x.detach().float()
        if isinstance(module, nn.Linear):
            x = x.reshape(-1, x.shape[-1])
        x = x[:left]
        left -= x.shape[0]
        rows = layer_rows(module, x).double()  # [G, n, K]
        gram = rows.transpose(1, 2) @ rows if gram is None else gram + rows.transpose(1, 2) @ rows
        total = rows.sum(1) if total is None else total + rows.sum(1)
        count += rows.shape[1]
        if left <= 0:
            break
    evals, evecs = torch.linalg.eigh(gram / count)  # [G, K], [G, K, K]
    keep = evals > evals.amax() * 1e-10
    k = int(keep.sum(1).max().clamp(min=1))  # the rank that matters, largest eigenvalues last
    evals, evecs = evals[:, -k:].clamp(min=0), evecs[:, :, -k:]
    r = (evecs * evals.sqrt().unsqueeze(1)).transpose(1, 2)  # [G, k, K]
    return r.float(), (total / count).float()


def learn_codes(w: torch.Tensor, q: QTensor, factor: torch.Tensor, groups: int, cfg: Config) -> QTensor:
    """The QTensor with q's scales (and zero points) whose codes minimise the output error on the rows
    described by `factor` [G, r, K] (see input_factor). An output channel whose learned rounding does worse
    than round-to-nearest on these rows keeps round-to-nearest."""
    fmt = q.fmt
    rows_q = grid(fmt, q.shape)[0]
    qmin, qmax = int_range(fmt.bits, fmt.symmetric)
    scale = q.scale.float().unsqueeze(-1)  # [rows, groups, 1]
    zero = q.zero.float().unsqueeze(-1) if q.zero is not None else torch.zeros_like(scale)
    x = _to_grid(w, fmt) / scale
    base = torch.floor(x)
    real = _to_grid(torch.ones_like(w), fmt) > 0  # False on the padding of the last group
    out, n = w.shape[0], w.numel()
    w_mat = w.detach().float().reshape(groups, out // groups, -1)  # [G, out/G, K]

    def as_matrix(t: torch.Tensor) -> torch.Tensor:  # grid [rows, groups, g] -> [G, out/G, K]
        return t.reshape(rows_q, -1)[:, : n // rows_q].reshape(w_mat.shape)

    def row_err(h: torch.Tensor) -> torch.Tensor:  # squared output error per output channel [G, out/G]
        wq = as_matrix((torch.clamp(base + h + zero, qmin, qmax) - zero) * scale)
        return ((w_mat - wq) @ factor.transpose(1, 2)).pow(2).sum(-1)

    frac = x - base
    rtn = (frac >= 0.5).float()
    with torch.no_grad():
        rtn_err = row_err(rtn)
    unit = rtn_err.sum().clamp(min=1e-30) / (n * ERR_PER_WEIGHT)
    v = init_v(frac).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    for step in range(cfg.iters):
        h = rectified_sigmoid(v)
        loss = row_err(h).sum() / unit
        beta = beta_at(step, cfg.iters, cfg)
        if beta is not None and cfg.reg_weight > 0:
            loss = loss + cfg.reg_weight * round_regularizer(h[real], beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    hard = torch.where(real, (rectified_sigmoid(v.detach()) >= 0.5).float(), rtn)
    with torch.no_grad():
        worse = (row_err(hard) > rtn_err).reshape(-1)  # [out]
    keep = worse.reshape(rows_q, 1, 1) if rows_q == out else worse.repeat_interleave(n // out).view(hard.shape)
    codes = torch.clamp(base + torch.where(keep, rtn, hard) + zero, qmin, qmax).to(torch.int32)
    return with_codes(q, codes)


def with_codes(q: QTensor, codes: torch.Tensor) -> QTensor:
    """A QTensor like q (format, scales, zero points) holding integer `codes` [rows, groups, group] (values in
    the format's range, zero point included; negative values for symmetric formats)."""
    qmin, qmax = int_range(q.fmt.bits, q.fmt.symmetric)
    if codes.shape != grid(q.fmt, q.shape) or int(codes.min()) < qmin or int(codes.max()) > qmax:
        raise ValueError(f"codes must have shape {grid(q.fmt, q.shape)} and values in [{qmin}, {qmax}]")
    stored = (codes.to(torch.int32) & (2**q.fmt.bits - 1)).to(torch.uint8)  # two's complement for signed
    return QTensor(q.fmt, q.shape, pack_bits(stored, q.fmt.bits), q.scale, q.zero, q.global_scale)


# --- handler -----------------------------------------------------------------------------------------------------

def corrected_bias(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """The layer's bias plus `delta` (a new tensor: the float layer is never changed; none becomes delta)."""
    b = module.bias
    return delta.to(module.weight.dtype) if b is None else b.detach() + delta.to(b.dtype)


def quantize_layer(module: nn.Module, xs: list[torch.Tensor], fmt, cfg: Config,
                   mse: bool | None = None) -> tuple[QTensor, torch.Tensor | None]:
    """(AdaRound codes, bias-corrected bias or None) for one Linear/Conv layer on its inputs xs. The module
    itself is left as it was."""
    w = module.weight.detach().float()
    groups = getattr(module, "groups", 1)
    q = quantize_tensor(w, fmt, mse=mse)
    factor, mean = input_factor(module, xs, cfg.n_samples)
    q = learn_codes(w, q, factor, groups, cfg)
    if not cfg.bias_correction:
        return q, None
    cin = w.shape[1] * groups
    return q, corrected_bias(module, bias_correction(w, dequantize_tensor(q), mean.reshape(cin, *w.shape[2:]), groups))


def apply(model, plans, calib, config: Config, ctx) -> None:
    bad = [p for p in plans if p.weights.kind != "int"]
    if bad:
        raise ValueError(f"adaround learns integer roundings; layer {bad[0].name!r} asks for format "
                         f"{bad[0].weights} ({bad[0].weights.kind}): use int2..int8, or method 'rtn' / 'gptq'")
    learned = {p.name: p for p in plans if isinstance(p.module, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    for p in plans:
        if p.name not in learned:  # embeddings: a lookup's error is per weight, nearest rounding is optimal
            ctx.commit(p, quantize_tensor(p.module.weight.detach(), p.weights, mse=ctx.mse))

    masks = layer_masks(model, calib) if learned else (lambda name: [])

    def process(name: str, module: nn.Module, xs: list[torch.Tensor]) -> None:
        p = learned[name]
        if isinstance(module, nn.Linear):  # padded positions are not data
            xs = by_token(xs, masks(name))
        q, bias = quantize_layer(module, xs, p.weights, config, ctx.mse)
        ctx.commit(p, q, bias=bias)

    if learned:
        run_sequential(model, calib, list(learned), process, progress=ctx.progress)

