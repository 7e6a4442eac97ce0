"""compressed-tensors export: a Hugging Face folder that transformers (with the `compressed-tensors` package)
and vLLM load, holding modelpress's codes and scales re-laid out in that format's conventions.

| modelpress weights                          | compressed-tensors                                        |
| int2..int8 (sym/asym; channel/group/tensor) | pack-quantized (weight_packed int32, weight_scale, weight_zero_point) |
| int1, ternary                               | pack-quantized 2-bit (codes -1/+1, -1/0/+1: exact)        |
| int8 weights + int8 activations             | int-quantized (weight int8), input_activations per token/tensor |
| fp8_e4m3                                    | float-quantized (weight float8_e4m3fn)                    |
| nvfp4                                       | nvfp4-pack-quantized (fp4 pairs in uint8, e4m3 block scales, global scale = 1 / ours) |
Quantized embeddings are written as dense weights with the same values (transformers builds compressed Linear
layers only), with a warning; a quantized Linear's bias is written as it is. Anything else (fp8_e5m2, fp6/fp4 with float
scales, MX formats, convolutions, transformers' Conv1D, embedding bags, layers with an AWQ/SmoothQuant input
smoothing vector) is refused with an error naming the layer and its format. Symmetric int
codes keep modelpress's sign-flipped (negative) group scales: the format multiplies codes by scales as they are.
Codes are packed with compressed-tensors' own helpers, so the file follows the installed version's layout.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ...formats import codes_grid, grid, signed
from ...formats.floats import decode_float
from ...quant import QuantEmbedding, QuantHFConv1D, QuantLinear, QuantMixin
from ..hf_folder import check_tokenizer, float_dtype, is_hf_model, write_hf_files
from ._folder import atomic_folder


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ImportError("compressed-tensors export needs the compressed-tensors package: "
                          "pip install 'modelpress[compressed-tensors]'") from None
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig

    return pack_to_int32, pack_fp4_to_uint8, QuantizationConfig


class NotExpressible(ValueError):
    """A layer whose format compressed-tensors cannot hold."""


def _refuse(name: str, m: QuantMixin, why: str) -> None:
    raise NotExpressible(f"layer {name!r} ({type(m).__name__}, weights {m.weight_format}"
                         f"{'' if m.act is None else ', activations ' + str(m.act)}) cannot be exported to "
                         f"compressed-tensors: {why}")


def _matrix_codes(m: QuantMixin) -> tuple[torch.Tensor, int, int, int]:
    """Stored codes (uint8) as [rows, cols] without grid padding, plus (rows, groups, group)."""
    q = m.qweight
    rows, groups, g = grid(q.fmt, q.shape)
    n = q.shape[0]
    cols = math.prod(q.shape) // n
    u = codes_grid(q).reshape(1 if q.fmt.granularity == "tensor" else rows, -1)
    return u.reshape(-1)[: n * cols].reshape(n, cols) if q.fmt.granularity == "tensor" else u[:, :cols], rows, groups, g


def _strategy(m: QuantMixin, cols: int, groups: int, g: int) -> dict[str, Any]:
    fmt = m.weight_format
    if fmt.granularity == "tensor":
        return {"strategy": "tensor"}
    if fmt.granularity == "channel" or groups == 1 and g == cols:  # one group per row is a channel scale
        return {"strategy": "channel"}
    return {"strategy": "group", "group_size": g}


def _scale(m: QuantMixin, dtype: torch.dtype) -> torch.Tensor:
    s = m.weight_scale.to(dtype)
    return s.reshape(1) if m.weight_format.granularity == "tensor" else s.reshape(s.shape[0], -1)


def _activation_args(name: str, m: QuantMixin) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    act = m.act
    if act is None:
        return None, {}
    if act.name == "int8":
        args = {"num_bits": 8, "type": "int", "symmetric": False, "dynamic": not act.static,
                "strategy": "tensor" if act.static else "token"}
        if not act.static:
            return args, {}
        zp = (m.input_zero.round() - 128).to(torch.int8).reshape(1)  # uint8 zero point -> the int8 range
        return args, {"input_scale": m.input_scale.float().reshape(1), "input_zero_point": zp}
    if act.name == "fp8_e4m3":
        args = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not act.static, "strategy": "tensor"}
        return args, ({"input_scale": m.input_scale.float().reshape(1)} if act.static else {})
    _refuse(name, m, f"activation format {act} has no compressed-tensors equivalent")


def layer_tensors(name: str, m: QuantMixin, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(scheme: weights/input_activations/format, tensors keyed by their name in the module) for one layer."""
    pack_to_int32, pack_fp4_to_uint8, _ = _ct()
    if not isinstance(m, QuantLinear):
        _refuse(name, m, "the format covers Linear layers (embeddings are written dense)")
    if isinstance(m, QuantHFConv1D):  # transformers compresses nn.Linear modules only: it would load random weights
        _refuse(name, m, "transformers' Conv1D (GPT-2 style, weight stored [in, out]) is not a Linear layer, and "
                "transformers builds compressed Linear layers only; exclude these layers or export to ONNX")
    if hasattr(m, "input_smooth"):
        _refuse(name, m, "its per-input-channel smoothing vector (AWQ/SmoothQuant) has no place in the format")
    fmt = m.weight_format
    act_args, act_tensors = _activation_args(name, m)
    u, rows, groups, g = _matrix_codes(m)
    n, cols = u.shape
    if _strategy(m, cols, groups, g)["strategy"] == "group" and cols % g:
        _refuse(name, m, f"its rows of {cols} values end in a partial group of {cols % g} (modelpress pads the last "
                f"group; compressed-tensors needs the row length to be a multiple of the group size {g})")
    out: dict[str, torch.Tensor] = {}
    if fmt.kind in ("int", "binary", "ternary"):
        if fmt.kind == "int" and fmt.symmetric:
            codes, bits = signed(u, fmt.bits), fmt.bits
        elif fmt.kind == "int":  # (u - z) s == ((u - 2^(b-1)) - (z - 2^(b-1))) s: signed codes and zero point
            codes, bits = u.to(torch.int32) - 2 ** (fmt.bits - 1), fmt.bits
            zero = m.weight_zero.to(torch.int32) - 2 ** (fmt.bits - 1)
        elif fmt.kind == "binary":
            codes, bits = u.to(torch.int32) * 2 - 1, 2
        else:
            codes, bits = signed(u, 2), 2
        weights = {"num_bits": bits, "type": "int", "symmetric": fmt.kind != "int" or fmt.symmetric,
                   **_strategy(m, cols, groups, g)}
        out["weight_scale"] = _scale(m, dtype)
        int_weights = act_args is not None and act_args["type"] == "int" and bits == 8
        if int_weights:  # W8A8: int8 weights as they are
            form = "int-quantized"
            out["weight"] = codes.to(torch.int8)
            if not weights["symmetric"]:
                out["weight_zero_point"] = zero.to(torch.int8).reshape(out["weight_scale"].shape)
        else:
            form = "pack-quantized"
            out["weight_packed"] = pack_to_int32(codes.to(torch.int8), bits)
            out["weight_shape"] = torch.tensor([n, cols])
            if not weights["symmetric"]:
                zp = zero.to(torch.int8).reshape(out["weight_scale"].shape)
                out["weight_zero_point"] = zp if weights["strategy"] == "tensor" else pack_to_int32(zp, bits, packed_dim=0)
    elif fmt.name == "fp8_e4m3":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, **_strategy(m, cols, groups, g)}
        form = "float-quantized"
        out["weight"] = u.contiguous().view(torch.float8_e4m3fn)
        out["weight_scale"] = _scale(m, dtype)
    elif fmt.kind == "nvfp4":
        if cols % 16:
            _refuse(name, m, f"nvfp4 needs a row length that is a multiple of 16, this one has {cols}")
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16}
        form = "nvfp4-pack-quantized"
        out["weight_packed"] = pack_fp4_to_uint8(decode_float(u, "fp4_e2m1"))
        out["weight_scale"] = m.weight_scale.contiguous().view(torch.float8_e4m3fn)  # [n, cols / 16] e4m3 codes
        out["weight_global_scale"] = (1.0 / m.weight_global_scale.double()).float().reshape(1)  # theirs divides
    else:
        _refuse(name, m, "compressed-tensors holds int2..int8, fp8_e4m3 and nvfp4 weights")
    if act_args is not None and act_args["type"] == "float" and form != "float-quantized":
        _refuse(name, m, "fp8 activations go with fp8_e4m3 weights only")
    bias = m._parameters.get("bias")  # the compressed module keeps the float bias under its usual name
    if bias is not None:
        out["bias"] = bias.detach()
    return {"weights": weights, "input_activations": act_args, "format": form}, {**out, **act_tensors}


def _config_groups(schemes: dict[str, dict[str, Any]], model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """Layers grouped by identical scheme; one scheme for every quantized Linear targets the class "Linear"."""
    by_key: dict[str, list[str]] = {}
    for name, s in schemes.items():
        by_key.setdefault(repr(sorted((k, repr(v)) for k, v in s.items())), []).append(name)
    float_linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    groups = {}
    for i, names in enumerate(by_key.values()):
        s = schemes[names[0]]
        linears = all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
        n_linear = sum(isinstance(m, QuantLinear) for m in model.modules())
        targets = ["Linear"] if linears and len(names) == n_linear else names
        groups[f"group_{i}"] = {"targets": targets, **{k: v for k, v in s.items() if v is not None}}
    return groups, float_linears


def _tied(model: nn.Module) -> bool:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None:
        return False
    a, b = get_in(), get_out()
    return type(a) is nn.Embedding and type(b) is nn.Linear and a.weight is b.weight


T5_FAMILY = ("t5", "mt5", "umt5", "longt5")


def export_compressed_tensors(model: nn.Module, out: "str | os.PathLike", tokenizer: Any = None,
                              overwrite: bool = False) -> Path:
    """Write `model` (a quantized transformers model) as a compressed-tensors folder at `out`."""
    _, _, QuantizationConfig = _ct()
    if not is_hf_model(model):
        raise TypeError("compressed-tensors export needs a transformers model (it writes a Hugging Face folder); "
                        f"got {type(model).__name__}")
    check_tokenizer(tokenizer)
    dtype = float_dtype(model) or torch.float32
    schemes, quant, dense = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding):  # transformers cannot build compressed embeddings: exact dense values
            quant[f"{name}.weight"] = m.dequantized_weight(dtype).contiguous()
            dense.append(f"{name} ({m.weight_format})")
        elif isinstance(m, QuantMixin):
            schemes[name], tensors = layer_tensors(name, m, dtype)
            quant.update({f"{name}.{k}": v.contiguous() for k, v in tensors.items()})
    if dense:
        warnings.warn(f"compressed-tensors export: {len(dense)} quantized embedding(s) written as dense {dtype} "
                      f"weights (same values; transformers loads compressed Linear layers only): {', '.join(dense)}",
                      stacklevel=3)
    if not schemes:
        raise ValueError("the model has no quantized layer: nothing to export to compressed-tensors")
    if getattr(model.config, "model_type", None) in T5_FAMILY:
        warnings.warn("compressed-tensors export of a T5-family model: transformers' T5 code reads every Linear's "
                      "weight while it builds the model, which compressed modules do not have, so load it with "
                      "quantization_config=CompressedTensorsConfig(dequantize=True) (the file is the standard "
                      "layout vLLM reads)", stacklevel=3)
    groups, ignore = _config_groups(schemes, model)
    forms = {g["format"] for g in groups.values()}
    qconfig = QuantizationConfig.model_validate({
        "config_groups": groups, "format": forms.pop() if len(forms) == 1 else "mixed-precision",
        "quantization_status": "compressed", "ignore": ignore, "quant_method": "compressed-tensors"})
    quant_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, QuantMixin))
    tensors, seen = {}, set()
    for k, t in model.state_dict().items():
        if k.startswith(quant_prefixes):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # a tied alias (transformers ties it again on load)
            continue
        seen.add(key)
        tensors[k] = t.detach().contiguous()
    tensors.update(quant)
    config = copy.deepcopy(model.config)
    if getattr(config, "tie_word_embeddings", False) and not _tied(model):
        config.tie_word_embeddings = False  # e.g. lm_head quantized apart from the embedding: both are stored
    with atomic_folder(out, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "modelpress"})
        write_hf_files(model, tmp, tokenizer, config=config,
                       quantization_config=qconfig.model_dump(mode="json", exclude_none=True))
    return Path(out)
