"""QuantLinear: a Linear whose weight is stored as packed codes + scales; real CPU kernels where they exist."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QTensor, quantize_tensor
from . import kernels
from .base import QuantMixin, float_dtype_of, new_empty


class QuantLinear(QuantMixin, nn.Linear):
    """A drop-in nn.Linear: `isinstance(q, nn.Linear)`, `q.in_features`, and `q.weight` (dequantized on access,
    in the float model's dtype, smoothing undone) all answer as the float layer did."""

    _float = nn.Linear

    def __init__(self, in_features: int, out_features: int, qweight: QTensor, bias: torch.Tensor | None = None,
                 act=None, smooth: torch.Tensor | None = None, float_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        if tuple(qweight.shape) != (out_features, in_features):
            raise ValueError(f"weight shape {tuple(qweight.shape)} does not match Linear({in_features}, {out_features})")
        self.in_features, self.out_features = in_features, out_features
        if smooth is not None and smooth.numel() != in_features:
            raise ValueError(f"smoothing vector has {smooth.numel()} entries, the layer has {in_features} inputs")
        self._init_quant(qweight, act, smooth, float_dtype or float_dtype_of(bias))
        self.register_parameter("bias", nn.Parameter(bias.detach().clone(), requires_grad=False)
                                if bias is not None else None)
        self._adopt(None, ("in_features", "out_features"))

    @classmethod
    def from_float(cls, m: nn.Linear, fmt, act=None, qweight: QTensor | None = None,
                   smooth: torch.Tensor | None = None) -> "QuantLinear":
        """`qweight` must already include the smoothing (W * smooth) when `smooth` is given."""
        if qweight is None:
            w = m.weight.detach() if smooth is None else m.weight.detach() * smooth.reshape(1, -1)
            qweight = quantize_tensor(w, fmt)
        q = cls(m.in_features, m.out_features, qweight, m.bias, act, smooth, m.weight.dtype)
        q._adopt(m)
        return q

    @classmethod
    def empty_like(cls, m: nn.Linear, fmt, act=None, smooth: bool = False) -> "QuantLinear":
        """Buffers of the right shapes, to be filled by load_state_dict."""
        return cls.from_float(m, fmt, act, new_empty(fmt, m.weight.shape), torch.ones(m.in_features) if smooth else None)

    @property
    def weight(self) -> torch.Tensor:
        return self._read_param("weight")

    def float_param(self, name: str) -> torch.Tensor:
        w = self.dequantized_weight(torch.float32, name)
        if hasattr(self, "input_smooth"):  # y = (x / s) (W s)^T = x W^T
            w = w / self.input_smooth.reshape(1, -1)
        return w.to(self.float_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # (the weight would be decoded to x's dtype: integer zeros)
            raise RuntimeError(f"{type(self).__name__}: input of dtype {x.dtype}; a Linear layer takes floating-point "
                               "inputs (as its float layer does)")
        if x.shape[-1] != self.in_features:  # (a reshape below could hide it, or fail naming the wrong sizes)
            raise RuntimeError(f"{type(self).__name__}: input of shape {tuple(x.shape)} has {x.shape[-1]} features, "
                               f"the layer takes {self.in_features}")
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, self.in_features)  # [M, K]
        if "input_smooth" in self._buffers:
            x2 = x2 / self.input_smooth.to(x2.dtype)
        y = kernels.forward(self, x2)  # None: no kernel for this layer, input or CPU
        if y is None:
            y = self.reference(x2)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def reference(self, x2: torch.Tensor) -> torch.Tensor:
        """Dequantize-then-compute: x [M, K] -> [M, N]."""
        xq = self.quantize_input(x2)
        return F.linear(xq, self.dequantized_weight(x2.dtype), None if self.bias is None else self.bias.to(x2.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_extra_repr()}"
