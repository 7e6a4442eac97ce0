"""QuantLinear: a Linear whose weight is stored as packed codes + scales; real CPU kernels where they exist."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QTensor, quantize_tensor
from . import kernels
from .base import QuantMixin, new_empty


class QuantLinear(QuantMixin, nn.Module):
    def __init__(self, in_features: int, out_features: int, qweight: QTensor, bias: torch.Tensor | None = None,
                 act=None, smooth: torch.Tensor | None = None):
        super().__init__()
        if tuple(qweight.shape) != (out_features, in_features):
            raise ValueError(f"weight shape {tuple(qweight.shape)} does not match Linear({in_features}, {out_features})")
        self.in_features, self.out_features = in_features, out_features
        if smooth is not None and smooth.numel() != in_features:
            raise ValueError(f"smoothing vector has {smooth.numel()} entries, the layer has {in_features} inputs")
        self._init_quant(qweight, act, smooth)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_float(cls, m: nn.Linear, fmt, act=None, qweight: QTensor | None = None,
                   smooth: torch.Tensor | None = None) -> "QuantLinear":
        """`qweight` must already include the smoothing (W * smooth) when `smooth` is given."""
        if qweight is None:
            w = m.weight.detach() if smooth is None else m.weight.detach() * smooth.reshape(1, -1)
            qweight = quantize_tensor(w, fmt)
        return cls(m.in_features, m.out_features, qweight, m.bias, act, smooth)

    @classmethod
    def empty_like(cls, m: nn.Linear, fmt, act=None, smooth: bool = False) -> "QuantLinear":
        """Buffers of the right shapes, to be filled by load_state_dict."""
        s = torch.ones(m.in_features) if smooth else None
        return cls(m.in_features, m.out_features, new_empty(fmt, m.weight.shape), m.bias, act, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if "input_smooth" in self._buffers:
            x2 = x2 / self.input_smooth.to(x2.dtype)
        y = kernels.forward(self, x2)  # None: no kernel for this layer, input or CPU
        if y is None:
            y = self.reference(x2)
        return y.reshape(*lead, self.out_features)

    def reference(self, x2: torch.Tensor) -> torch.Tensor:
        """Dequantize-then-compute: x [M, K] -> [M, N]."""
        xq = self.quantize_input(x2)
        return F.linear(xq, self.dequantized_weight(x2.dtype), None if self.bias is None else self.bias.to(x2.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_extra_repr()}"
