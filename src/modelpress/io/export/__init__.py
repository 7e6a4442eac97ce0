"""`export`: modelpress models in the formats the next tool takes.

- `compressed-tensors`: a Hugging Face folder that transformers (with the compressed-tensors package) and vLLM
  load (`compressed_tensors.py`);
- `onnx`: an ONNX model that ONNX Runtime runs on CPU, checked against the PyTorch model (`onnx.py`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

FORMATS = ("compressed-tensors", "onnx")


def export(model: nn.Module, out: "str | os.PathLike", format: str, example_inputs: Any = None,
           overwrite: bool = False, **options: Any) -> Path:
    """Write `model` to the folder `out` in `format` ("compressed-tensors" or "onnx"); atomic, refuses a
    non-empty folder unless overwrite=True. Options: compressed-tensors: `tokenizer` (an object or a folder);
    onnx: `example_inputs` (required: a tensor, a tuple, or a dict of keyword tensors), `min_cosine`,
    `min_top1`, `opset`, `linear` ("nbits" or "qdq")."""
    from ...quant.qat import refuse_qat

    refuse_qat(model, "export")
    fmt = str(format).lower().replace("_", "-")
    if fmt == "compressed-tensors":
        from .compressed_tensors import export_compressed_tensors

        if example_inputs is not None:
            raise ValueError("example_inputs applies to the onnx export, not to compressed-tensors")
        return export_compressed_tensors(model, out, overwrite=overwrite, **options)
    if fmt == "onnx":
        from .onnx import export_onnx

        return export_onnx(model, out, example_inputs, overwrite=overwrite, **options)
    raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")


__all__ = ["export", "FORMATS"]
