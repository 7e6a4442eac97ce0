"""What every quantized layer shares: weight buffers that hold a QTensor, activation settings, kernel switch."""
from __future__ import annotations

import torch
from torch import nn

from ..formats import Format, QTensor, dequantize_tensor, grid, packed_nbytes, parse_format
from ..formats.qtensor import _scale_dtype
from .activation import ActFormat, fake_quant, parse_activation


def _empty_qtensor(fmt: Format, shape: tuple[int, ...]) -> QTensor:
    """Zero buffers with the exact shapes and dtypes a QTensor of this format and shape has (for loading)."""
    rows, groups, g = grid(fmt, shape)
    zero = torch.zeros(rows, groups, dtype=torch.uint8) if fmt.kind == "int" and not fmt.symmetric else None
    gs = torch.ones((), dtype=torch.float32) if fmt.kind == "nvfp4" else None
    return QTensor(fmt, shape, torch.zeros(packed_nbytes(rows * groups * g, fmt.bits), dtype=torch.uint8),
                   torch.zeros(rows, groups, dtype=_scale_dtype(fmt)), zero, gs)


class QuantMixin:
    """Registers `weight_codes`, `weight_scale` (+ `weight_zero`, `weight_global_scale`) and, for static
    activation formats, `input_scale` / `input_zero`. Subclasses are nn.Modules."""

    def _init_quant(self, qweight: QTensor, act: "ActFormat | str | None", smooth: torch.Tensor | None = None) -> None:
        self.weight_format: Format = qweight.fmt
        self.weight_shape = tuple(qweight.shape)
        self.act: ActFormat | None = parse_activation(act)
        self.use_kernels = True  # False forces the dequantize-then-compute reference path
        self._kernel_cache: dict = {}
        for key, t in qweight.tensors().items():
            self.register_buffer(f"weight_{key}", t.contiguous())
        if smooth is not None:  # inputs are divided by this per-channel vector (the weight holds W * smooth)
            self.register_buffer("input_smooth", smooth.detach().float().reshape(-1).clone())
        if self.act is not None and self.act.static:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("input_zero", torch.zeros((), dtype=torch.float32))

    @property
    def qweight(self) -> QTensor:
        b = dict(self.named_buffers(recurse=False))
        return QTensor(self.weight_format, self.weight_shape, b["weight_codes"], b["weight_scale"],
                       b.get("weight_zero"), b.get("weight_global_scale"), b.get("weight_mask"))

    def make_sparse_(self, nnz: int) -> None:
        """Buffers of a sparse weight keeping `nnz` values (formats/sparse.py), to be filled by load_state_dict."""
        from ..formats.sparse import codes_nbytes, mask_nbytes

        self.register_buffer("weight_mask", torch.zeros(mask_nbytes(self.weight_shape), dtype=torch.uint8))
        self.register_buffer("weight_codes", torch.zeros(codes_nbytes(self.weight_format, nnz), dtype=torch.uint8))
        self._kernel_cache = {}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_tensor(self.qweight, dtype)

    def set_input_range(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.input_scale.copy_(scale.reshape(()))
        self.input_zero.copy_(zero.reshape(()))

    def quantize_input(self, x: torch.Tensor, per_token: bool = True) -> torch.Tensor:
        """Reference fake-quantization of the layer input (identity without an activation format)."""
        if self.act is None:
            return x
        if self.act.static:
            return fake_quant(x, self.act, self.input_scale, self.input_zero)
        return fake_quant(x, self.act, per_token=per_token)

    def __getstate__(self):
        """Copies (deepcopy) start without kernel layouts: fbgemm's packed weights cannot be copied, and they
        derive from the buffers anyway."""
        return {**super().__getstate__(), "_kernel_cache": {}}

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache = {}  # kernel layouts derive from the buffers: rebuild after a load
        return super()._load_from_state_dict(*args, **kwargs)

    def quant_extra_repr(self) -> str:
        a = f", activations={self.act}" if self.act is not None else ""
        return f"weights={self.weight_format}{a}"

    @classmethod
    def _fmt(cls, fmt: "Format | str") -> Format:
        return parse_format(fmt)


def check_float_weight(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ValueError(f"layer {name!r} has NaN or infinite weights; refusing to quantize it")


def new_empty(fmt: "Format | str", shape) -> QTensor:
    return _empty_qtensor(parse_format(fmt), tuple(shape))


__all__ = ["QuantMixin", "new_empty", "check_float_weight", "nn"]
