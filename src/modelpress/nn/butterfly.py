"""Deformable butterfly layers (DeBut, Lin et al., NeurIPS 2021): a dense [out, in] weight replaced by a product
of sparse block factors W = B_n ... B_2 B_1, storing only the factors' nonzero blocks.

A chain is a list of (r_i, s_i) pairs with prod(s_i) = in and prod(r_i) = out (sizes need not be powers of two:
that is the "deformable" part). Factor i maps a vector of q_i = b_i * s_i * t_i entries, read as [b_i, s_i, t_i],
to p_i = b_i * r_i * t_i entries [b_i, r_i, t_i]:

    out[b, r, t] = sum_s F_i[b, t, r, s] * in[b, s, t]

i.e. b_i dense (r_i x s_i) blocks for each of the t_i interleaved positions. With t_1 = 1, t_{i+1} = r_i t_i and
b_i = in / (s_1 ... s_i), consecutive factors fit (p_i = q_{i+1}) and the last has one block (b_n = 1), so every
output depends on every input. Factor i holds b_i t_i r_i s_i numbers, which is also its multiply-adds per row.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .factorized import filled


def factor_shapes(chain: list[tuple[int, int]], in_features: int) -> list[tuple[int, int, int, int]]:
    """[(b_i, t_i, r_i, s_i)] of the factors of `chain` (see the module docstring); checks that it fits."""
    if not chain:
        raise ValueError("a butterfly chain needs at least one (r, s) factor")
    if math.prod(s for _, s in chain) != in_features:
        raise ValueError(f"butterfly chain {chain}: the s sizes multiply to {math.prod(s for _, s in chain)}, "
                         f"not the {in_features} inputs")
    shapes, t, rest = [], 1, in_features
    for r, s in chain:
        if not (isinstance(r, int) and isinstance(s, int) and r >= 1 and s >= 1):
            raise ValueError(f"butterfly chain {chain}: sizes must be positive integers")
        rest //= s
        shapes.append((rest, t, r, s))
        t *= r
    return shapes


def chain_params(chain: list[tuple[int, int]], in_features: int) -> int:
    """Numbers stored (= multiply-adds per input row) by the factors of `chain`."""
    return sum(math.prod(shape) for shape in factor_shapes(chain, in_features))


def apply_factor(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x [N, b*s*t] through the factor f [b, t, r, s] -> [N, b*r*t]."""
    b, t, r, s = f.shape
    y = torch.einsum("nbst,btrs->nbrt", x.reshape(-1, b, s, t), f)
    return y.reshape(-1, b * r * t)


def apply_chain(x: torch.Tensor, factors) -> torch.Tensor:
    for f in factors:
        x = apply_factor(x, f)
    return x


def dense(factors, in_features: int) -> torch.Tensor:
    """The dense [out, in] matrix of the product of the factors."""
    eye = torch.eye(in_features, dtype=factors[0].dtype, device=factors[0].device)
    return apply_chain(eye, factors).T


class ButterflyLinear(nn.Module):
    """A Linear whose weight is a product of deformable butterfly factors (`factor{i}` is [b, t, r, s])."""

    def __init__(self, in_features: int, out_features: int, chain: list[tuple[int, int]], bias: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__()
        chain = [tuple(c) for c in chain]
        if math.prod(r for r, _ in chain) != out_features:
            raise ValueError(f"butterfly chain {chain}: the r sizes multiply to {math.prod(r for r, _ in chain)}, "
                             f"not the {out_features} outputs")
        self.in_features, self.out_features, self.chain = in_features, out_features, chain
        for i, shape in enumerate(factor_shapes(chain, in_features)):  # own parameters: one inspect row
            self.register_parameter(f"factor{i}", nn.Parameter(torch.zeros(shape, dtype=dtype)))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @property
    def factors(self) -> list[nn.Parameter]:
        """The factors B_1 ... B_n (applied in this order), each [b, t, r, s]."""
        return [getattr(self, f"factor{i}") for i in range(len(self.chain))]

    @classmethod
    def empty_like(cls, m: nn.Module, chain) -> "ButterflyLinear":
        new = cls(m.in_features, m.out_features, chain, m.bias is not None, m.weight.dtype)
        return new.train(m.training).to(m.weight.device)

    def set_factors(self, factors, bias: torch.Tensor | None) -> "ButterflyLinear":
        with torch.no_grad():
            for p, f in zip(self.factors, factors, strict=True):
                p.copy_(f)
            if self.bias is not None:
                self.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = apply_chain(x.reshape(-1, self.in_features), self.factors)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent [out, in] (computed, not stored)."""
        return dense(self.factors, self.in_features)

    def inspect_row(self) -> tuple[int, str]:
        """(parameters stored, format) for `mp.inspect`."""
        n = sum(p.numel() for p in self.parameters())
        return n, "butterfly " + "·".join(f"{r}x{s}" for r, s in reversed(self.chain))

    def to_float(self) -> nn.Module:
        f = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return filled(f, self.weight, self.bias, self.training)

    def extra_repr(self) -> str:
        n = sum(f.numel() for f in self.factors)
        return (f"in_features={self.in_features}, out_features={self.out_features}, chain={self.chain}, "
                f"nonzeros={n} ({n / (self.in_features * self.out_features):.3f} of dense)")


class ButterflyConv2d(ButterflyLinear):
    """A pointwise (1 x 1, groups=1, no padding) Conv2d as butterfly factors over the channels."""

    def __init__(self, in_channels: int, out_channels: int, chain, bias: bool = True, stride=(1, 1),
                 dtype: torch.dtype | None = None):
        super().__init__(in_channels, out_channels, chain, bias, dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride = tuple(stride)

    @classmethod
    def empty_like(cls, m: nn.Conv2d, chain) -> "ButterflyConv2d":
        if not is_pointwise(m):
            raise ValueError(f"ButterflyConv2d replaces a 1x1 Conv2d without groups or padding, got {m!r}")
        return cls(m.in_channels, m.out_channels, chain, m.bias is not None, m.stride,
                   m.weight.dtype).train(m.training).to(m.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[..., ::self.stride[0], ::self.stride[1]]
        y = super().forward(x.movedim(-3, -1))  # channels last, then back
        return y.movedim(-1, -3)

    @property
    def weight(self) -> torch.Tensor:
        return super().weight[:, :, None, None]

    def to_float(self) -> nn.Module:
        f = nn.Conv2d(self.in_channels, self.out_channels, 1, stride=self.stride, bias=self.bias is not None)
        return filled(f, self.weight, self.bias, self.training)


def is_pointwise(m: nn.Module) -> bool:
    """A Conv2d that is a per-pixel Linear over channels: 1 x 1 kernel, no groups, no padding."""
    return (type(m) is nn.Conv2d and tuple(m.kernel_size) == (1, 1) and m.groups == 1
            and m.padding in ((0, 0), "valid", "same") and tuple(m.dilation) == (1, 1))

