"""Which quantized module replaces which float module.

Exact types map to their quantized type. A subclass of Linear / Conv1d / Conv2d / Embedding / EmbeddingBag
(BART's scaled word embedding, OPT's learned positions, MultiheadAttention's out_proj ...) gets a quantized
twin: a class deriving from the subclass *and* the quantized type, in that order, so the subclass's own
forward still runs and its `super().forward(...)` is the quantized lookup / matmul. transformers' Conv1D is
matched by name (transformers is never imported for it).
"""
from __future__ import annotations

from functools import lru_cache

from torch import nn

from .attention import QuantMultiheadAttention
from .conv import QuantConv1d, QuantConv2d
from .conv1d_hf import CONV1D, QuantHFConv1D
from .embedding import QuantEmbedding, QuantEmbeddingBag
from .linear import QuantLinear
from .rnn import QuantGRU, QuantLSTM, QuantRNN

# float module type (or "module.QualName") -> quantized module type
QUANT_MODULES: dict = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
    nn.EmbeddingBag: QuantEmbeddingBag,
    nn.MultiheadAttention: QuantMultiheadAttention,
    nn.LSTM: QuantLSTM,
    nn.GRU: QuantGRU,
    nn.RNN: QuantRNN,
    CONV1D: QuantHFConv1D,
}
QUANT_TYPES = {cls.__name__: cls for cls in QUANT_MODULES.values()}
_TWINNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.EmbeddingBag)  # forwards that only read .weight
MULTI_WEIGHT = (QuantMultiheadAttention, QuantLSTM, QuantGRU, QuantRNN)  # several matrices, quantized weight-only


@lru_cache(maxsize=None)
def _twin(float_cls: type, qcls: type) -> type:
    if isinstance(getattr(float_cls, "weight", None), property):
        return None  # the subclass computes its own weight (parametrizations): not ours to replace
    return type(qcls.__name__, (float_cls, qcls), {"__init__": qcls.__init__, "__module__": qcls.__module__,
                                                   "__qualname__": f"{qcls.__name__}[{float_cls.__name__}]",
                                                   "_float": float_cls})


def quant_class(m: nn.Module) -> type | None:
    """The quantized module type that replaces `m`, or None when there is none."""
    t = type(m)
    q = QUANT_MODULES.get(t) or QUANT_MODULES.get(f"{t.__module__}.{t.__qualname__}")
    if q is not None:
        return q
    for base in _TWINNABLE:
        if issubclass(t, base) and not any(issubclass(t, v) for v in QUANT_TYPES.values()):
            return _twin(t, QUANT_MODULES[base])
    return None

