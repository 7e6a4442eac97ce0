"""transformers' `Conv1D` (GPT-2, GPT, ...): y = x @ W + b with W stored [in, out], i.e. a Linear whose weight is
transposed. It is quantized as the Linear it is (codes on the [out, in] matrix, groups along the inputs, the
Linear kernels), and still answers what Conv1D's users read: `.weight` of shape [in, out], `nf`, `nx`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import QTensor
from .base import new_empty
from .linear import QuantLinear

CONV1D = "transformers.pytorch_utils.Conv1D"  # matched by name: transformers is never imported for it


def is_conv1d(m: nn.Module) -> bool:
    """`m` is a transformers Conv1D (matched by its class's name)."""
    return f"{type(m).__module__}.{type(m).__qualname__}" == CONV1D


def linear_view(conv: nn.Module) -> nn.Linear:
    """An nn.Linear computing what `conv` computes, sharing its storage (weight = conv.weight.t(), no copy), so
    every method that handles Linear layers handles Conv1D. It remembers the Conv1D it stands for."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = conv.weight.shape
    lin.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=conv.weight.requires_grad)
    lin.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=conv.bias.requires_grad)
    lin.train(conv.training)
    object.__setattr__(lin, "_conv1d", conv)  # not a child module
    return lin


class QuantHFConv1D(QuantLinear):
    _float = None

    @classmethod
    def from_float(cls, m: nn.Module, fmt, act=None, qweight: QTensor | None = None,
                   smooth: torch.Tensor | None = None) -> "QuantHFConv1D":
        """`m`: a Conv1D, or its `linear_view` (what quantize_ hands the algorithms)."""
        conv = getattr(m, "_conv1d", m)
        lin = m if isinstance(m, nn.Linear) else linear_view(m)
        q = super().from_float(lin, fmt, act, qweight, smooth)
        q._adopt(conv)  # nf, nx and the Conv1D class (for dequantize)
        return q

    @classmethod
    def empty_like(cls, m: nn.Module, fmt, act=None, smooth: bool = False) -> "QuantHFConv1D":
        nx, nf = m.weight.shape
        return cls.from_float(m, fmt, act, new_empty(fmt, (nf, nx)), torch.ones(nx) if smooth else None)

    @staticmethod
    def qshape_of(m: nn.Module) -> tuple[int, ...]:
        return tuple(m.weight.shape[::-1])

    def float_param(self, name: str) -> torch.Tensor:
        return super().float_param(name).t().contiguous()  # [in, out], as Conv1D holds it

    def extra_repr(self) -> str:
        return f"nf={self.out_features}, nx={self.in_features}, {self.quant_extra_repr()}"
