"""Activation quantization: what `activations="int8"` / `"int8:static"` / `"fp8_e4m3"` mean.

- `int8`: dynamic, per token (one scale and zero point per row of the last dimension), asymmetric uint8.
- `int8:static`: per tensor, asymmetric uint8, range calibrated once from `calib` by an observer.
- `int4` (`int2` ... `int7`), optionally `:static`: the same with unsigned codes of that width (emulated).
- `fp8_e4m3` / `fp8_e5m2` (optionally `:static`): emulated; one scale per tensor, dynamic by default.
For convolutions "per token" means per sample. The reference path quantizes then dequantizes (fake quant);
int8 kernels consume the same codes, so both paths compute the same numbers up to float rounding. NaN and Inf
inputs pass through the fake quantization (and the kernels hand such inputs to the reference path), so outputs
carry them as the float layer's would. The gradient is straight-through (identity).
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from ..formats.floats import decode_float, encode_float, max_value

ACT_ELEMENTS = ("int8", "int7", "int6", "int5", "int4", "int3", "int2", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class ActFormat:
    name: str  # "int8" (.. "int2") | "fp8_e4m3" | "fp8_e5m2"
    static: bool = False

    def __str__(self) -> str:
        return self.name + (":static" if self.static else "")

    @property
    def bits(self) -> int:
        """Code width of integer formats (unsigned codes 0 .. 2**bits - 1); 8 for fp8."""
        return int(self.name[3:]) if self.name.startswith("int") else 8


def parse_activation(spec: "str | ActFormat | None") -> ActFormat | None:
    if spec is None or isinstance(spec, ActFormat):
        return spec
    name, *opts = [p.strip() for p in str(spec).lower().split(":")]
    name = {"fp8": "fp8_e4m3"}.get(name, name)
    if name not in ACT_ELEMENTS:
        raise ValueError(f"unsupported activation format {spec!r}; use one of {', '.join(ACT_ELEMENTS)} "
                         "(optionally ':static' or ':dynamic')")
    static = False
    for opt in opts:
        if opt not in ("static", "dynamic"):
            raise ValueError(f"unknown activation option {opt!r} in {spec!r}; use ':static' or ':dynamic'")
        static = opt == "static"
    return ActFormat(name, static)


def uint8_params(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric unsigned scale and integer zero point covering [min(lo, 0), max(hi, 0)] (codes 0 .. 2**bits - 1)."""
    qmax = 2**bits - 1
    lo, hi = lo.clamp(max=0).float(), hi.clamp(min=0).float()
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def quantize_uint8(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8) -> torch.Tensor:
    return torch.clamp(torch.round(x.float() / scale) + zero, 0, 2**bits - 1).to(torch.uint8)


def dynamic_params(x: torch.Tensor, per_token: bool, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (x: [..., K] -> [..., 1]) or per-tensor (-> []) unsigned parameters."""
    if per_token:
        return uint8_params(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits)
    return uint8_params(x.amin(), x.amax(), bits)


def fp8_scale(amax: torch.Tensor, name: str) -> torch.Tensor:
    s = amax.float() / max_value(name)
    return torch.where(s > 0, s, torch.ones_like(s))


_TORCH_FP8 = {"fp8_e4m3": getattr(torch, "float8_e4m3fn", None), "fp8_e5m2": getattr(torch, "float8_e5m2", None)}


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """Round to the fp8 grid (saturating at its largest value). torch's float8 casts round exactly as
    formats.floats does (nearest even, subnormals included; checked in tests) and are many times faster."""
    y = x.float() / scale
    dt = _TORCH_FP8.get(name)
    if dt is not None:
        m = max_value(name)
        return (y.clamp(-m, m).to(dt).float() * scale).to(x.dtype)
    return (decode_float(encode_float(y, name), name) * scale).to(x.dtype)


def fake_quant(x: torch.Tensor, act: ActFormat, scale=None, zero=None, per_token: bool = True) -> torch.Tensor:
    """Quantize-dequantize `x`; static formats take their calibrated `scale` (and `zero`).

    NaN and Inf pass through unchanged, so a quantized layer propagates them as its float layer does; integer
    formats leave them out of dynamic ranges, fp8 does not (a NaN makes its one scale per tensor 1, an Inf makes it
    infinite: fp8_scale). The gradient is straight-through: d out / d x = 1."""
    if act.name.startswith("int"):  # branch-free (traceable): non-finite values are masked out, then put back
        finite = torch.isfinite(x)
        xf = x.detach().masked_fill(~finite, 0)
        if not act.static:
            scale, zero = dynamic_params(xf, per_token, act.bits)
        q = quantize_uint8(xf, scale, zero, act.bits)
        out = torch.where(finite, ((q.float() - zero) * scale).to(x.dtype), x.detach())
    else:
        if not act.static:
            scale = fp8_scale(x.detach().abs().amax(), act.name)
        out = fake_quant_fp8(x.detach(), scale, act.name)
    return x + (out - x).detach() if x.requires_grad else out


def per_sample_view(x: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [N, C*...] so that "per token" for a convolution input means per sample."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # (not -1: an empty batch has no size to infer)
