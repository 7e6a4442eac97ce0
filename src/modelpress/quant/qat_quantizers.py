"""The fake quantizers that QAT layers hold: `WeightFakeQuant` (weights, every weight format) and `ActFakeQuant`
(layer inputs, every activation format), plus `FrequencyTransform` (FAT).

WeightFakeQuant scales:
- `dynamic`: recomputed from the current weights at every forward by the format's own rule (`quantize_tensor`);
- `frozen`: computed once from the initial weights and kept (codes follow the weights, scales do not);
- `learned`: LSQ step sizes (and zero points for asymmetric integers), trained with the weights.
Training-time subsets (`noise`): each training forward picks `rate` of the weight's blocks; QuantNoise
fake-quantizes only those and keeps the rest float, FST puts them at the low width and the rest at a higher
format. In eval mode every block is at the layer's format, as after `convert_`.

ActFakeQuant ranges (static formats): `ema` (moving average of each batch's min/max), `minmax` (running
min/max), `granular` (moving average of per-sample percentiles), `frozen` (from calibration, kept),
`learned` (LSQ-style trainable lo/hi). Ranges update in training mode only. Dynamic formats need no state.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import Format, QTensor, dequantize_tensor, quantize_tensor
from ..formats.fixed import encode_values, quantize_with_params
from ..formats.qtensor import _scale_dtype
from .activation import ActFormat, fake_quant, fp8_scale, uint8_params
from .fake_quant import (batch_range, block_mask, clip_mask, dct_matrix, frequency_transform, from_grid,
                         lsq_surrogate, to_grid, with_surrogate)
from ..formats.integer import int_range

SCALES = ("dynamic", "frozen", "learned")
RANGES = ("ema", "minmax", "granular", "frozen", "learned")


def row_local(fmt: Format) -> bool:
    """Whether a row's codes depend on that row only (so a subset of rows can be quantized alone)."""
    return fmt.granularity != "tensor" and fmt.kind != "nvfp4"


class WeightFakeQuant(nn.Module):
    def __init__(self, weight: torch.Tensor, fmt: Format, scales: str = "dynamic", mse: bool | None = None,
                 ste: str = "clip", noise: tuple[str, float, int, Format | None] | None = None,
                 ste_clip: float | None = None, seed: int = 0, init: QTensor | None = None):
        """noise: (method, rate, block, high format) with method "quantnoise" or "fst"; ste_clip: pass gradients
        only where |w| <= ste_clip (SensiMix's 1-bit straight-through estimator); init: starting scales (from a
        post-training method) instead of the format's rule on `weight`."""
        super().__init__()
        if scales not in SCALES:
            raise ValueError(f"scales must be one of {SCALES}, got {scales!r}")
        if ste not in ("clip", "identity"):
            raise ValueError(f"ste must be 'clip' or 'identity', got {ste!r}")
        self.fmt, self.mode, self.mse, self.ste, self.noise, self.ste_clip, self.seed = (
            fmt, scales, mse, ste, noise, ste_clip, seed)
        self.num_rows = weight.shape[0] if weight.dim() > 1 else 1
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training forwards so far (noise masks)
        if scales == "dynamic":
            return
        q = init if init is not None else quantize_tensor(weight.detach(), fmt, mse=mse)
        if scales == "learned":
            if fmt.kind not in ("int", "binary", "ternary", "float"):
                raise ValueError(f"learned scales need an integer or small-float format, not {fmt.name}: its block "
                                 "scales are powers of two computed from the weights (use scales='dynamic')")
            self.scale = nn.Parameter(q.scale.float().clone())
            self.zero = nn.Parameter(q.zero.float().clone()) if q.zero is not None else None
        else:
            self.register_buffer("scale", q.scale.clone())
            self.register_buffer("zero", None if q.zero is None else q.zero.clone())
            self.register_buffer("global_scale", None if q.global_scale is None else q.global_scale.clone())

    def _params(self, rows: torch.Tensor | None) -> QTensor | None:
        """The fixed parameters (as a QTensor with empty codes) for frozen / learned scales; rows: a subset."""
        if self.mode == "dynamic":
            return None
        pick = (lambda t: t) if rows is None or self.fmt.granularity == "tensor" else (lambda t: t[rows])
        if self.mode == "learned":
            scale = pick(self.scale.detach()).to(_scale_dtype(self.fmt))
            zero = None
            if self.zero is not None:
                qmin, qmax = int_range(self.fmt.bits, False)
                zero = pick(self.zero.detach()).round().clamp(qmin, qmax).to(torch.uint8)
            return QTensor(self.fmt, (), torch.empty(0, dtype=torch.uint8), scale, zero, None)
        return QTensor(self.fmt, (), torch.empty(0, dtype=torch.uint8), pick(self.scale),
                       None if self.zero is None else pick(self.zero), self.global_scale)

    def qtensor(self, w: torch.Tensor, rows: torch.Tensor | None = None) -> QTensor:
        """The packed weight the forward pass uses for `w` (or for its rows `rows`, then w = weight[rows])."""
        like = self._params(rows)
        if like is None:
            return quantize_tensor(w.detach(), self.fmt, mse=self.mse)
        like.shape = tuple(w.shape)
        return quantize_with_params(w.detach(), self.fmt, like)

    def _surrogate(self, w: torch.Tensor, q: QTensor, rows: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "learned":
            pick = (lambda t: t) if rows is None or self.fmt.granularity == "tensor" else (lambda t: t[rows])
            sd = _scale_dtype(self.fmt)
            s = pick(self.scale)
            s = s + (s.to(sd).float() - s).detach()  # the stored (rounded) scale, with the parameter's gradient
            z = None if self.zero is None else pick(self.zero).unsqueeze(-1)
            return from_grid(lsq_surrogate(to_grid(w, self.fmt), self.fmt, s.unsqueeze(-1), z), tuple(w.shape))
        if self.ste_clip is not None:
            return w * (w.detach().abs() <= self.ste_clip).to(w.dtype)
        if self.ste == "clip":
            return w * clip_mask(w, q)
        return w

    def _exact(self, w: torch.Tensor, rows: torch.Tensor | None) -> tuple[QTensor, torch.Tensor]:
        """(parameters, fake-quantized values): the values `dequantize_tensor(self.qtensor(w, rows))` gives,
        computed without packing the codes when the scales are fixed."""
        like = self._params(rows)
        if like is None:
            q = quantize_tensor(w.detach(), self.fmt, mse=self.mse)
            return q, dequantize_tensor(q, w.dtype)
        zero = None if like.zero is None else like.zero.unsqueeze(-1)
        _, vals = encode_values(to_grid(w.detach().float(), self.fmt), self.fmt, like.scale.unsqueeze(-1), zero,
                                like.global_scale)
        return like, from_grid(vals, tuple(w.shape)).to(w.dtype)

    def forward(self, w: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantized `w` (the whole weight, or the rows `rows` of it when w = weight[rows])."""
        if rows is not None and not row_local(self.fmt):
            raise ValueError(f"{self.fmt} scales span rows: quantize the whole table")
        q, exact = self._exact(w, rows)
        sur = self._surrogate(w, q, rows)
        if self.noise is not None and self.training:
            exact, sur = self._apply_noise(w, exact, sur, rows)
        return with_surrogate(exact, sur)

    def _apply_noise(self, w, exact, sur, rows):
        method, rate, block, high = self.noise
        full_rows = self._full_rows(w, rows)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
        self.step += 1
        cols = w[0].numel() if w.dim() > 1 else w.numel()
        mask = block_mask(full_rows, cols, block, rate, gen)  # True: at the layer's (low) format
        if rows is not None:
            mask = mask[rows]
        mask = mask.reshape(w.shape)
        if method == "fst":
            qh = quantize_tensor(w.detach(), high)
            other = dequantize_tensor(qh, w.dtype)
            other_sur = w * clip_mask(w, qh) if self.ste == "clip" else w
        else:  # quantnoise: the rest stays float
            other, other_sur = w.detach(), w
        return torch.where(mask, exact, other), torch.where(mask, sur, other_sur)

    def _full_rows(self, w, rows) -> int:
        return (w.shape[0] if w.dim() > 1 else 1) if rows is None else self.num_rows

    def extra_repr(self) -> str:
        n = f", {self.noise[0]} rate={self.noise[1]}" if self.noise else ""
        return f"{self.fmt}, scales={self.mode}{n}"


class ActFakeQuant(nn.Module):
    def __init__(self, act: ActFormat, ranges: str = "ema", momentum: float = 0.9, percentile: float = 99.9):
        super().__init__()
        if ranges not in RANGES:
            raise ValueError(f"activation ranges must be one of {RANGES}, got {ranges!r}")
        self.act, self.mode, self.momentum, self.percentile = act, ranges, momentum, percentile
        self.calibrating = False  # pass inputs through unquantized while ranges are being initialised
        self.observing = True  # False: ranges stay as they are, even in training mode
        self.observer = None  # a modelpress.quant.Observer fed during calibration (frozen / learned ranges)
        if not act.static:
            return
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if ranges == "learned":
            self.lo, self.hi = nn.Parameter(torch.zeros(())), nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("lo", torch.zeros(()))
            self.register_buffer("hi", torch.ones(()))

    def observe(self, x: torch.Tensor) -> None:
        """Update the range from a batch x [N, ...] (training mode or calibration; static formats only)."""
        if not self.act.static or not ((self.training and self.observing) or self.calibrating):
            return
        if self.observer is not None:
            self.observer.update(x)
            return
        if self.mode in ("frozen", "learned") and bool(self.initialized) and not self.calibrating:
            return  # fixed after calibration (or after the first batch without calibration data)
        lo, hi = batch_range(x, "granular" if self.mode == "granular" else "minmax", self.percentile)
        with torch.no_grad():
            if not self.initialized:
                self.lo.copy_(lo), self.hi.copy_(hi), self.initialized.fill_(True)
            elif self.mode == "minmax":
                self.lo.copy_(torch.minimum(self.lo, lo)), self.hi.copy_(torch.maximum(self.hi, hi))
            else:
                m = self.momentum
                self.lo.copy_(m * self.lo + (1 - m) * lo), self.hi.copy_(m * self.hi + (1 - m) * hi)

    def finish_calibration(self) -> None:
        """Take the range from the calibration observer (frozen / learned ranges)."""
        if self.observer is not None:
            lo, hi = self.observer.range()
            with torch.no_grad():
                self.lo.copy_(lo), self.hi.copy_(hi), self.initialized.fill_(True)
        self.observer = None
        self.calibrating = False

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) exactly as a converted layer stores them in input_scale / input_zero."""
        if not bool(self.initialized):
            raise RuntimeError("activation ranges were never observed: run a training batch or pass calib= to "
                               "prepare_qat_ first")
        return static_params(self.act, self.lo.detach(), self.hi.detach())

    def forward(self, x: torch.Tensor, per_token: bool = True) -> torch.Tensor:
        if self.calibrating:
            return x
        if not self.act.static:
            return with_surrogate(fake_quant(x.detach(), self.act, per_token=per_token), x)
        scale, zero = self.params()
        exact = fake_quant(x.detach(), self.act, scale, zero)
        if self.mode == "learned" and self.act.name.startswith("int"):
            return with_surrogate(exact, lsq_act_surrogate(x, self.lo, self.hi, self.act.bits))
        return with_surrogate(exact, x * inside(x, self.act, scale, zero))

    def extra_repr(self) -> str:
        return f"{self.act}, ranges={self.mode}" if self.act.static else str(self.act)


def static_params(act: ActFormat, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of a static activation format for the range [lo, hi] (tensors of any shape)."""
    if act.name.startswith("int"):
        return uint8_params(lo, hi, act.bits)
    return fp8_scale(torch.maximum(lo.abs(), hi.abs()), act.name), torch.zeros_like(lo, dtype=torch.float32)


def inside(x: torch.Tensor, act: ActFormat, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """1 where x is inside the static format's range (the straight-through gradient passes), else 0."""
    if act.name.startswith("int"):
        v = x.detach().float() / scale + zero
        return ((v >= -0.5) & (v <= 2**act.bits - 0.5)).to(x.dtype)
    from ..formats import max_value

    return ((x.detach().float() / scale).abs() <= max_value(act.name)).to(x.dtype)


def lsq_act_surrogate(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Differentiable unsigned fake quantization with trainable range ends (LSQ+-style gradients)."""
    from .fake_quant import grad_scale, round_ste

    qmax = 2**bits - 1
    g = 1.0 / (x.numel() * qmax) ** 0.5
    lo_, hi_ = grad_scale(lo, g).clamp(max=0), grad_scale(hi, g).clamp(min=0)
    s = ((hi_ - lo_) / qmax).clamp(min=1e-8)
    z = round_ste(-lo_ / s).clamp(0, qmax)
    return (round_ste(torch.clamp(x / s + z, 0, qmax)) - z) * s


class FrequencyTransform(nn.Module):
    """FAT (Tao et al., TNNLS 2022): weights are taken to a frequency domain (here an orthonormal DCT of each
    output channel's flattened weights), each frequency scaled by a learned factor 2 * sigmoid(theta) (theta = 0:
    the identity), and taken back before the low-bit grid. Deployed weights are quantize(transform(w))."""

    def __init__(self, cols: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(cols))
        self.register_buffer("dct", dct_matrix(cols), persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return frequency_transform(w, 2 * torch.sigmoid(self.theta), self.dct.to(w.dtype))
