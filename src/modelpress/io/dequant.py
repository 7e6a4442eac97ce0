"""`dequantize`: a plain float model with the dequantized weights, and writing its state dict."""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..hf import unmark_quantized
from ..quant import QuantMixin
from ..select import set_submodule
from .writer import _unique_state


def dequantize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain float nn.Module (no modelpress modules) with the dequantized weights. Activation
    quantization is not reproduced: the result computes with float activations."""
    if not inplace:
        model = copy.deepcopy(model)
    first: dict[int, nn.Parameter] = {}  # packed codes -> the float parameter rebuilt from them first
    for name, m in list(model.named_modules()):  # a module registered twice is rebuilt once, under both names
        if isinstance(m, QuantMixin):
            f = m.to_float()  # its class, attributes and children, dequantized
            for qn in m.qnames:  # layers that shared packed weights (tied) share the float weight again
                p, seen = f._parameters[qn], first.get(id(m._buffers[f"{qn}_codes"]))
                if seen is not None and seen.shape == p.shape and seen.dtype == p.dtype and torch.equal(seen, p):
                    f._parameters[qn] = seen
                else:
                    first.setdefault(id(m._buffers[f"{qn}_codes"]), p)
            set_submodule(model, name, f)
    unmark_quantized(model)  # a float transformers model again: save_pretrained works
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
