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


def set_kernels(model: nn.Module, enabled: bool = True, mode: str | None = None) -> nn.Module:
    """Use real kernels (True, the default) or the dequantize-then-compute reference path (False), and choose
    the kernel mode: "memory" (packed weights only, the default) or "speed" (a dense float copy of a weight unless a
    packed path is at least 10 % faster than it). Decisions made so far are forgotten (made again on the next call)."""
    from .kernels import check_mode, note_model

    if mode is not None:
        check_mode(mode)
    note_model(model, only_missing=True)  # quantize_ and load noted the whole model; this may be a part of it
    for m in model.modules():
        if isinstance(m, QuantMixin):
            m.use_kernels = enabled
            if mode is not None and mode != m.kernel_mode:
                m.kernel_mode = mode
                m._kernel_plan = {}
                m._kernel_cache.clear()
    return model


def kernel_mode(model: nn.Module) -> str | None:
    """The kernel mode of the model's quantized layers ("memory" / "speed"; "mixed" if they differ; None if none)."""
    modes = {m.kernel_mode for m in model.modules() if isinstance(m, QuantMixin)}
    return None if not modes else (modes.pop() if len(modes) == 1 else "mixed")


__all__ = ["QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantEmbeddingBag", "QuantHFConv1D",
           "QuantMultiheadAttention", "QuantLSTM", "QuantGRU", "QuantRNN", "QuantMixin", "ActFormat",
           "parse_activation", "Observer", "QUANT_MODULES", "QUANT_TYPES", "MULTI_WEIGHT", "quant_class", "set_kernels",
           "kernel_mode"]
