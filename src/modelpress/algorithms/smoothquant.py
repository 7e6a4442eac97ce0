"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8 quantization.

Per Linear layer with calibration inputs x [T, K] and weight W [N, K]: s_k = max|x_k|^alpha / max|W_k|^(1-alpha)
divides the input channels and multiplies the weight columns, so the float output is unchanged,
(x / s) (W s)^T = x W^T, while the flattened activations become easier to quantize. alpha is given, or chosen
on a grid to minimise the output error with the layer's actual activation format (fake-quantized: per-token
dynamic or calibrated static) and round-to-nearest weights. The layer keeps s as its `input_smooth` buffer;
static activation ranges are recomputed on the smoothed inputs. Non-Linear planned layers get RTN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import rtn_then_sequential
from ..formats import Format, dequantize_tensor, quantize_tensor
from ..quant.activation import ActFormat, fake_quant, fp8_scale, uint8_params

ALPHAS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


@dataclass(frozen=True)
class Config:
    method: ClassVar[str] = "smoothquant"
    needs_calib: ClassVar[bool] = True
    alpha: float | None = None  # migration strength in [0, 1]; None = searched over ALPHAS per layer
    n_tokens: int = 4096  # calibration tokens per layer used by the search (evenly spaced, deterministic)

    def __post_init__(self):
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"smoothquant alpha must be in [0, 1], got {self.alpha}")


def smooth_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = act^alpha / w^(1 - alpha), clamped to [1e-5, 1e5]; 1 for dead channels (act or w all zero)."""
    a, w = act_absmax.float(), w_absmax.float()
    dead = (a <= 0) | (w <= 0) | ~torch.isfinite(a)
    s = a.clamp(min=1e-12).pow(alpha) / w.clamp(min=1e-12).pow(1 - alpha)
    return torch.where(dead, torch.ones_like(s), s.clamp(1e-5, 1e5))


def static_input_range(x: torch.Tensor, act: ActFormat | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, zero) of a static activation format covering x [T, K] (min/max); None for dynamic or none."""
    if act is None or not act.static:
        return None
    if act.name.startswith("int"):
        return uint8_params(x.amin(), x.amax(), act.bits)
    return fp8_scale(x.abs().amax(), act.name), torch.zeros(())


def fake_quant_input(x: torch.Tensor, act: ActFormat | None, fit: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] as a quantized Linear sees it: per-token dynamic, or static with the range of `fit` (default x)."""
    if act is None:
        return x
    rng = static_input_range(x if fit is None else fit, act)
    return fake_quant(x, act, *rng) if rng is not None else fake_quant(x, act, per_token=True)


def layer_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, wfmt: Format | str, act: ActFormat | None,
                mse: bool | None = None, fit: torch.Tensor | None = None) -> float:
    """|| x W^T - fq(x / s) Q(W s)^T ||^2 for x [T, K], w [N, K], s [K]; a static range comes from `fit` / s."""
    wq = dequantize_tensor(quantize_tensor(w * s, wfmt, mse=mse))  # [N, K]
    xq = fake_quant_input(x / s, act, None if fit is None else fit / s)
    return (x @ w.T - xq @ wq.T).pow(2).sum().item()


def search_alpha(x: torch.Tensor, w: torch.Tensor, wfmt: Format | str, act: ActFormat | None,
                 alphas=ALPHAS, mse: bool | None = None) -> tuple[float | None, torch.Tensor]:
    """(alpha, s [K]) minimising the quantized output error of inputs x [T, K] through weight w [N, K].

    Held out: s (and a static range) come from the first half of the tokens, the error from the second half,
    so that an alpha fitted to the calibration maxima (which clips more on new data) is not preferred. No
    smoothing (s = 1) is a candidate too, returned as alpha None. The returned s uses all the tokens."""
    x, w = x.float(), w.detach().float()
    fit, ev = (x[: x.shape[0] // 2], x[x.shape[0] // 2:]) if x.shape[0] >= 2 else (x, x)
    a_fit, w_max = fit.abs().amax(0), w.abs().amax(0)  # [K], [K]
    best = (layer_error(ev, w, torch.ones(x.shape[1]), wfmt, act, mse, fit), None)
    for alpha in alphas:
        err = layer_error(ev, w, smooth_factors(a_fit, w_max, alpha), wfmt, act, mse, fit)
        if err < best[0]:
            best = (err, alpha)
    alpha = best[1]
    return alpha, torch.ones(x.shape[1]) if alpha is None else smooth_factors(x.abs().amax(0), w_max, alpha)


def subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most `n` rows of x [T, K], evenly spaced (deterministic)."""
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).round().long()]


def apply(model, plans, calib, config: Config, ctx) -> None:
    def process(p, module: nn.Module, inputs: list[torch.Tensor]) -> None:
        x = torch.cat([t.reshape(-1, module.in_features) for t in inputs]).float()  # [T, K]
        w = module.weight.detach().float()  # [N, K]
        if config.alpha is None:
            alpha, s = search_alpha(subsample(x, config.n_tokens), w, p.weights, p.activations, mse=ctx.mse)
        else:
            alpha, s = config.alpha, smooth_factors(x.abs().amax(0), w.abs().amax(0), config.alpha)
        q = quantize_tensor(w * s, p.weights, mse=ctx.mse)
        ctx.commit(p, q, smooth=None if alpha is None else s, input_range=static_input_range(x / s, p.activations))

    # embeddings and convolutions: round-to-nearest; Linear layers through the calibration runner
    rtn_then_sequential(model, plans, calib, ctx, "smoothquant", lambda p: type(p.module) is nn.Linear, process)
