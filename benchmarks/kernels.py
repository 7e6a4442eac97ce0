"""CPU kernel speed of QuantLinear: ms per layer and speedup against fp32, measured in the same run.

A stack of Linear layers holding more than 256 MB of fp32 weights (default 8 x 4096x4096 = 512 MB) is run
at M = 1, 8 and 32 rows for: fp32, bf16 (model.to(bfloat16), bf16 input), int8 weight-only, int8 weights +
int8 dynamic activations, int4 g32 and int4 g128 (symmetric). The weights exceed the CPU caches, so every
layer streams its weights from memory, as in real decoding.

Each layer gets the same input (layers are not chained), so values stay in range whatever the format.
Timing: rounds that run every configuration once (interleaved, so background load hits all of them alike);
warm-up rounds first, then the median of the timed rounds, divided by the number of layers.

Quantized weights are round-to-nearest without the MSE clipping search by default (`--mse` turns it on):
the codes stored do not change the kernel's speed, and the search takes about a minute per 4096x4096 int4
layer on 2 cores. Each format is quantized once and every layer gets its own copy of the buffers.

    python benchmarks/kernels.py            # full run (a few minutes on 2 cores)
    python benchmarks/kernels.py --quick    # smoke run with small layers (seconds)
    python benchmarks/kernels.py --json results.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.formats import QTensor, quantize_tensor
from modelpress.quant import QuantLinear, kernels

CONFIGS = [  # name, weight format, activation format
    ("fp32", None, None),
    ("bf16", None, None),
    ("int8 weight-only", "int8", None),
    ("int8 w + int8 act", "int8", "int8"),
    ("int4 g32", "int4:g32", None),
    ("int4 g128", "int4:g128", None),
]
TARGETS = {("int4 g128", 1): 7.0, ("int8 w + int8 act", 1): 4.5}  # min speedup vs fp32 at M=1 (decode)


def clone_qtensor(q: QTensor) -> QTensor:
    t = {k: v.clone() for k, v in q.tensors().items()}
    return QTensor(q.fmt, q.shape, t["codes"], t["scale"], t.get("zero"), t.get("global_scale"))


def build(layers: int, size: int, mse: bool) -> dict[str, list[nn.Module]]:
    torch.manual_seed(0)
    fp32 = [nn.Linear(size, size) for _ in range(layers)]
    stacks = {"fp32": fp32, "bf16": [copy.deepcopy(m).to(torch.bfloat16) for m in fp32]}
    for name, fmt, act in CONFIGS:
        if fmt is None:
            continue
        q = quantize_tensor(fp32[0].weight.detach(), fmt, mse=mse if fmt.startswith("int4") else None)
        stacks[name] = [QuantLinear.from_float(m, fmt, act, qweight=q if i == 0 else clone_qtensor(q))
                        for i, m in enumerate(fp32)]
    return stacks


def run_pass(stack: list[nn.Module], x: torch.Tensor) -> None:
    for layer in stack:
        layer(x)


def kernel_name(stack: list[nn.Module], x: torch.Tensor) -> str:
    layer = stack[0]
    if not isinstance(layer, QuantLinear):
        return "aten.linear"
    name = kernels.select(layer, x)
    if name is None:
        raise RuntimeError(f"{layer} fell back to the reference path at M={x.shape[0]}: no kernel selected")
    return name


@torch.inference_mode()
def measure(stacks, size: int, ms: list[int], warmup: int, repeats: int) -> list[dict]:
    rows = []
    for m in ms:
        x32 = torch.randn(m, size)
        inputs = {name: x32.to(torch.bfloat16) if name == "bf16" else x32 for name in stacks}
        times = {name: [] for name in stacks}
        for r in range(warmup + repeats):
            for name, stack in stacks.items():
                t0 = time.perf_counter()
                run_pass(stack, inputs[name])
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
        ref = stacks["fp32"][0](x32)
        base = statistics.median(times["fp32"]) / len(stacks["fp32"])
        for name, stack in stacks.items():
            per_layer = statistics.median(times[name]) / len(stack)
            y = stack[0](inputs[name])
            assert y.dtype == inputs[name].dtype and y.shape == (m, size)
            y = y.float()
            rows.append({"config": name, "M": m, "kernel": kernel_name(stack, inputs[name]),
                         "ms_per_layer": 1e3 * per_layer, "speedup_vs_fp32": base / per_layer,
                         "ms_per_layer_min": 1e3 * min(times[name]) / len(stack),
                         "cosine_vs_fp32": F.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()})
    return rows


def table(rows: list[dict], ms: list[int]) -> str:
    head = "| config | kernel (" + " / ".join(f"M={m}" for m in ms) + ") | " + " | ".join(
        f"M={m} ms/layer | M={m} vs fp32" for m in ms) + " | cosine vs fp32 |"
    lines = [head, "|" + "---|" * (3 + 2 * len(ms))]
    for name, _, _ in CONFIGS:
        r = {x["M"]: x for x in rows if x["config"] == name}
        ks = [r[m]["kernel"] for m in ms]
        kern = ks[0] if len(set(ks)) == 1 else " / ".join(ks)
        cells = " | ".join(f"{r[m]['ms_per_layer']:.3f} | {r[m]['speedup_vs_fp32']:.2f}x" for m in ms)
        lines.append(f"| {name} | {kern} | {cells} | {min(r[m]['cosine_vs_fp32'] for m in ms):.5f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="Linear layers in the stack (default 8)")
    p.add_argument("--size", type=int, default=4096, help="in = out features of each layer (default 4096)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 32], help="rows per call (default 1 8 32)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, normally one per core)")
    p.add_argument("--mse", action="store_true", help="quantize int4 with the MSE clipping search (slow)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers of 512, 1 warm-up, 3 repeats")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.size, a.warmup, a.repeats = 2, 512, 1, 3
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    stacks = build(a.layers, a.size, a.mse)
    build_s = time.perf_counter() - t0
    rows = measure(stacks, a.size, a.m, a.warmup, a.repeats)
    fp32_mb = a.layers * a.size * a.size * 4 / 2**20
    info = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "layers": a.layers, "size": a.size, "fp32_weight_mb": fp32_mb, "warmup": a.warmup,
            "repeats": a.repeats, "mse": a.mse, "build_s": build_s, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "loadavg_1min": os.getloadavg()[0]}
    targets = [{"config": c, "M": m, "target": t, "speedup": r["speedup_vs_fp32"], "met": r["speedup_vs_fp32"] >= t}
               for (c, m), t in TARGETS.items() for r in rows if r["config"] == c and r["M"] == m]
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}; {a.layers} x Linear({a.size}, {a.size}) "
          f"= {fp32_mb:.0f} MB fp32; median of {a.repeats} rounds after {a.warmup} warm-up; built in {build_s:.1f} s; "
          f"{info['time']}, load average {info['loadavg_1min']:.2f}")
    print()
    print(table(rows, a.m))
    print()
    for t in targets:
        print(f"target M={t['M']} {t['config']} >= {t['target']}x fp32: {t['speedup']:.2f}x "
              f"({'met' if t['met'] else 'NOT met'})")
    result = {"info": info, "rows": rows, "targets": targets}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
