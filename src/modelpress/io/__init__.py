"""Save, load and dequantize: safetensors + a JSON manifest. Nothing is ever unpickled or executed.

A saved folder holds `model.safetensors` (every tensor of the state dict: packed codes, scales, float
parameters) and `modelpress.json` (format version, per-layer formats, sha256 and byte size of the tensor file).
"""
from .dequant import dequantize, save_dequantized
from .reader import load
from .manifest import FORMAT_VERSION, MANIFEST, TENSORS, layer_manifest, read_manifest, read_tensors
from .writer import save

__all__ = ["save", "load", "dequantize", "save_dequantized", "read_manifest", "read_tensors", "layer_manifest",
           "FORMAT_VERSION", "MANIFEST", "TENSORS"]
