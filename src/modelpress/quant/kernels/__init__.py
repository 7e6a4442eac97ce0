"""CPU kernel dispatch for quantized layers: which path each layer runs, per CPU, formats and rows.

A QuantLinear / QuantConv1d / QuantConv2d asks `select(layer, x)` for a path name (None: the dequantize-then-compute
reference path) and runs it with `run(layer, name, x)`. The first call for a bucket of rows (a power of two) decides
among the paths that are correct on this CPU (paths.py, cpu.py, probe.py): by timing them against the float layer
(guard.py, cached on disk) or, with `MODELPRESS_TUNE=0`, by fixed rules. The decision is kept on the layer
(`_kernel_plan`); kernel states built from the buffers are kept in `_kernel_cache` and rebuilt when a buffer
changes (in-place writes bump its version counter; a replaced buffer has a new data pointer).

Reference path instead of a kernel, whatever was decided: kernels disabled (`set_kernels(model, False)`), input
not a plain CPU float tensor (meta, fake or other subclass), tracing or compiling (torch.compile, torch.export,
torch.jit.trace: kernels are not traceable ops), or an input that requires a gradient (the reference path gives the
straight-through gradient of the dequantized model; kernels give none).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from . import build, decode, guard, native, paths
from .cpu import CpuInfo, cache_bytes, cpu_info
from .guard import Choice, bucket, tuning_enabled

MODES = ("memory", "speed")
MODE_ENV = "MODELPRESS_KERNEL_MODE"


def default_mode() -> str:
    mode = os.environ.get(MODE_ENV, "memory").strip().lower() or "memory"
    return check_mode(mode)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {', '.join(MODES)}")
    return mode


_is_compiling = torch.compiler.is_compiling
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_jit_state = torch._C._get_tracing_state  # what torch.jit.is_tracing() reads, without its Python wrapper


def _tracing() -> bool:
    """torch.compile, torch.export or torch.jit.trace at work (checked on every call: kept cheap). Scripting needs
    no check: torch.jit.script cannot compile these layers' Python forward at all."""
    return _is_compiling() or _is_exporting() or _jit_state() is not None


def _usable(layer, x: torch.Tensor) -> bool:
    if _tracing():  # first: under torch.compile / export nothing else here is traced
        return False
    return (layer.use_kernels and type(x) is torch.Tensor and x.is_cpu and x.is_floating_point()
            and not (x.requires_grad and torch.is_grad_enabled()))


def select(layer, x2: torch.Tensor) -> str | None:
    """Path for a QuantLinear and its 2-D input [M, K], or None for the reference path."""
    if not _usable(layer, x2) or x2.shape[-1] != layer.in_features:
        return None
    return _choose(layer, "linear", x2, x2.shape[0], ())


def select_conv(layer, x: torch.Tensor) -> str | None:
    """Path for a QuantConv1d/2d and its input [B, C, ...], or None for the reference path."""
    if not _usable(layer, x) or x.dim() != len(layer.kernel_size) + 2 or x.shape[1] != layer.in_channels:
        return None  # (batched input only; wrong channels: the reference path raises torch's error)
    return _choose(layer, "conv", x, x.shape[0], tuple(x.shape[1:]))


def forward(layer, x: torch.Tensor, kind: str = "linear") -> torch.Tensor | None:
    """select + run in one call (the layers' forward): the output, or None for the reference path. The common
    case (a decision already made, kernel state current) is inlined here: a few checks and dictionary lookups,
    then the kernel (a quantized layer's own cost on top of its float layer's is mostly this function)."""
    if not _usable(layer, x):
        return None
    shape = x.shape
    if kind == "linear":  # (QuantLinear.forward has checked the width)
        extra = ()
    elif len(shape) != len(layer.kernel_size) + 2 or shape[1] != layer.in_channels:  # (batched input only)
        return None
    else:
        extra = shape[1:]  # a torch.Size: hashes and compares as the tuple the plan is keyed by
    m = shape[0]
    choice = layer._kernel_plan.get((1 if m <= 1 else 1 << (m - 1).bit_length(), x.dtype, extra))
    name = choice.path if choice is not None else _choose(layer, kind, x, m, tuple(extra))
    if name is None or name == "reference":
        return None
    state = layer._kernel_cache.get(name)
    if state is None or layer.__dict__.get("_kernel_sig") != _signature(layer):
        return _run(layer, kind, name, x)
    y = paths.run(kind, name, state, layer, x)
    return y if y is not None else _run(layer, kind, name, x)


def run(layer, name: str, x2: torch.Tensor) -> torch.Tensor:
    """y [M, N] in x2's dtype, bias included."""
    return _run(layer, "linear", name, x2)


def run_conv(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """y [B, O, ...] in x's dtype, bias included."""
    return _run(layer, "conv", name, x)


def _run(layer, kind: str, name: str, x: torch.Tensor) -> torch.Tensor:
    y = paths.run(kind, name, _state(layer, kind, name), layer, x)
    if y is not None:
        return y
    # the kernel declined: some rows (samples) hold NaN or Inf (or, for the native integer products, a value of
    # |x| >= native.HUGE_ABS). Those go through the reference path, which propagates them as float does; the others
    # still run the kernel, so they do not change. (NaN < HUGE_ABS is False: one comparison finds all three.)
    good = (x.flatten(1).abs() < native.HUGE_ABS).all(1)
    out = layer.reference(x)
    if good.any():
        y = paths.run(kind, name, _state(layer, kind, name), layer, x[good])
        if y is not None:  # (a bf16 path also declines finite rows whose sum overflows: those keep the reference's)
            out[good] = y.to(out.dtype)
    return out


def _choose(layer, kind: str, x: torch.Tensor, rows: int, extra: tuple) -> str | None:
    key = (bucket(rows), x.dtype, extra)
    plan = layer._kernel_plan
    choice = plan.get(key)
    if choice is None:
        choice = plan[key] = _decide(layer, kind, x, key)
    return None if choice.path == "reference" else choice.path


def _candidates(layer, kind: str, rows: int, cpu: CpuInfo) -> list[str]:
    names = [n for n in (paths.LINEAR if kind == "linear" else paths.CONV) if paths.applies(kind, n, layer, cpu, rows)]
    return names + ["reference"]


def _bf16_conv_ok(layer, extra) -> bool:
    """torch's bf16 convolution (oneDNN) computes garbage (relative error ~1, NaN, 1e37) for a stride above 1 with
    an output one pixel wide (found on this session's Intel Xeon, e.g. Conv2d(64, 64, 3, stride=2) over 11 x 4): the
    bf16 paths are left out there."""
    stride = layer.stride if isinstance(layer.stride, tuple) else (layer.stride,)
    if max(stride) <= 1:
        return True
    x = torch.empty((1, *extra), device="meta")
    w = torch.empty(layer.weight_shape, device="meta")
    out = layer._float._conv_forward(layer, x, w, None).shape[2:]
    return min(out) > 1


def _decide(layer, kind: str, x: torch.Tensor, key: tuple) -> Choice:
    b, dtype, extra = key
    cpu = cpu_info()
    mode = getattr(layer, "kernel_mode", "memory")
    names = _candidates(layer, kind, b, cpu)
    dense = ["dense"] + [n for n in ("dense-bf16", "dense-cl") if paths.applies(kind, n, layer, cpu, b)]
    dense = dense if mode == "speed" else []
    if kind == "conv" and not _bf16_conv_ok(layer, extra):
        names, dense = [n for n in names if n != "decode-bf16"], [n for n in dense if n != "dense-bf16"]
    if not tuning_enabled():
        path = paths.static_choice(kind, names, layer, cpu, b)
        if path in (None, "native-decode") and dense:  # speed mode: a kept copy beats decoding at every call
            path = "dense"
        path = path or "reference"
        return Choice(path, b)
    # below EXACT_ROWS timed at the rows of the call that asks (the bucket's other sizes then follow its choice): a
    # model called with 11 rows runs kernels that from 16 rows on take another path (the narrow int16 product of a
    # copy); from there on at the bucket's bound, so that the disk cache serves every size of the bucket
    rows = max(1, x.shape[0]) if x.shape[0] < EXACT_ROWS else b
    shape = (rows, *extra) if kind == "conv" else (rows, x.shape[1])
    xt = torch.randn(shape, dtype=dtype)
    fns = {n: (lambda n=n: _call(layer, kind, n, xt)) for n in names + dense}
    w = layer.dequantized_weight(torch.float32).to(dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    if kind == "linear":
        float_fn = lambda: F.linear(xt, w, bias)  # noqa: E731
    else:
        float_fn = lambda: layer._float._conv_forward(layer, xt, w, bias)  # noqa: E731
    # the output can be far larger than the input (a stem over one channel: 32x); its size from meta tensors
    if kind == "linear":
        out_bytes = rows * layer.weight_shape[0] * xt.element_size()
    else:
        out_bytes = layer._float._conv_forward(layer, xt.to("meta"), w.to("meta"), None).nbytes
    _settle_allocator(8 * max(xt.nbytes, out_bytes))
    act = "" if layer.act is None else str(layer.act)
    geo = "" if kind == "linear" else f"|k{layer.kernel_size}s{layer.stride}p{layer.padding}d{layer.dilation}g{layer.groups}"
    sparse = "|sparse" if "weight_mask" in layer._buffers else ""  # its reference path decodes a bitmask too
    cache_key = (f"{kind}|{'x'.join(map(str, layer.weight_shape))}{geo}|{layer.weight_format}{sparse}|{act}|"
                 f"{str(dtype).replace('torch.', '')}|rows{rows}|{'x'.join(map(str, extra))}|{mode}|"
                 f"threads{torch.get_num_threads()}|{','.join(sorted(fns))}")
    before, timed = None, "hot"
    model_bytes = getattr(layer, "model_weight_bytes", None) or 0  # note_model: what its model reads per pass
    streamed = w.numel() * 4 >= COLD_BYTES or model_bytes > cache_bytes(2)
    lib = build.load() if streamed else None
    if lib is not None:  # its weights (and each path's state) come from memory at each call: timed so
        timed = "cold"

        def before(name: str) -> None:
            held = [w, bias, *layer._buffers.values(), layer._kernel_cache.get(name)]
            for t in _tensors(held):
                lib.flush(t.data_ptr(), t.numel() * t.element_size())
    elif streamed or xt.nbytes + out_bytes >= WARM_INPUT_BYTES:  # timed with only the input in the nearest caches
        timed, before = "input only", _only_in_cache(xt)
    cache_key += TIMED_KEYS[timed]  # (a cached choice was timed the same way)
    choice = guard.measure(cache_key, b, fns, float_fn, mode, guard.TuneCache.for_cpu(cpu),
                           meta={"cpu": cpu.describe(), "torch": torch.__version__}, before=before, timed=timed)
    keep = {c.path for c in layer._kernel_plan.values()} | {choice.path}
    for n in list(layer._kernel_cache):  # drop the states of paths timed but not chosen (a dense copy above all)
        if n not in keep and n in fns:
            del layer._kernel_cache[n]
    return choice


COLD_BYTES = 4 << 20  # layers whose fp32 weight is at least this large are timed with cold caches
TIMED_KEYS = {"hot": "", "cold": "|cold", "input only": "|warm-input"}  # timing condition -> tune-cache key suffix
EXACT_ROWS = 16  # calls of fewer rows are timed at their own number of rows, larger ones at their bucket's bound
# A layer's own size is not the whole story: in a model whose weights exceed the L2, the other layers' weights pass
# through the caches between two calls of a layer, however small it is. Timed call after call, a 65-200K-weight
# layer of shakespeare-lm kept its fp32 weights in L2 and the guard chose dense fp32 copies in speed mode; in the
# generation loop the packed codes ran 1.6-2x faster than they (Intel Xeon, AVX2 switches, w4-g32). Such layers are
# timed cold, as from memory, not merely out of L2: minilm's Linear(384, 1536) over 11 rows (AVX2 switches, int8)
# ran float 0.50 ms / packed 0.20 inside the model; timed cold 0.475 / 0.160, with only L2 cleared 0.24 / 0.16 and
# 0.32 / 0.29 at 16 rows, where speed mode then kept dense copies (a KVM guest's L3, 480 MB by its own account, is
# shared with other guests). `note_model` tells each quantized layer what its model reads per pass.
# Layers whose input and output take at least WARM_INPUT_BYTES are timed with only their input in cache (EVICT_BYTES
# written before each call: twice the largest per-core L2 on the x86 CPUs modelpress has met). Timed call after call,
# a path's scratch (activation codes, bf16 copies) and output stay in L2; in a model the layers in between evict
# them. A CTR model's Linear(64, 16) over 4096 rows: int8 weight-only with bf16 tiles 1.24x float timed alone,
# 0.64x inside the model (ctr zoo model, AMD EPYC Zen 5, one thread).
WARM_INPUT_BYTES = 256 << 10
EVICT_BYTES = 4 << 20


def note_model(model: torch.nn.Module, only_missing: bool = False) -> None:
    """Note on each quantized layer of `model` the bytes of fp32 weight the model reads in one forward pass: every
    layer's weights but embedding tables' (a pass reads a few of their rows), a weight shared by several layers
    once, a weight rebuilt at each pass (product quantization's `rebuilt_numel`) as well as the tensors it is
    rebuilt from. Where that total exceeds the L2, the guard times a layer's paths with its weights (and each path's state)
    evicted from every cache, as they arrive in the model. quantize_, load, convert_, prune_, recover_ and every
    structural change (recipe.structure.record: factorize_, fuse_, prune_channels_, ...) call this on the model they
    changed; set_kernels with `only_missing` (it may be given a part of a model). A layer built on its own is timed
    by its own size."""
    total, layers, seen = 0, [], set()
    for m in model.modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            continue
        if hasattr(m, "_kernel_plan"):
            layers.append(m)
            codes = m._buffers.get(f"{m.qnames[0]}_codes")  # tied layers share their packed tensors
            key = id(codes if codes is not None else m)
            if key not in seen:
                total += 4 * sum(math.prod(s) for s in m.qshapes.values())
            seen.add(key)
        for p in m.parameters(recurse=False):  # float layers' weights; biases and norms of quantized ones
            if id(p) not in seen:
                seen.add(id(p))
                total += 4 * p.numel()
        rebuilt = getattr(m, "rebuilt_numel", None)  # a weight rebuilt at each pass (product-quantized layers)
        if rebuilt is not None:
            total += 4 * rebuilt()
    for m in layers:
        if only_missing and getattr(m, "model_weight_bytes", None) is not None:
            continue
        if getattr(m, "model_weight_bytes", None) != total:
            m.model_weight_bytes = total
            m._kernel_plan = {}  # decided for another setting: decided again on the next call
            m._kernel_cache.clear()


def _settle_allocator(nbytes: int) -> None:
    """Free one block of `nbytes` (at most 32 MB) before timing. glibc serves large allocations with fresh mmap'd
    pages (a page fault per 4 KB on first touch) until a block that large has been freed once; after that, as in a
    process that has run a few forward passes, it reuses its heap. Without this, a fresh process timed the paths
    that allocate activation-sized temporaries several times slower than they run later (a 256 x 2048 depthwise
    layer: 2.9 ms instead of 0.7), and the guard chose by that. The block is sized by the larger of the input and
    the output: sized by the input alone, a Conv2d(1, 32, 3) over 256 x 8 x 8 (a 2 MB output for a 64 KB input)
    timed its float layer at 1.6 ms instead of 0.14 in a process without steady_malloc, and the guard kept a bf16
    copy for a "6.3x" that was not there."""
    block = torch.empty(min(nbytes, 32 << 20), dtype=torch.uint8)
    del block


def _tensors(obj, depth: int = 0) -> list[torch.Tensor]:
    """The CPU tensors a kernel state holds (tensors, tuples/lists of them, or an object's attributes)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.device.type == "cpu" and obj.numel() else []
    if depth > 2 or obj is None:
        return []
    items = obj if isinstance(obj, (list, tuple)) else getattr(obj, "__dict__", {}).values()
    return [t for o in items for t in _tensors(o, depth + 1)]


def _call(layer, kind: str, name: str, x: torch.Tensor):
    if name == "reference":
        return layer.reference(x)
    return paths.run(kind, name, _state(layer, kind, name), layer, x)


def _signature(layer) -> list:
    """What the kernel states derive from: each buffer (and the bias) as an object, its storage and its version
    counter. A replaced buffer is a new object (`_cached` keeps the old ones referenced, so an id is never reused
    while it is compared); `t.data = ...` changes the storage; an in-place write bumps the counter (inference
    tensors have none: checked first, since reading their counter raises, and an exception per call costs ~8 us)."""
    d = layer.__dict__
    bias = layer._parameters.get("bias")
    if not d.get("_kernel_inference"):
        try:  # (one flat list: this runs at every call)
            sig = []
            for t in layer._buffers.values():
                if t is not None:
                    sig += (id(t), t.data_ptr(), t._version)
            if bias is not None:
                sig += (id(bias), bias.data_ptr(), bias._version)
            return sig
        except RuntimeError:  # an inference tensor: remember, so that this is raised once, not at every call
            d["_kernel_inference"] = True
    ts = (*layer._buffers.values(), bias)
    return [(id(t), t.data_ptr(), -1 if t.is_inference() else t._version) for t in ts if t is not None]


def _cached(layer, name: str, make):
    """The state `name` derived from the layer's buffers: made once, made again after they change."""
    cache = layer._kernel_cache
    sig = _signature(layer)
    d = layer.__dict__  # plain attributes: nn.Module.__setattr__ is slow for a per-call write
    if d.get("_kernel_sig") != sig:
        cache.clear()  # a buffer was written in place or replaced: every layout derived from it is stale
        d["_kernel_sig"] = sig
        d["_kernel_refs"] = [*layer._buffers.values(), layer._parameters.get("bias")]  # ids stay unique
    state = cache.get(name)
    if state is None:
        state = cache[name] = make()
    return state


def _state(layer, kind: str, name: str):
    return _cached(layer, name, lambda: paths.prepare(kind, name, layer, cpu_info()))


def _speed_mode(layer) -> bool:
    return not _tracing() and layer.use_kernels and getattr(layer, "kernel_mode", "memory") == "speed"


def dense_table(layer) -> torch.Tensor | None:
    """Speed mode for embedding tables: the decoded table, kept beside the codes (4 bytes per weight in float32)
    and rebuilt when they change; None in memory mode, with kernels off, or while tracing (lookups then decode
    only the rows they ask for)."""
    if not _speed_mode(layer):
        return None
    return _cached(layer, "dense-table", lambda: layer.float_param("weight").detach())


def speed_table(layer, idx: torch.Tensor, dense_fn, native_fn) -> torch.Tensor | None:
    """Speed mode for embedding tables: torch's lookup on the decoded copy (`dense_fn(table)`) or the native decoder
    as in memory mode (`native_fn()`, None where it does not apply): the decoder where the guard measured it at
    least guard.SPEED_MARGIN faster for this many ids, else the copy (timed once per bucket of `idx.numel()`, on this
    call's ids, and cached on disk like the layers' choices; without timing, the copy). At a few ids the decoder's
    single native call beats torch's lookup (4-bit bag of one id: 4.0 vs 5.6 us, AMD EPYC), at thousands it can
    lose. None outside speed mode."""
    if not _speed_mode(layer):
        return None
    key = (bucket(idx.numel()), "ids", ())
    choice = layer._kernel_plan.get(key)
    if choice is None and idx.numel():  # (no lookup to time in an empty one)
        choice = _decide_table(layer, key[0], idx, dense_fn, native_fn)
        if choice is not None:
            layer._kernel_plan[key] = choice
    if choice is not None and choice.path == "native":
        y = native_fn()
        if y is not None:
            return y
    return dense_fn(dense_table(layer))


def _only_in_cache(x: torch.Tensor):
    """The guard's `before` hook for timing with only `x` in the nearest caches: EVICT_BYTES written (every path's
    weights, scratch and output go, float's too), then `x` read, which in a model the layer before has just written."""
    evict = torch.empty(EVICT_BYTES, dtype=torch.uint8)

    def before(name: str) -> None:
        evict.fill_(1)
        x.sum()
    return before


def _decide_table(layer, b: int, idx: torch.Tensor, dense_fn, native_fn) -> Choice | None:
    """The choice for lookups of up to `b` ids, or None (not kept) where the decoder declined this call's ids
    (an id outside the table, per-sample weights, ...): the next call decides again. Lookups whose rows gathered
    (ids x width x 4 bytes) or table are large are timed with only the ids in cache (as the linear layers' "input
    only"): timed call after call, a CTR model's fp32 tables and outputs stayed in L2, and the copy measured 1.2x
    faster than the 8-bit decoder for 4096 ids per bag, while inside the model the decoder ran 1.2-1.5x faster than
    the float bags (Intel Xeon)."""
    if not tuning_enabled():
        return Choice("dense", b)
    if native_fn() is None:
        return None
    cpu = cpu_info()
    kind = f"bag-{layer.mode}" if hasattr(layer, "mode") else "rows"
    table = dense_table(layer)  # the copy path pays for fetching (and checking) its copy at every call; float does not
    before, timed = None, "hot"
    if idx.numel() * layer.embedding_dim * 4 >= WARM_INPUT_BYTES or table.nbytes > cache_bytes(2):
        timed, before = "input only", _only_in_cache(idx)  # (the rows gathered: the bags' sums are fewer)
    key = (f"table|{layer.num_embeddings}x{layer.embedding_dim}|{layer.weight_format}|{kind}|ids{b}|"
           f"threads{torch.get_num_threads()}{TIMED_KEYS[timed]}")
    fns = {"native": native_fn, "dense": lambda: dense_fn(dense_table(layer))}
    return guard.measure(key, b, fns, lambda: dense_fn(table), "speed", guard.TuneCache.for_cpu(cpu),
                         meta={"cpu": cpu.describe(), "torch": torch.__version__}, before=before, timed=timed)


def table_rows(layer, idx: torch.Tensor) -> torch.Tensor | None:
    """Embedding tables in memory mode (and speed mode where it measured faster: speed_table): rows `idx` decoded by
    the native decoder, fp32 [n, dim], the same values as the reference decoding; None where it does not apply (no
    native build, a format decode.py does not read, a pruned table, kernels off, tracing, an id outside the table:
    the caller's reference decoding then runs, and raises for a bad id)."""
    state = _table_decoder(layer, idx)
    return None if state is None else state.rows(idx)


def _table_decoder(layer, idx: torch.Tensor):
    """The table's native decoder for lookups of `idx` (built once, rebuilt when the buffers change), or None."""
    if _tracing() or not layer.use_kernels or idx.device.type != "cpu":
        return None
    state = _cached(layer, "native-rows", lambda: decode.decoder(layer) or False)
    return None if state is False else state


def table_bags(layer, idx: torch.Tensor, offsets: torch.Tensor | None, per_sample_weights) -> torch.Tensor | None:
    """Embedding bags in memory mode (and speed mode where it measured faster: speed_table): each bag's rows decoded
    and summed (mean: averaged) in one native pass, the same numbers as F.embedding_bag over the decoded rows; None
    where it does not apply (modes other than sum and mean, per-sample weights, a padding index, a float dtype other
    than fp32, ... as `table_rows`)."""
    if (layer.mode not in ("sum", "mean") or per_sample_weights is not None or layer.padding_idx is not None
            or layer.float_dtype != torch.float32 or not idx.numel()):
        return None
    if not ((idx.dim() == 2 and offsets is None) or (idx.dim() == 1 and offsets is not None and offsets.dim() == 1
                                                    and offsets.numel())):
        return None
    state = _table_decoder(layer, idx)
    return None if state is None else state.bags(idx, offsets, layer.include_last_offset, layer.mode == "mean")


def describe(layer) -> list[dict]:
    """The layer's decisions so far, one per (rows bucket, dtype): path, speed against float, how decided."""
    kind = "linear" if hasattr(layer, "in_features") else "conv"
    cpu = cpu_info()
    out = []
    table = layer._kernel_cache.get("dense-table")
    if table is not None:  # an embedding table in speed mode: lookups read the decoded copy
        out.append({"rows": "any", "dtype": str(table.dtype).replace("torch.", ""), "input": [], "path": "dense table",
                    "speedup": None, "source": "speed mode", "extra_bytes": table.numel() * table.element_size()})
    if layer._kernel_cache.get("native-rows") and table is None:  # memory mode: every lookup decodes its rows
        out.append({"rows": "any", "dtype": "float32", "input": [], "path": "native decode (lookups)",
                    "speedup": None, "source": "memory mode", "extra_bytes": 0})
    for (rows, dtype, extra), c in sorted(layer._kernel_plan.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if dtype == "ids":  # an embedding table in speed mode (speed_table): lookups of up to `rows` ids
            out.append({"rows": rows, "dtype": "ids", "input": [], "speedup": None if c.speedup is None else
                        round(c.speedup, 3), "source": c.source, "timed": c.timed, "extra_bytes": 0,
                        "path": "native decode (lookups)" if c.path == "native" else "dense table"})
            continue
        out.append({"rows": rows, "dtype": str(dtype).replace("torch.", ""), "input": list(extra),
                    "path": "reference" if c.path == "reference" else paths.display(kind, c.path, layer, cpu),
                    "speedup": None if c.speedup is None else round(c.speedup, 3), "source": c.source,
                    "timed": c.timed, "extra_bytes": paths.extra_bytes(c.path, layer)})
    return out


__all__ = ["select", "select_conv", "run", "run_conv", "describe", "dense_table", "speed_table", "cpu_info", "CpuInfo", "Choice", "bucket",
           "tuning_enabled", "MODES", "default_mode", "check_mode"]
