"""Checks of a saved folder before anything is built from it: the manifest's fields and types, a tensor file
that stays inside the folder, a bounded safetensors header, and every quantized layer's tensors against the
shapes, dtypes and byte counts its formats imply. A copy of the layer records is stored in the tensor file's own
metadata (covered by its checksum), so an edited manifest (`int4:g32` -> `fp4_e2m1:g32`, same bytes) is refused.

Every problem is a ValueError that names the file and the field.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from ..formats import parse_format
from ..formats.qtensor import QTensor, stored_problem
from ..formats.sparse import codes_nbytes, mask_nbytes
from ..quant import QUANT_TYPES, QuantConv1d, QuantConv2d, QuantLinear
from ..quant.activation import parse_activation
from ..quant.base import new_empty

# safetensors dtype -> bytes per element (the dtypes torch tensors are saved as)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}
TORCH_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
MAX_HEADER = 100_000_000  # safetensors' own limit
META_KEY = "modelpress"  # the tensor file's metadata entry holding the layer records
LAYER_DIMS = {"QuantConv1d": 3, "QuantConv2d": 4}  # every other quantized matrix is 2-D
QT_LEAVES = ("_codes", "_scale", "_zero", "_global_scale", "_mask")
INPUT_LEAVES = ("input_scale", "input_zero", "input_smooth")


def _takes(typ: str, *bases: type) -> bool:
    return issubclass(QUANT_TYPES[typ], bases)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {what}")


def check_manifest(m: Any, where: str) -> None:
    """The manifest's own fields: present, of the right types (not yet compared with the tensors)."""
    _need(isinstance(m, dict), where, "the manifest must be a JSON object")
    v = m.get("format_version")
    _need(_is_int(v) and v >= 1, where, f"'format_version' must be a positive integer, got {v!r}")
    t = m.get("tensors")
    _need(isinstance(t, dict), where, f"'tensors' is missing or not an object (got {t!r})")
    _need(isinstance(t.get("file"), str), where, f"'tensors.file' must be a file name, got {t.get('file')!r}")
    sha = t.get("sha256")
    _need(isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None, where,
          f"'tensors.sha256' must be 64 hex digits, got {sha!r}")
    for k in ("file_bytes", "tensor_bytes"):
        _need(_is_int(t.get(k)) and t[k] >= 0, where, f"'tensors.{k}' must be a non-negative integer, got {t.get(k)!r}")
    layers = m.get("layers")
    _need(isinstance(layers, dict), where, f"'layers' is missing or not an object (got {layers!r})")
    for name, info in layers.items():
        _check_layer_record(name, info, f"{where}: layer {name!r}")
    aliases = m.get("aliases", {})
    _need(isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in aliases.items()),
          where, "'aliases' must map tensor names to tensor names")
    _need(isinstance(m.get("structure", []), list), where, "'structure' must be a list of {kind, options} records")
    buffers = m.get("buffers", [])
    _need(isinstance(buffers, list) and all(isinstance(b, str) for b in buffers), where,
          "'buffers' must be a list of tensor names")
    _need(isinstance(m.get("metadata", {}), dict), where, "'metadata' must be an object")
    bd = m.get("buffer_dtypes", {})
    _need(isinstance(bd, dict) and all(isinstance(k, str) and isinstance(v, str) and v in FLOAT_DTYPES
                                       for k, v in bd.items()), where,
          f"'buffer_dtypes' must map buffer names to {sorted(FLOAT_DTYPES)}")
    sha = m.get("hf_config_sha256")
    _need(sha is None or (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None), where,
          f"'hf_config_sha256' must be 64 hex digits, got {sha!r}")


def _check_layer_record(name: Any, info: Any, where: str) -> None:
    _need(isinstance(name, str) and name != "", where, "a layer name must be a non-empty string")
    _need(isinstance(info, dict), where, f"the record must be an object, got {info!r}")
    typ = info.get("type")
    _need(isinstance(typ, str) and typ in QUANT_TYPES, where, f"'type' must be one of {sorted(QUANT_TYPES)}, got {typ!r}")
    dims = LAYER_DIMS.get(typ, 2)
    shape = info.get("shape")
    _need(_is_shape(shape, dims), where, f"'shape' of a {typ} must be {dims} positive integers (at most 2**48 values in all), got {shape!r}")
    shapes = info.get("shapes", {"weight": shape})
    _need(isinstance(shapes, dict) and shapes and all(isinstance(k, str) and k and _is_shape(v, 2 if "shapes" in info
                                                                                            else dims)
                                                      for k, v in shapes.items()) and shape in shapes.values(),
          where, f"'shapes' must map the quantized parameters to their shapes (one of them 'shape'), got {shapes!r}")
    try:
        parse_format(info.get("weights"))
        act = parse_activation(info.get("activations"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    _need(act is None or _takes(typ, QuantLinear, QuantConv1d, QuantConv2d), where,
          f"a {typ} is quantized weight-only: it has no activation format")
    smooth = info.get("smooth", False)
    _need(isinstance(smooth, bool) and (not smooth or _takes(typ, QuantLinear)), where,
          f"'smooth' applies to QuantLinear only and must be true or false, got {smooth!r}")
    if "nnz" in info:  # a pruned (sparse) weight: the number of kept values
        nnz = info["nnz"]
        _need("shapes" not in info and _takes(typ, QuantLinear, QuantConv1d, QuantConv2d), where,
              "'nnz' (a pruned weight) applies to Linear and Conv layers only")
        _need(_is_int(nnz) and 0 <= nnz <= math.prod(shape), where,
              f"'nnz' must be an integer from 0 to {math.prod(shape)} (the weight's values), got {nnz!r}")


MAX_NUMEL = 2**48  # far beyond any weight, and far from overflowing the int64 sizes torch computes with


def _is_shape(v: Any, dims: int) -> bool:
    return (isinstance(v, list) and len(v) == dims and all(_is_int(d) and 0 < d <= MAX_NUMEL for d in v)
            and math.prod(v) <= MAX_NUMEL)


def tensor_path(folder: Path, manifest: dict) -> Path:
    """The tensor file named by the manifest; it must be a plain file name inside the folder."""
    name = manifest["tensors"]["file"]
    f = folder / name
    bad = name in ("", ".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute()
    try:
        inside = not bad and f.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if bad or not inside:
        raise ValueError(f"{folder / 'modelpress.json'}: 'tensors.file' must name a file inside the folder, "
                         f"got {name!r}")
    return f


def read_header(f: Path) -> dict[str, Any]:
    """The safetensors header of `f`, checked: a bounded length, valid JSON, known dtypes, and data offsets
    that match each tensor's shape and dtype and stay inside the file."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{f} is not a safetensors file: shorter than its 8-byte header length")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, MAX_HEADER):
            raise ValueError(f"{f} has a corrupt safetensors header: it claims {n} bytes, the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ValueError(f"{f} has a corrupt safetensors header (not valid JSON)") from None
    where = f"{f}: safetensors header"
    _need(isinstance(header, dict), where, "not a JSON object")
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            _need(isinstance(info, dict) and all(isinstance(v, str) for v in info.values()), where,
                  "__metadata__ must map names to strings")
            continue
        _need(isinstance(info, dict), where, f"entry {key!r} is not an object")
        dt, shape, off = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        _need(isinstance(dt, str) and dt in DTYPE_BYTES, where, f"tensor {key!r} has an unsupported dtype {dt!r}")
        _need(isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape), where,
              f"tensor {key!r} has an invalid shape {shape!r}")
        _need(isinstance(off, list) and len(off) == 2 and all(_is_int(o) for o in off) and 0 <= off[0] <= off[1] <= data,
              where, f"tensor {key!r} has data offsets {off!r} outside the file's {data} data bytes")
        _need(off[1] - off[0] == math.prod(shape) * DTYPE_BYTES[dt], where,
              f"tensor {key!r}: {off[1] - off[0]} bytes stored, its shape {shape} and dtype {dt} need "
              f"{math.prod(shape) * DTYPE_BYTES[dt]}")
    return header


def stored_records(header: dict[str, Any]) -> dict[str, Any] | None:
    """The layer records written into the tensor file's metadata by `save` (None for files without them)."""
    raw = header.get("__metadata__", {}).get(META_KEY)
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        rec = None
    if not isinstance(rec, dict):
        raise ValueError(f"the tensor file's '{META_KEY}' metadata is corrupt")
    return rec


def records(manifest: dict[str, Any]) -> dict[str, Any]:
    """What of the manifest decides how the tensors are read (and is therefore also stored with them)."""
    return {k: manifest.get(k, d) for k, d in (("layers", {}), ("aliases", {}), ("structure", []), ("buffers", []))}


def expected_tensors(info: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """leaf name -> (safetensors dtype, shape) of the tensors a quantized layer record implies: the packed codes
    and scales of each quantized parameter, calibrated input ranges, the smoothing vector (float ones apart)."""
    out = {}
    for name, shape in info.get("shapes", {"weight": info["shape"]}).items():
        with torch.device("meta"):  # shapes and dtypes only: nothing is allocated
            q = new_empty(info["weights"], shape)
        out.update({f"{name}_{k}": (TORCH_DTYPES[t.dtype], tuple(t.shape)) for k, t in q.tensors().items()})
    if "nnz" in info:  # sparse: the bitmask, and the codes of the kept values only
        fmt = parse_format(info["weights"])
        out["weight_codes"] = ("U8", (codes_nbytes(fmt, info["nnz"]),))
        out["weight_mask"] = ("U8", (mask_nbytes(tuple(info["shape"])),))
    act = parse_activation(info.get("activations"))
    if act is not None and act.static:
        out["input_scale"] = out["input_zero"] = ("F32", ())
    if info.get("smooth"):
        out["input_smooth"] = ("F32", (info["shape"][1],))
    return out


def check_tensors(manifest: dict[str, Any], header: dict[str, Any], f: Path) -> None:
    """The manifest against the tensor file's header: stored records, byte total, aliases, buffers, and every
    quantized layer's tensors (names, dtypes, shapes: byte counts follow)."""
    where = f"{f.parent / 'modelpress.json'}"
    stored = stored_records(header)
    if stored is not None:
        mine = records(manifest)
        for key in set(mine) & set(stored):
            if key == "layers" and isinstance(stored["layers"], dict):
                for name in sorted(set(mine["layers"]) | set(stored["layers"]), key=str):
                    a, b = mine["layers"].get(name), stored["layers"].get(name)
                    _need(a == b, where, f"layer {name!r} is {a} in the manifest but the tensor file was written "
                                         f"for {b}: the manifest was edited or mixed up")
            _need(mine[key] == stored[key], where, f"'{key}' differs from what the tensor file was written with: "
                                                   "the manifest was edited or mixed up")
    names = {k: v for k, v in header.items() if k != "__metadata__"}
    total = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in names.values())
    _need(total == manifest["tensors"]["tensor_bytes"], where,
          f"'tensors.tensor_bytes' is {manifest['tensors']['tensor_bytes']}, the tensor file holds {total}")
    aliases = manifest.get("aliases", {})
    for alias, kept in aliases.items():
        _need(kept in names and alias not in names, where,
              f"alias {alias!r} -> {kept!r} must point to a stored tensor from a name that is not stored")

    def entry(key: str):
        k = aliases.get(key, key)
        return names.get(k)

    for b in manifest.get("buffers", []):
        _need(entry(b) is not None, where, f"buffer {b!r} is not in the tensor file")
    all_keys = set(names) | set(aliases)
    for name, info in manifest["layers"].items():
        exp = expected_tensors(info)
        for leaf, (dt, shape) in exp.items():
            e = entry(f"{name}.{leaf}")
            _need(e is not None, where, f"layer {name!r} ({info['weights']}) needs tensor {name}.{leaf}, "
                                        "which is not in the tensor file")
            _need(e["dtype"] == dt and tuple(e["shape"]) == shape, where,
                  f"layer {name!r} ({info['weights']}): tensor {name}.{leaf} should be {dt} {list(shape)} for this "
                  f"format, the file has {e['dtype']} {e['shape']}")
        bias = entry(f"{name}.bias") if _takes(info["type"], QuantLinear, QuantConv1d, QuantConv2d) else None
        if bias is not None:
            _need(bias["dtype"] in ("F32", "F16", "BF16", "F64") and bias["shape"] == [info["shape"][0]], where,
                  f"layer {name!r}: bias should be a float vector of {info['shape'][0]}, the file has "
                  f"{bias['dtype']} {bias['shape']}")
        qnames = info.get("shapes", {"weight": None})
        possible = {f"{q}{k}" for q in qnames for k in QT_LEAVES} | set(INPUT_LEAVES)
        possible |= {k[len(name) + 1:] for k in all_keys if k.startswith(f"{name}.") and k.endswith("_codes")
                     and "." not in k[len(name) + 1:]}  # packed codes of a matrix the record does not name
        extra = sorted(f"{name}.{leaf}" for leaf in possible if leaf not in exp and f"{name}.{leaf}" in all_keys)
        _need(not extra, where, f"layer {name!r} ({info['weights']}, activations {info.get('activations')}): "
                                f"unexpected tensor(s) {extra[:3]} for this format")


def check_values(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], f: Path) -> None:
    """The values of every quantized layer's tensors, which the header cannot show: scales, zero points, float
    codes and bitmasks that no save writes (formats.qtensor.stored_problem), non-finite input ranges."""
    where = str(f)
    aliases = manifest.get("aliases", {})

    def get(key: str) -> torch.Tensor | None:
        return tensors.get(aliases.get(key, key))

    for name, info in manifest["layers"].items():
        fmt = parse_format(info["weights"])
        for q, shape in info.get("shapes", {"weight": info["shape"]}).items():
            qt = QTensor(fmt, tuple(shape), get(f"{name}.{q}_codes"), get(f"{name}.{q}_scale"),
                         get(f"{name}.{q}_zero"), get(f"{name}.{q}_global_scale"), get(f"{name}.{q}_mask"))
            problem = stored_problem(qt, info.get("nnz"))
            _need(problem is None, where, f"layer {name!r} ({info['weights']}): tensor {name}.{q}: {problem} "
                                          "(no save writes that: the file is damaged)")
        for leaf in INPUT_LEAVES:
            t = get(f"{name}.{leaf}")
            _need(t is None or bool(torch.isfinite(t).all()), where,
                  f"layer {name!r}: {name}.{leaf} holds NaN or infinite values (no save writes that: the file is damaged)")
