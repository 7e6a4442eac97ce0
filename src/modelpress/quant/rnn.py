"""QuantLSTM / QuantGRU / QuantRNN: recurrent layers with their weight matrices quantized (weight-only).

Every `weight_ih_l*`, `weight_hh_l*` (and LSTM `weight_hr_l*`) matrix is stored packed; biases stay float.
torch's own forward runs unchanged on the weights decoded once per call; `layer.weight_ih_l0` and
`layer.all_weights` give the decoded values as the float layer gave its parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import QTensor, quantize_tensor
from .base import QuantMixin, materialized, new_empty


def weight_names(m: nn.RNNBase) -> tuple[str, ...]:
    return tuple(n for n in m._flat_weights_names if n.startswith("weight_"))


class _QuantRNNBase(QuantMixin):
    def __init__(self, m: nn.RNNBase, qweights: dict[str, QTensor]):
        nn.Module.__init__(self)
        names = weight_names(m)
        if set(qweights) != set(names):
            raise ValueError(f"{type(m).__name__} quantizes {', '.join(names)}; got {', '.join(qweights)}")
        for n in names:
            if tuple(qweights[n].shape) != tuple(getattr(m, n).shape):
                raise ValueError(f"{n}: weight shape {tuple(qweights[n].shape)} does not match "
                                 f"{tuple(getattr(m, n).shape)}")
        self._init_quant({n: qweights[n] for n in names}, None, float_dtype=getattr(m, names[0]).dtype)
        self._adopt(m)  # mode, sizes, _flat_weights_names ...; biases (float)
        self.__dict__["_flat_weight_refs"] = [None] * len(self._flat_weights_names)

    @classmethod
    def from_float(cls, m: nn.RNNBase, fmt, act=None, qweight: dict[str, QTensor] | None = None,
                   mse: bool | None = None):
        if act is not None:
            raise ValueError(f"{type(m).__name__} weights are quantized weight-only")
        if qweight is None:
            qweight = {n: quantize_tensor(getattr(m, n).detach(), fmt, mse=mse) for n in weight_names(m)}
        return cls(m, qweight)

    @classmethod
    def empty_like(cls, m: nn.RNNBase, fmt, act=None):
        return cls(m, {n: new_empty(fmt, getattr(m, n).shape) for n in weight_names(m)})

    @staticmethod
    def qshape_of(m: nn.Module) -> tuple[int, ...]:
        return tuple(getattr(m, weight_names(m)[0]).shape)

    @staticmethod
    def float_weights(m: nn.RNNBase) -> dict[str, torch.Tensor]:
        return {n: getattr(m, n) for n in weight_names(m)}

    def __getattr__(self, name: str):
        if name in self.__dict__.get("qshapes", ()):
            return self._read_param(name)
        return super().__getattr__(name)

    @property
    def _flat_weights(self) -> list:
        """What torch's RNN forward hands the kernel: decoded weights and the float biases, in order."""
        return [getattr(self, n) for n in self._flat_weights_names]

    @_flat_weights.setter
    def _flat_weights(self, value) -> None:  # torch rebuilds it after _apply / unpickling: always derived here
        pass

    def _init_flat_weights(self) -> None:
        self.__dict__["_flat_weight_refs"] = [None] * len(self._flat_weights_names)

    def _update_flat_weights(self) -> None:
        pass

    def flatten_parameters(self) -> None:  # cuDNN's flat weight buffer would be a float copy: not kept
        pass

    def forward(self, *args, **kwargs):
        with materialized(self):
            return super().forward(*args, **kwargs)

    def to_float(self) -> nn.Module:
        f = super().to_float()
        f._init_flat_weights()
        return f

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, {self.quant_extra_repr()}"


class QuantLSTM(_QuantRNNBase, nn.LSTM):
    _float = nn.LSTM


class QuantGRU(_QuantRNNBase, nn.GRU):
    _float = nn.GRU


class QuantRNN(_QuantRNNBase, nn.RNN):
    _float = nn.RNN
