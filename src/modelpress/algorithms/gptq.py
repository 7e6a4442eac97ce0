"""GPTQ (Frantar et al., 2023): quantize a weight column by column, spreading each column's rounding error
over the columns still to do, so as to minimise the layer's output error on calibration data
||X W^T - X Q^T||^2, whose Hessian is H = 2/n X^T X.

The format decides what the codes mean: scales (zero points, the NVFP4 tensor scale) are fixed first, or per
group when the group's first column comes up, and each column is rounded against them (formats/fixed.py).
Linear layers and Conv1d/Conv2d with groups=1 (a conv is a Linear over unfolded input patches) use GPTQ;
grouped convolutions and embeddings use round-to-nearest.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import by_token, layer_masks, run_sequential
from ..formats import Format, QTensor, grid, parse_format, quantize_tensor
from ..formats.fixed import encode_values, nvfp4_block_scales, quantize_with_params


@dataclass(frozen=True)
class Config:
    method: ClassVar[str] = "gptq"
    needs_calib: ClassVar[bool] = True
    damp: float = 0.01  # added to diag(H): this fraction of its mean
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = True  # columns in order of decreasing H_ii (scales stay those of the original groups)
    static_groups: bool = False  # group scales from the original weight, before any error is spread

    def __post_init__(self):
        if not self.damp >= 0:
            raise ValueError(f"gptq damp must be >= 0, got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"gptq block_size must be >= 1, got {self.block_size}")


def hessian(xs: Iterable[torch.Tensor]) -> torch.Tensor:
    """H [K, K] = 2/n sum_t x_t x_t^T over the n rows of all inputs (each [..., K]): float32 products per
    input, accumulated in float64 (the products dominate the cost; their sums are what loses precision)."""
    h, n = None, 0
    for x in xs:
        x = x.reshape(-1, x.shape[-1]).float()  # [T, K]
        p = (x.T @ x).double()
        h = p if h is None else h + p
        n += x.shape[0]
    if h is None or n == 0:
        raise ValueError("hessian needs at least one input row")
    return h * (2.0 / n)


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, [K, K] float64. Dead columns (H_ii = 0)
    get a unit diagonal of the live mean, which leaves them uncoupled: they are simply rounded to nearest."""
    h = h.double().clone()
    d = torch.diagonal(h)  # [K], a view
    dead = d == 0
    live_mean = d[~dead].mean() if bool((~dead).any()) else torch.tensor(1.0, dtype=h.dtype)
    d[dead] = live_mean
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(6):  # not positive definite (duplicate inputs, too little data): damp harder
        lam = damp if attempt == 0 else max(damp, 1e-4) * 10**attempt
        low, info = torch.linalg.cholesky_ex(h + lam * d.mean() * eye)
        if info == 0:
            up, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if info == 0:
                return up
    raise ValueError("GPTQ: the Hessian is not positive definite even with strong damping")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, fmt: Format | str, config: Config = Config(),
                  mse: bool | None = None, keep: torch.Tensor | None = None) -> QTensor:
    """Quantize w [N, K] (or [N, ...], seen as [N, K]) given the Hessian h [K, K] of its input.
    `mse` is the clipping-search flag passed on to the format's scale rule. `keep` (bool, w's shape): the
    values of a pruned weight; the others are set to exactly zero and their error is compensated too."""
    fmt = parse_format(fmt)
    shape = tuple(w.shape)
    w0 = w.detach().float().reshape(shape[0], -1)  # [N, K]
    n, k = w0.shape
    if keep is not None:
        keep = keep.reshape(n, k).bool()
        w0 = torch.where(keep, w0, 0.0)
    if tuple(h.shape) != (k, k):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not fit a weight with {k} input columns")
    rtn = quantize_tensor(w0, fmt, mse=mse)  # per-tensor/channel scales, static groups, the NVFP4 tensor scale
    scale = rtn.scale.clone()  # [rows, groups]
    zero = rtn.zero.clone() if rtn.zero is not None else None
    gscale = rtn.global_scale
    _, n_groups, gs = grid(fmt, (n, k))
    grouped = fmt.granularity == "group"
    group_of = torch.arange(k) // gs if grouped else torch.zeros(k, dtype=torch.long)  # column -> scale column

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if config.act_order else torch.arange(k)
    inv = torch.argsort(perm)  # column -> position
    dynamic: dict[int, int] = {}  # position -> group whose scales are chosen there
    if grouped and not config.static_groups:
        for g in range(n_groups):
            dynamic[int(inv[g * gs:(g + 1) * gs].min())] = g
    u = inverse_cholesky(h[perm][:, perm], config.damp).float()  # [K, K]
    wp = w0[:, perm].clone()  # [N, K] in processing order, updated in place
    keep_p = None if keep is None else keep[:, perm]
    q = torch.zeros_like(wp)  # [N, K] chosen values
    for b0 in range(0, k, config.block_size):
        b1 = min(b0 + config.block_size, k)
        err = torch.zeros(n, b1 - b0)  # [N, B] scaled errors of this block's columns
        for j in range(b0, b1):
            if j in dynamic:  # the group's first column: its scales from the weights as they are now
                g = dynamic[j]
                pos = inv[g * gs:(g + 1) * gs]  # positions of its columns (all >= j)
                cur = wp[:, pos]  # [N, g'] ; columns past the block still owe this block's updates
                late = pos >= b1
                if bool(late.any()):
                    cur[:, late] -= err[:, : j - b0] @ u[b0:j, pos[late]]
                _set_group_params(cur, fmt, g, scale, zero, gscale, mse)
            c = int(group_of[perm[j]])
            col = wp[:, j]  # [N]
            _, qc = encode_values(col, fmt, scale[:, c], None if zero is None else zero[:, c], gscale)
            if keep_p is not None:  # pruned: exactly zero, the error spread like a rounding error
                qc = torch.where(keep_p[:, j], qc, 0.0)
            q[:, j] = qc
            e = (col - qc) / u[j, j]  # [N]
            wp[:, j + 1:b1] -= e[:, None] * u[j, j + 1:b1][None, :]
            err[:, j - b0] = e
        wp[:, b1:] -= err @ u[b0:b1, b1:]
    params = QTensor(fmt, shape, rtn.codes, scale, zero, gscale)
    return quantize_with_params(q[:, inv].reshape(shape), fmt, params)


def _set_group_params(cur: torch.Tensor, fmt: Format, g: int, scale, zero, gscale, mse) -> None:
    """Scales (zero points) of group g chosen from its current columns cur [N, g'] (in place)."""
    if fmt.kind == "nvfp4":  # block scales under the tensor scale of the original weight
        block = F.pad(cur, (0, fmt.group_size - cur.shape[1]))  # [N, 16]
        scale[:, g] = nvfp4_block_scales(block, gscale)
        return
    qg = quantize_tensor(cur, fmt, mse=mse)  # one group: scale [N, 1]
    scale[:, g] = qg.scale[:, 0]
    if zero is not None:
        zero[:, g] = qg.zero[:, 0]


def gptq_able(m: nn.Module) -> bool:
    """Layers GPTQ handles: Linear, and Conv1d/Conv2d without channel groups."""
    return type(m) is nn.Linear or (type(m) in (nn.Conv1d, nn.Conv2d) and m.groups == 1)


def layer_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the weight (as [out, K]) multiplies: x [..., K] for Linear, unfolded input patches [T, K] for
    Conv1d/Conv2d (K = in * prod(kernel), in the weight's own order)."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, m.in_features)
    conv1 = isinstance(m, nn.Conv1d)
    if x.dim() == (2 if conv1 else 3):  # unbatched
        x = x.unsqueeze(0)
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)  # also covers padding="same"
    if conv1:  # [B, C, L] as a 1-pixel-high image
        x = x.unsqueeze(2)
        cols = F.unfold(x, (1, m.kernel_size[0]), dilation=(1, m.dilation[0]), stride=(1, m.stride[0]))
    else:
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride)  # [B, K, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def data_rows(module: nn.Module, inputs: list[torch.Tensor], masks: list) -> Iterable[torch.Tensor]:
    """The rows [T, K] the layer's weight multiplies, one block per calibration input, with the padded tokens of a
    Linear layer's inputs left out (`masks`: calibrate.token_masks of the calibration batches; they are not data)."""
    if isinstance(module, nn.Linear):
        inputs = by_token(inputs, masks)
    return (layer_rows(module, x) for x in inputs)


def apply(model, plans, calib, config: Config, ctx) -> None:
    if calib is None:
        raise ValueError("gptq needs calibration data (calib=...)")
    todo = {p.name: p for p in plans if gptq_able(p.module)}

    def rtn(p) -> None:
        ctx.commit(p, quantize_tensor(p.module.weight.detach(), p.weights, mse=ctx.mse))

    for p in plans:  # embeddings, grouped convs: round-to-nearest, before the layers that consume them run
        if p.name not in todo:
            rtn(p)
    masks = layer_masks(model, calib) if todo else (lambda name: [])

    def process(name: str, module: nn.Module, inputs: list[torch.Tensor]) -> None:
        p = todo[name]
        h = hessian(data_rows(module, inputs, masks(name)))  # [K, K]
        ctx.commit(p, gptq_quantize(module.weight, h, p.weights, config, mse=ctx.mse, keep=p.mask))

    if todo:
        run_sequential(model, calib, list(todo), process, ctx.progress)
    # a layer that never ran on the calibration data is left to quantize_, which rounds it to nearest and says so
