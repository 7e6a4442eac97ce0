"""Per-layer table of a model or a saved folder: parameters, format, true bytes and, for quantized layers that have
run, the kernel path chosen per bucket of rows and its measured speed against the float layer."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quant import QuantMixin

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class LayerRow:
    name: str
    type: str
    params: int  # logical parameters (the float weight's and bias's element counts)
    format: str
    bytes: int  # bytes actually held: packed codes, scales, float tensors
    kernels: list = field(default_factory=list)  # quant.kernels.describe(): one dict per (rows bucket, dtype) seen

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0

    @property
    def kernel_summary(self) -> str:
        """e.g. "native u8s8 @1 x4.10 cold, int_mm @32 x2.05" (path @ rows bucket, speed against float when measured,
        and how, where not call after call: "cold" with the weights flushed, "input only" with only the input cached)."""
        parts = []
        for k in self.kernels:
            path = " ".join(w for w in k["path"].split() if w not in _ISA_WORDS)
            speed = f" x{k['speedup']:.2f}" if k.get("speedup") is not None else ""
            when = f" {k['timed']}" if k.get("timed") in ("cold", "input only") else ""
            parts.append(f"{path} @{k['rows']}{speed}{when}")
        return ", ".join(parts)


_ISA_WORDS = {"avx512_vnni", "avx512", "avx2_vnni", "avx2", "scalar"}  # named once in the header instead


@dataclass
class Inspection:
    rows: list[LayerRow] = field(default_factory=list)
    cpu: str = ""  # the CPU and kernel build the kernel column refers to (live models only)
    kernel_mode: str | None = None  # "memory" | "speed" | "mixed"; None without quantized layers

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def kernel_bytes(self) -> int:
        """Bytes the kernels keep beside the stored tensors (layouts, bf16 / dense copies): each path's state once
        per layer (buckets that chose the same path share it). Not in `total_bytes`, which is what `save` writes."""
        return sum(sum({k["path"]: k.get("extra_bytes") or 0 for k in r.kernels}.values()) for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [dict(vars(r), bits_per_param=round(r.bits_per_param, 4)) for r in self.rows],
                "total_params": self.total_params, "total_bytes": self.total_bytes,
                "kernel_bytes": self.kernel_bytes, "kernel_mode": self.kernel_mode, "cpu": self.cpu}

    def __str__(self) -> str:
        kern = any(r.kernels for r in self.rows)
        w = min(72, max([40] + [len(r.name) for r in self.rows]))  # long names: the column widens, then the tail shows
        name = lambda s: s if len(s) <= w else "…" + s[len(s) - w + 1:]  # noqa: E731
        head = f"{'layer':{w}s} {'type':18s} {'params':>12s} {'format':22s} {'bytes':>12s} {'bits/param':>10s}"
        head += "  kernel @rows x vs float" if kern else ""
        lines = [f"kernels: mode {self.kernel_mode} ({MODE_MEANS.get(self.kernel_mode, '')}); {self.cpu}"] if self.kernel_mode else []
        lines += [head, "-" * len(head)]
        for r in self.rows:
            line = (f"{name(r.name):{w}s} {r.type[:18]:18s} {r.params:12,d} {r.format[:22]:22s} {r.bytes:12,d} "
                    f"{r.bits_per_param:10.3f}")
            lines.append(line + (f"  {r.kernel_summary}" if r.kernels else ""))
        lines.append(f"{'total':{w}s} {'':18s} {self.total_params:12,d} {'':22s} {self.total_bytes:12,d}")
        if self.kernel_bytes:
            lines.append(f"{'+ kernel copies in memory':{w}s} {'':18s} {'':12s} {'':22s} {self.kernel_bytes:12,d}"
                         "  (layouts / bf16 copies the kernels keep while running; not saved)")
        return "\n".join(lines)


MODE_MEANS = {"memory": "packed weights, plus the small kernel copies counted apart",
              "speed": "a dense float copy unless a packed path is 10 % faster", "mixed": "layers differ"}


def _own_tensors(m: nn.Module, prefix: str, seen: set) -> list[tuple[str, torch.Tensor]]:
    out = []
    skip = getattr(m, "_non_persistent_buffers_set", set())
    for n, t in list(m.named_parameters(recurse=False)) + [(n, b) for n, b in m.named_buffers(recurse=False) if n not in skip]:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue  # tied weight: counted where it first appears
        seen.add(key)
        out.append((prefix + n, t))
    return out


def inspect(model: nn.Module) -> Inspection:
    """One row per module that holds tensors itself; bytes sum to what `save` writes for tensors. Quantized layers
    that have run list their kernel path per bucket of rows (see modelpress.quant.kernels)."""
    from .quant import kernel_mode, kernels

    from .quant.nnac import kept_out

    rows, seen = [], set()
    for name, m in [*model.named_modules(), *kept_out(model)]:
        own = _own_tensors(m, "", seen)
        if not own:
            continue
        nbytes = sum(t.numel() * t.element_size() for _, t in own)
        kern = []
        if isinstance(m, QuantMixin):
            params = m.float_numel()
            fmt = str(m.weight_format) + (f" a:{m.act}" if m.act is not None else "")
            kern = kernels.describe(m) if hasattr(m, "_kernel_plan") else []
            if hasattr(m, "weight_mask"):  # pruned: bitmask + kept codes
                from .formats.sparse import sparsity_of

                fmt += f" sparse:{sparsity_of(m.qweight):.0%}"
        elif hasattr(m, "inspect_row"):  # replacement layers (modelpress.nn): butterfly factors, PQ codebooks
            params, fmt = m.inspect_row()
        else:
            params = sum(t.numel() for n, t in own if isinstance(t, nn.Parameter))
            fmt = ",".join(sorted({str(t.dtype).replace("torch.", "") for _, t in own}))
        rows.append(LayerRow(name or "(root)", type(m).__name__, params, fmt, nbytes, kern))
    mode = kernel_mode(model)
    return Inspection(rows, cpu=kernels.cpu_info().describe() if mode else "", kernel_mode=mode)


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}  # e.g. NNAC's record lists its layers' names


def inspect_saved(path: "str | Path") -> Inspection:
    """The same table from a saved folder, read from the manifest and the safetensors header, after the checks
    `load` makes of the folder (size, checksum, header, every layer's tensors against its formats)."""
    from .io.manifest import checked_header, read_manifest

    manifest = read_manifest(path)
    _, header = checked_header(path, manifest)
    layers = manifest["layers"]
    buffers = set(manifest.get("buffers", ()))  # not parameters (e.g. BatchNorm running statistics)
    replaced = {name: info for rec in manifest.get("structure") or [] if isinstance(rec, dict)
                for name, info in _dict((rec.get("options") or {}).get("layers")).items()
                if isinstance(info, dict) and {"type", "params", "format"} <= set(info)}  # butterfly, PQ layers
    groups: dict[str, list[tuple[str, dict]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        owner, _, leaf = key.rpartition(".")
        groups.setdefault(owner, []).append((leaf, info))
    rows = []
    for owner, tensors in groups.items():
        nbytes = sum(i["data_offsets"][1] - i["data_offsets"][0] for _, i in tensors)
        if owner in layers:
            L = layers[owner]
            shapes = L.get("shapes") or {"weight": L["shape"]}  # several quantized matrices (attention, RNNs)
            packed = {f"{q}_{k}" for q in shapes for k in ("codes", "scale", "zero", "global_scale", "mask")}
            packed |= {"input_smooth", "input_scale", "input_zero"}
            floats = sum(math.prod(i["shape"]) for leaf, i in tensors if leaf not in packed)  # biases ...
            fmt = L["weights"] + (f" a:{L['activations']}" if L.get("activations") else "")
            if L.get("nnz") is not None:
                fmt += f" sparse:{1 - L['nnz'] / math.prod(L['shape']):.0%}"
            rows.append(LayerRow(owner, L["type"], sum(math.prod(s) for s in shapes.values()) + floats, fmt, nbytes))
        elif owner in replaced:
            R = replaced[owner]
            rows.append(LayerRow(owner, str(R["type"]), int(R["params"]), str(R["format"]), nbytes))
        else:
            prefix = f"{owner}." if owner else ""
            params = sum(math.prod(i["shape"]) for leaf, i in tensors if prefix + leaf not in buffers)
            fmt = ",".join(sorted({i["dtype"].lower() for _, i in tensors}))
            rows.append(LayerRow(owner or "(root)", "float", params, fmt, nbytes))
    return Inspection(rows)
