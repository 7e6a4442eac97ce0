"""`dequantize`: a plain float model with the dequantized weights, and writing its state dict."""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..quant import QuantMixin
from ..select import set_submodule
from .reader import FLOAT_TYPES
from .writer import _unique_state


def _float_module(m: QuantMixin) -> nn.Module:
    ftype = FLOAT_TYPES[type(m).__name__]
    w = m.dequantized_weight(torch.float32)
    if hasattr(m, "input_smooth"):  # y = (x / s) (W s)^T = x W^T
        w = w / m.input_smooth.reshape(1, -1)
    if ftype is nn.Linear:
        f = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    elif ftype in (nn.Conv1d, nn.Conv2d):
        f = ftype(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                  dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    elif ftype is nn.Embedding:
        f = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
    else:
        f = nn.EmbeddingBag(m.num_embeddings, m.embedding_dim, mode=m.mode, padding_idx=m.padding_idx,
                            include_last_offset=m.include_last_offset)
    with torch.no_grad():
        f.weight.copy_(w)
        if getattr(m, "bias", None) is not None:
            f.bias.copy_(m.bias)
    return f.train(m.training)


def dequantize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain float nn.Module (no modelpress modules) with the dequantized weights. Activation
    quantization is not reproduced: the result computes with float activations. Low-rank, butterfly and
    product-quantized layers become the dense Linear/Conv they replaced, with the reconstructed weight, so the
    state dict fits the original architecture (fusions and BN folding stay applied)."""
    if not inplace:
        model = copy.deepcopy(model)
    done: list[str] = []
    for name, m in list(model.named_modules()):
        if any(name.startswith(d + ".") for d in done):
            continue
        if hasattr(m, "to_float"):  # replacement layers (modelpress.nn): the dense layer they stand for
            set_submodule(model, name, m.to_float())
            done.append(name)
        elif isinstance(m, QuantMixin):
            set_submodule(model, name, _float_module(m))
    return model


def save_dequantized(model: nn.Module, file: "str | os.PathLike", overwrite: bool = False) -> Path:
    """Write the dequantized float state dict as one safetensors file (atomically)."""
    file = Path(file)
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file} exists; pass overwrite=True to replace it")
    tensors, _ = _unique_state(dequantize(model))
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.tmp-", dir=file.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file
