"""Quantized modules and their CPU kernels."""
from torch import nn

from .activation import ActFormat, parse_activation
from .attention import QuantMultiheadAttention
from .base import QuantMixin
from .conv import QuantConv1d, QuantConv2d
from .conv1d_hf import QuantHFConv1D
from .embedding import QuantEmbedding, QuantEmbeddingBag
from .linear import QuantLinear
from .observers import Observer
from .registry import MULTI_WEIGHT, QUANT_MODULES, QUANT_TYPES, quant_class
from .rnn import QuantGRU, QuantLSTM, QuantRNN


def set_kernels(model: nn.Module, enabled: bool) -> nn.Module:
    """Use real kernels (True, the default) or the dequantize-then-compute reference path (False)."""
    for m in model.modules():
        if isinstance(m, QuantMixin):
            m.use_kernels = enabled
    return model


__all__ = ["QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantEmbeddingBag", "QuantHFConv1D",
           "QuantMultiheadAttention", "QuantLSTM", "QuantGRU", "QuantRNN", "QuantMixin", "ActFormat",
           "parse_activation", "Observer", "QUANT_MODULES", "QUANT_TYPES", "MULTI_WEIGHT", "quant_class", "set_kernels"]
