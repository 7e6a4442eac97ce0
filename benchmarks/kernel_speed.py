"""CPU kernel speed of QuantLinear against fp32 in the same run, with the effective weight bandwidth. (Not named
kernels.py: scripts run from this folder put it first on sys.path, where it would shadow the `kernels` package that
transformers imports.)

A stack of Linear layers holding more than 256 MB of fp32 weights (default 8 x 4096x4096 = 512 MB) is run at
M = 1, 8, 32 and 256 rows for: fp32, bf16 (model.to(bfloat16), bf16 input), int8 weight-only, int8 weights + int8
dynamic activations (W8A8), int4 g32 and int4 g128 (symmetric). Each layer gets the same input (layers are not
chained). The quantized layers run what the speed guard picks for that M (`--mode memory|speed`; the guard's
one-off timing happens in the warm-up and is cached), or with `--all-paths` every path that is correct on this CPU
(native kernels, torch's int8pack / int4pack / int_mm / linear_dynamic, the reference path) one by one.

Timing: rounds that run every configuration once (interleaved, so background load hits all of them alike); warm-up
rounds first, then the median of the timed rounds divided by the number of layers.

Effective weight bandwidth: bytes of stored weights (codes + scales) read per second. Next to it, the bandwidth
of a streaming read of the same number of bytes (`torch.dot(buf, buf)`: BLAS, one pass over the buffer),
measured in the same rounds.

    python benchmarks/kernel_speed.py            # full run (a few minutes on 2 cores)
    python benchmarks/kernel_speed.py --quick    # smoke run with small layers (seconds)
    python benchmarks/kernel_speed.py --json results.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/kernel_speed.py        # an AVX2-only CPU, emulated on an AVX-512 one (fp32 baseline too)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

CLOCK = time.perf_counter  # --clock cpu: time.thread_time with one thread (CPU time: immune to preemption)
import torch.nn.functional as F
from torch import nn

from modelpress.formats import QTensor, quantize_tensor
from modelpress.quant import QuantLinear, kernels, set_kernels
from modelpress.runtime import steady_malloc
from modelpress.quant.kernels import paths

CONFIGS = [  # name, weight format, activation format
    ("fp32", None, None),
    ("bf16", None, None),
    ("int8 weight-only", "int8", None),
    ("int8 w + int8 act", "int8", "int8"),
    ("int4 g32", "int4:g32", None),
    ("int4 g128", "int4:g128", None),
    ("mxfp4", "mxfp4", None),
    ("nvfp4", "nvfp4", None),
]
ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "MKL_ENABLE_INSTRUCTIONS",
       "MODELPRESS_ISA", "MODELPRESS_TUNE", "MODELPRESS_KERNEL_MODE")


def targets(isa: str) -> list[tuple[str, int, str, float]]:
    """(config, M, what, minimum) from issue 7: speed vs fp32, and bandwidth vs the streaming read."""
    avx512 = isa.startswith("avx512")
    out = [("int4 g128", 1, "speedup", 7.5 if avx512 else 6.0), ("int8 weight-only", 1, "speedup", 3.5),
           ("int8 w + int8 act", 1, "speedup", 4.0), ("int4 g128", 1, "bandwidth", 0.6)]
    for m in (8, 32, 256):
        for name, fmt, _ in CONFIGS:
            if fmt is not None:
                out.append((name, m, "speedup", 1.5 if name == "int8 w + int8 act" else 1.0))
    return out


def clone_qtensor(q: QTensor) -> QTensor:
    t = {k: v.clone() for k, v in q.tensors().items()}
    return QTensor(q.fmt, q.shape, t["codes"], t["scale"], t.get("zero"), t.get("global_scale"))


def stored_bytes(layer: nn.Module) -> int:
    if isinstance(layer, QuantLinear):
        return sum(b.numel() * b.element_size() for b in layer.buffers())
    return layer.weight.numel() * layer.weight.element_size()


def build(layers: int, size: int, mse: bool, mode: str) -> dict[str, list[nn.Module]]:
    torch.manual_seed(0)
    fp32 = [nn.Linear(size, size) for _ in range(layers)]
    stacks = {"fp32": fp32, "bf16": [copy.deepcopy(m).to(torch.bfloat16) for m in fp32]}
    for name, fmt, act in CONFIGS:
        if fmt is None:
            continue
        q = quantize_tensor(fp32[0].weight.detach(), fmt, mse=mse if fmt.startswith("int4") else None)
        stacks[name] = [QuantLinear.from_float(m, fmt, act, qweight=q if i == 0 else clone_qtensor(q))
                        for i, m in enumerate(fp32)]
        for layer in stacks[name]:
            set_kernels(layer, True, mode=mode)
    return stacks


def path_variants(stacks, size: int, m: int) -> dict[str, tuple[list[nn.Module], str | None]]:
    """--all-paths: (stack, forced path) per (config, path) that is correct on this CPU at M = m."""
    out = {}
    info = kernels.cpu_info()
    for name, stack in stacks.items():
        if not isinstance(stack[0], QuantLinear):
            out[name] = (stack, None)
            continue
        for p in kernels._candidates(stack[0], "linear", m, info):
            out[f"{name} [{p}]"] = (stack, p)
    return out


def run_pass(stack, x, path) -> None:
    if path is None:
        for layer in stack:
            layer(x)
    elif path == "reference":
        for layer in stack:
            layer.reference(x)
    else:
        for layer in stack:
            kernels.run(layer, path, x)


def chosen(stack, x, path) -> str:
    layer = stack[0]
    if not isinstance(layer, QuantLinear):
        return "aten.linear"
    if path is not None:
        return path if path == "reference" else paths.display("linear", path, layer, kernels.cpu_info())
    row = next((r for r in kernels.describe(layer) if r["rows"] == kernels.bucket(x.shape[0])), None)
    return row["path"] if row else "reference"


@torch.inference_mode()
def measure(stacks, size: int, ms: list[int], warmup: int, repeats: int, all_paths: bool) -> list[dict]:
    rows = []
    for m in ms:
        x32 = torch.randn(m, size)
        variants = path_variants(stacks, size, m) if all_paths else {n: (s, None) for n, s in stacks.items()}
        nbytes = {n: sum(stored_bytes(layer) for layer in s) for n, (s, _) in variants.items()}
        streams = {b: torch.randn(max(1, b // 4)) for b in set(nbytes.values())}  # same byte count, as float32
        times = {n: [] for n in variants}
        stream_t = {b: [] for b in streams}
        for r in range(warmup + repeats):
            for name, (stack, path) in variants.items():
                x = x32.to(torch.bfloat16) if name.startswith("bf16") else x32
                t0 = CLOCK()
                run_pass(stack, x, path)
                if r >= warmup:
                    times[name].append(CLOCK() - t0)
            for b, buf in streams.items():
                t0 = CLOCK()
                torch.dot(buf, buf)
                if r >= warmup:
                    stream_t[b].append(CLOCK() - t0)
        ref = stacks["fp32"][0](x32)
        base = statistics.median(times["fp32"]) / len(stacks["fp32"])
        for name, (stack, path) in variants.items():
            x = x32.to(torch.bfloat16) if name.startswith("bf16") else x32
            per_layer = statistics.median(times[name]) / len(stack)
            y = stack[0](x) if path is None else (stack[0].reference(x) if path == "reference" else
                                                  kernels.run(stack[0], path, x))
            assert y.dtype == x.dtype and y.shape == (m, size)
            b = nbytes[name]
            stream_s = statistics.median(stream_t[b])
            rows.append({"config": name.split(" [")[0], "variant": name, "M": m, "kernel": chosen(stack, x, path),
                         "ms_per_layer": 1e3 * per_layer, "speedup_vs_fp32": base / per_layer,
                         "ms_per_layer_min": 1e3 * min(times[name]) / len(stack),
                         "weight_gb_s": b / len(stack) / per_layer / 1e9, "stream_gb_s": b / stream_s / 1e9,
                         "bandwidth_vs_stream": stream_s / (per_layer * len(stack)),
                         "cosine_vs_fp32": F.cosine_similarity(y.float().flatten(), ref.flatten(), dim=0).item()})
    return rows


def table(rows: list[dict], ms: list[int]) -> str:
    head = "| config | " + " | ".join(f"M={m} kernel | M={m} ms/layer | M={m} vs fp32" for m in ms)
    head += " | M=1 weight GB/s (stream GB/s) | cosine vs fp32 |"
    lines = [head, "|" + "---|" * (3 + 3 * len(ms))]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        r = {x["M"]: x for x in rows if x["variant"] == variant}
        cells = " | ".join(f"{r[m]['kernel']} | {r[m]['ms_per_layer']:.3f} | {r[m]['speedup_vs_fp32']:.2f}x"
                           if m in r else "— | — | —" for m in ms)
        first = r[min(r)]
        bw = f"{first['weight_gb_s']:.1f} ({first['stream_gb_s']:.1f}, {100 * first['bandwidth_vs_stream']:.0f}%)"
        lines.append(f"| {variant} | {cells} | {bw} | {min(x['cosine_vs_fp32'] for x in r.values()):.5f} |")
    return "\n".join(lines)


def check_targets(rows: list[dict], isa: str) -> list[dict]:
    out = []
    for config, m, what, minimum in targets(isa):
        r = next((x for x in rows if x["variant"] == config and x["M"] == m), None)
        if r is None:
            continue
        value = r["speedup_vs_fp32"] if what == "speedup" else r["bandwidth_vs_stream"]
        out.append({"config": config, "M": m, "what": what, "target": minimum, "value": value, "met": value >= minimum})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="Linear layers in the stack (default 8)")
    p.add_argument("--size", type=int, default=4096, help="in = out features of each layer (default 4096)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 32, 256], help="rows per call (default 1 8 32 256)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, normally one per core)")
    p.add_argument("--mode", choices=kernels.MODES, default="memory", help="kernel mode of the quantized layers")
    p.add_argument("--all-paths", action="store_true", help="time every correct path of each format separately")
    p.add_argument("--mse", action="store_true", help="quantize int4 with the MSE clipping search (slow)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers of 512, 1 warm-up, 3 repeats")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: one thread, CPU time of that thread (for a loaded machine: preemption does not count)")
    p.add_argument("--malloc", choices=("steady", "system"), default="steady",
                   help="steady (default): glibc keeps freed memory in its heap (modelpress.runtime.steady_malloc), "
                        "so timings do not depend on page faults; system: glibc's defaults")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = p.parse_args(argv)
    steady = a.malloc == "steady" and steady_malloc()
    if a.quick:
        a.layers, a.size, a.warmup, a.repeats = 2, 512, 1, 3
    global CLOCK
    if a.clock == "cpu":
        a.threads, CLOCK = 1, time.thread_time
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = CLOCK()
    stacks = build(a.layers, a.size, a.mse, a.mode)
    build_s = CLOCK() - t0
    info = kernels.cpu_info()
    rows = measure(stacks, a.size, a.m, a.warmup, a.repeats, a.all_paths)
    fp32_mb = a.layers * a.size * a.size * 4 / 2**20
    meta = {"cpu": info.describe(), "isa": info.isa, "clock": a.clock, "cpu_flags_level": info.hardware, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "env": {k: os.environ[k] for k in ENV if k in os.environ},
            "layers": a.layers, "size": a.size, "fp32_weight_mb": fp32_mb, "warmup": a.warmup, "repeats": a.repeats,
            "mode": a.mode, "mse": a.mse, "build_s": build_s, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "loadavg_1min": os.getloadavg()[0], "malloc": "steady" if steady else "system"}
    print(f"{meta['cpu']}\n{meta['threads']} threads, {a.clock} clock, {meta['malloc']} malloc, torch {meta['torch']}, env {meta['env'] or '{}'}; "
          f"{a.layers} x Linear({a.size}, {a.size}) = {fp32_mb:.0f} MB fp32; kernel mode {a.mode}; median of "
          f"{a.repeats} rounds after {a.warmup} warm-up; {meta['time']}, load average {meta['loadavg_1min']:.2f}")
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2" and "MKL_ENABLE_INSTRUCTIONS" not in os.environ:
        print("note: MKL_ENABLE_INSTRUCTIONS is not set: the fp32 baseline still uses AVX-512 (set it to AVX2 too)")
    print()
    print(table(rows, a.m))
    print()
    tg = check_targets(rows, info.isa) if not a.quick else []
    for t in tg:
        unit = "x fp32" if t["what"] == "speedup" else " of the streaming read"
        print(f"target M={t['M']} {t['config']} {t['what']} >= {t['target']}{unit}: {t['value']:.2f} "
              f"({'met' if t['met'] else 'NOT met'})")
    result = {"info": meta, "rows": rows, "targets": tg}
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
