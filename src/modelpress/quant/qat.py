"""QAT layers: float layers whose forward fake-quantizes the weight (and the input) exactly as the packed layer
they convert to (`QuantLinear`, `QuantConv1d/2d`, `QuantEmbedding`, `QuantEmbeddingBag`) computes.

Each QAT layer is a subclass of the float layer it replaces (a `QATLinear` is an `nn.Linear`, its `.weight`
the float parameter being trained) with submodules `weight_quant` (a WeightFakeQuant), `input_quant` (an
ActFakeQuant, or None) and, with FAT, `transform`. Their forward mirrors the packed layer's reference path
step by step, so `convert_` (modelpress.train.qat) gives outputs bit-identical to the fake-quant forward.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QTensor
from .activation import per_sample_view
from .qat_quantizers import ActFakeQuant, FrequencyTransform, WeightFakeQuant, row_local


_QAT_CHILDREN = ("weight_quant", "input_quant", "transform")


def refuse_qat(model: nn.Module, what: str, include=None, exclude=None,
               advice: str = "call mp.convert_(model) first, which turns QAT layers into the packed quantized layers"
               ) -> None:
    """Raise naming the first QAT layer of `model` (of those the include / exclude patterns select): `what` needs
    real quantized layers (convert_ first)."""
    from ..select import selected

    for name, m in model.named_modules():
        if isinstance(m, QATMixin) and selected(name, include, exclude):
            raise ValueError(f"{what}: layer {name or type(m).__name__!r} is a QAT layer (prepare_qat_): {advice}")


class QATMixin:
    _float_type: type = nn.Module
    weight_quant: WeightFakeQuant
    input_quant: ActFakeQuant | None
    transform: FrequencyTransform | None

    @classmethod
    def adopt(cls, m: nn.Module, weight_quant: WeightFakeQuant, input_quant: ActFakeQuant | None = None,
              transform: FrequencyTransform | None = None) -> "QATMixin":
        """A QAT layer built around the float layer `m`: it shares m's parameters (same Parameter objects)."""
        if type(m) is not cls._float_type:
            raise TypeError(f"{cls.__name__} wraps {cls._float_type.__name__}, got {type(m).__name__}")
        q = cls.__new__(cls)
        q.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in m.__dict__.items()})
        q.weight_quant, q.input_quant = weight_quant, input_quant
        q.transform = transform
        return q.train(m.training)  # the new submodules follow the layer's mode

    def float_module(self) -> nn.Module:
        """The float layer this QAT layer was built around, without the quantizers (same parameter objects,
        attributes, buffers and children): what `convert_` hands to the packed layer's `from_float`."""
        f = self._float_type.__new__(self._float_type)
        f.__dict__.update(self.__dict__)
        f._parameters = dict(self._parameters)
        f._buffers = {k: v for k, v in self._buffers.items() if k != "input_smooth"}
        f._non_persistent_buffers_set = set(self._non_persistent_buffers_set) - {"input_smooth"}
        f._modules = {k: v for k, v in self._modules.items() if k not in _QAT_CHILDREN}
        return f

    def latent_weight(self) -> torch.Tensor:
        """The weight that is quantized: the float parameter, through the FAT transform if any."""
        return self.weight if self.transform is None else self.transform(self.weight)

    def fake_weight(self) -> torch.Tensor:
        return self.weight_quant(self.latent_weight())

    def qweight(self) -> QTensor:
        """The packed weight `convert_` stores: exactly what the eval-mode forward uses."""
        with torch.no_grad():
            return self.weight_quant.qtensor(self.latent_weight())

    def _input(self, x: torch.Tensor, per_sample: bool) -> torch.Tensor:
        iq = self.input_quant
        if iq is None:
            return x
        iq.observe(x)
        if per_sample and not iq.act.static:
            return iq(per_sample_view(x)).reshape(x.shape)
        return iq(x)


class QATLinear(QATMixin, nn.Linear):
    _float_type = nn.Linear

    def set_smooth(self, smooth: torch.Tensor) -> None:
        """Divide inputs by this per-input-channel vector (the latent weight then holds W * smooth), as the
        `input_smooth` of a QuantLinear from AWQ / SmoothQuant."""
        self.register_buffer("input_smooth", smooth.detach().float().reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # mirrors QuantLinear.forward / reference
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if hasattr(self, "input_smooth"):
            x2 = x2 / self.input_smooth.to(x2.dtype)
        if self.input_quant is not None:
            self.input_quant.observe(x)
            x2 = self.input_quant(x2)
        w = self.fake_weight().to(x2.dtype)
        y = F.linear(x2, w, None if self.bias is None else self.bias.to(x2.dtype))
        return y.reshape(*lead, self.out_features)


class _QATConvNd(QATMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # mirrors _QuantConvNd.forward
        x = self._input(x, per_sample=True)
        w = self.fake_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, w, b)


class QATConv1d(_QATConvNd, nn.Conv1d):
    _float_type = nn.Conv1d


class QATConv2d(_QATConvNd, nn.Conv2d):
    _float_type = nn.Conv2d


def _fake_rows(layer: QATMixin, uniq: torch.Tensor) -> torch.Tensor:
    """Fake-quantized rows `uniq` of the table (only those rows are quantized when the format is row-local)."""
    if uniq.numel() == 0:
        return torch.zeros(0, layer.embedding_dim)
    w = layer.latent_weight()
    if row_local(layer.weight_quant.fmt):
        return layer.weight_quant(w[uniq], rows=uniq)
    return layer.weight_quant(w)[uniq]  # scales span rows (per-tensor, NVFP4): quantize the whole table


class QATEmbedding(QATMixin, nn.Embedding):
    _float_type = nn.Embedding

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # mirrors QuantEmbedding.forward
        uniq, inv = torch.unique(idx, return_inverse=True)
        return _fake_rows(self, uniq)[inv]


class QATEmbeddingBag(QATMixin, nn.EmbeddingBag):
    _float_type = nn.EmbeddingBag

    def forward(self, idx: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:  # mirrors QuantEmbeddingBag
        uniq, inv = torch.unique(idx, return_inverse=True)
        rows = _fake_rows(self, uniq)
        pad = None
        if self.padding_idx is not None:
            hit = (uniq == self.padding_idx).nonzero()
            pad = int(hit[0, 0]) if hit.numel() else None
        return F.embedding_bag(inv.reshape(idx.shape), rows, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights, include_last_offset=self.include_last_offset,
                               padding_idx=pad)


# float module type -> QAT module type (exact types, as QUANT_MODULES)
QAT_MODULES = {cls._float_type: cls for cls in (QATLinear, QATConv1d, QATConv2d, QATEmbedding, QATEmbeddingBag)}
