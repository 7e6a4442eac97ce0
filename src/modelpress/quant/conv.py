"""QuantConv1d / QuantConv2d (grouped and depthwise too): native int8/int4 kernels where they apply (kernels/),
else the dequantize-then-convolve reference path.

The weight [out, in/groups, *kernel] is quantized as a matrix [out, in/groups * prod(kernel)]. Dynamic
integer activation quantization is per sample; fp8 and static ones are per tensor. The layers are drop-in Conv1d / Conv2d
(`isinstance`, `in_channels`, `.weight` dequantized on access in the float model's dtype).
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import QTensor, quantize_tensor
from . import kernels
from .activation import per_sample_view
from .base import QuantMixin, new_empty

_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
               "padding_mode", "_reversed_padding_repeated_twice", "transposed", "output_padding")


class _QuantConvNd(QuantMixin):
    _float = nn.Conv2d

    def __init__(self, conv: nn.Module, qweight: QTensor, act=None):
        nn.Module.__init__(self)
        if tuple(qweight.shape) != tuple(conv.weight.shape):
            raise ValueError(f"weight shape {tuple(qweight.shape)} does not match {conv}")
        for a in _CONV_ATTRS:
            setattr(self, a, getattr(conv, a))
        self._init_quant(qweight, act, float_dtype=conv.weight.dtype)
        b = conv.bias
        self.register_parameter("bias", nn.Parameter(b.detach().clone(), requires_grad=False) if b is not None else None)
        self._adopt(conv)

    @classmethod
    def from_float(cls, m: nn.Module, fmt, act=None, qweight: QTensor | None = None):
        return cls(m, qweight if qweight is not None else quantize_tensor(m.weight.detach(), fmt), act)

    @classmethod
    def empty_like(cls, m: nn.Module, fmt, act=None):
        return cls(m, new_empty(fmt, m.weight.shape), act)

    @property
    def weight(self) -> torch.Tensor:
        return self._read_param("weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # (the weight would be decoded to x's dtype: integer zeros)
            raise RuntimeError(f"{type(self).__name__}: input of dtype {x.dtype}; a convolution takes floating-point "
                               "inputs (as its float layer does)")
        y = kernels.forward(self, x, "conv")  # None: no kernel for this layer, input or CPU
        return self.reference(x) if y is None else y

    def quantize_conv_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None and not self.act.static:
            return self.quantize_input(per_sample_view(x)).reshape(x.shape)
        return self.quantize_input(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize-then-convolve."""
        x = self.quantize_conv_input(x)
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, w, b)  # the float class's: reads stride/padding/... from self

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, {self.quant_extra_repr()}")


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    _float = nn.Conv1d


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    _float = nn.Conv2d
