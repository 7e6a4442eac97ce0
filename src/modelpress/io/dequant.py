"""`dequantize`: a plain float model with the dequantized weights, and writing its state dict."""
from __future__ import annotations

import copy
import os
import secrets
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ..hf import unmark_quantized
from ..quant import QuantMixin
from ..quant.qat import refuse_qat
from ..select import set_submodule
from .atomic import real, usual_mode
from .writer import _unique_state


def dequantize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain float nn.Module (no modelpress modules) with the dequantized weights. Activation
    quantization is not reproduced: the result computes with float activations. Low-rank, butterfly and
    product-quantized layers become the dense Linear/Conv they replaced, with the reconstructed weight, so the
    state dict fits the original architecture (fusions and BN folding stay applied)."""
    refuse_qat(model, "dequantize")
    if not inplace:
        model = copy.deepcopy(model)
    first: dict[int, nn.Parameter] = {}  # packed codes -> the float parameter rebuilt from them first
    done: list[str] = []  # replacement layers already made dense (their children went with them)
    for name, m in list(model.named_modules()):  # a module registered twice is rebuilt once, under both names
        if any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(m, QuantMixin):
            f = m.to_float()  # its class, attributes and children, dequantized
            for qn in m.qnames:  # layers that shared packed weights (tied) share the float weight again
                p, seen = f._parameters[qn], first.get(id(m._buffers[f"{qn}_codes"]))
                if seen is not None and seen.shape == p.shape and seen.dtype == p.dtype and torch.equal(seen, p):
                    f._parameters[qn] = seen
                else:
                    first.setdefault(id(m._buffers[f"{qn}_codes"]), p)
            set_submodule(model, name, f)
        elif hasattr(m, "to_float"):  # replacement layers (modelpress.nn): the dense layer they stand for
            set_submodule(model, name, m.to_float())
            done.append(name)
    unmark_quantized(model)  # a float transformers model again: save_pretrained works
    return model


def save_dequantized(model: nn.Module, file: "str | os.PathLike", overwrite: bool = False) -> Path:
    """Write the dequantized float state dict as one safetensors file (atomically; a symlink keeps its link and
    its target is replaced; the file follows the user's umask)."""
    file = real(file)
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file} exists; pass overwrite=True to replace it")
    if file.is_dir():
        raise IsADirectoryError(f"{file} is a folder; save_dequantized writes one .safetensors file")
    tensors, _ = _unique_state(dequantize(model))
    tmp = file.parent / f".{file.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        save_file(tensors, str(tmp))
        usual_mode(tmp)
        os.replace(tmp, file)
    except SafetensorError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {file}: {e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file
