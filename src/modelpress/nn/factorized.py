"""Low-rank layers: a Linear or convolution replaced by two thinner layers of rank r.

`LowRankLinear`: Linear(in, r, no bias) then Linear(r, out, bias). `LowRankConv`: the original k x k convolution
with r output channels (same stride, padding, dilation) then a 1 x 1 convolution r -> out with the bias. Both
children are plain torch layers, so `quantize_` quantizes them like any other Linear/Conv, and `load` fills them.
"""
from __future__ import annotations

import torch
from torch import nn


def filled(f: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, training: bool) -> nn.Module:
    """Float layer `f` (built with a bias iff `bias` is given) holding copies of `weight` and `bias`, in the
    training mode of the layer it replaces: what the replacement layers' `to_float` hand to `mp.dequantize`."""
    with torch.no_grad():
        f.weight.copy_(weight)
        if bias is not None:
            f.bias.copy_(bias)
    return f.train(training)


def float_weight(layer: nn.Module) -> torch.Tensor:
    """The effective float32 weight of a Linear/Conv, or of its quantized version (a drop-in quantized layer
    decodes `.weight` on access, smoothing undone)."""
    return layer.weight.detach().float()


class LowRankLinear(nn.Module):
    """y = up(down(x)) with down: Linear(in, rank, bias=False), up: Linear(rank, out, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device="meta").to_empty(device="cpu")
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device="meta").to_empty(device="cpu")

    @classmethod
    def empty_like(cls, m: nn.Linear, rank: int) -> "LowRankLinear":
        """Uninitialised layers of the right shapes (values come from a state dict or `set_factors`)."""
        new = cls(m.in_features, m.out_features, rank, m.bias is not None, m.weight.dtype)
        return new.train(m.training).to(m.weight.device)

    def set_factors(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """down [rank, in], up [out, rank]: the layer computes x down^T up^T + bias."""
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)
            if self.up.bias is not None:
                self.up.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent [out, in] (computed, not stored)."""
        return float_weight(self.up) @ float_weight(self.down)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def to_float(self) -> nn.Linear:
        """A dense nn.Linear with the product of the factors (activation quantization is not reproduced)."""
        f = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None)
        return filled(f, self.weight, self.up.bias, self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv(nn.Module):
    """A Conv1d/Conv2d (groups=1) as down: the same convolution with `rank` output channels and no bias, then
    up: a 1 x 1 convolution rank -> out with the bias. Exact composition: conv(x, up * down) = up(down(x))."""

    def __init__(self, conv: nn.Module, rank: int):
        super().__init__()
        if type(conv) not in (nn.Conv1d, nn.Conv2d) or conv.groups != 1:
            raise ValueError(f"LowRankConv takes a Conv1d/Conv2d without groups, got {conv!r}")
        k = conv.in_channels * int(torch.tensor(conv.kernel_size).prod())
        if not 1 <= rank <= min(k, conv.out_channels):
            raise ValueError(f"rank must be in [1, {min(k, conv.out_channels)}], got {rank}")
        cls = self.conv_type = type(conv)
        self.in_channels, self.out_channels, self.rank = conv.in_channels, conv.out_channels, rank
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.padding_mode = conv.dilation, conv.padding_mode
        dt = conv.weight.dtype
        self.down = cls(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                        dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, dtype=dt,
                        device="meta").to_empty(device="cpu")
        self.up = cls(rank, conv.out_channels, 1, bias=conv.bias is not None, dtype=dt,
                      device="meta").to_empty(device="cpu")
        self.train(conv.training)

    @classmethod
    def empty_like(cls, conv: nn.Module, rank: int) -> "LowRankConv":
        return cls(conv, rank).to(conv.weight.device)

    def set_factors(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> "LowRankConv":
        """down [rank, in * prod(kernel)], up [out, rank] (the weight flattened as [out, in * prod(kernel)])."""
        with torch.no_grad():
            self.down.weight.copy_(down.reshape(self.down.weight.shape))
            self.up.weight.copy_(up.reshape(self.up.weight.shape))
            if self.up.bias is not None:
                self.up.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        down = float_weight(self.down)
        up = float_weight(self.up).reshape(self.out_channels, self.rank)
        return (up @ down.reshape(self.rank, -1)).reshape(self.out_channels, *down.shape[1:])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def to_float(self) -> nn.Module:
        """The dense convolution of the original shape with the product of the factors."""
        f = self.conv_type(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                            padding=self.padding, dilation=self.dilation, bias=self.up.bias is not None,
                            padding_mode=self.padding_mode)
        return filled(f, self.weight, self.up.bias, self.training)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}, padding={self.padding}")
