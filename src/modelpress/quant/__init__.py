"""Quantized modules and their CPU kernels."""
from torch import nn

from .activation import ActFormat, parse_activation
from .base import QuantMixin
from .conv import QuantConv1d, QuantConv2d
from .embedding import QuantEmbedding, QuantEmbeddingBag
from .linear import QuantLinear
from .observers import Observer

# float module type -> quantized module type (exact types: subclasses with other forwards are not swapped)
QUANT_MODULES = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
    nn.EmbeddingBag: QuantEmbeddingBag,
}
QUANT_TYPES = {cls.__name__: cls for cls in QUANT_MODULES.values()}


def set_kernels(model: nn.Module, enabled: bool) -> nn.Module:
    """Use real kernels (True, the default) or the dequantize-then-compute reference path (False)."""
    for m in model.modules():
        if isinstance(m, QuantMixin):
            m.use_kernels = enabled
    return model


__all__ = ["QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantEmbeddingBag", "QuantMixin",
           "ActFormat", "parse_activation", "Observer", "QUANT_MODULES", "QUANT_TYPES", "set_kernels"]
