"""Output fidelity and true size of every weight format on a random two-layer MLP.

For each format: the signal-to-quantization-noise ratio of the MLP's output (x [512, 128] -> 256 -> ReLU -> 64,
weights randn / sqrt(fan_in), seed 0), the bits-per-parameter accounting (codes + scales + zero points), and the
tensor bytes `modelpress.save` actually writes for the two quantized weights, compared with that accounting.

    python benchmarks/formats.py [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from torch import nn

import modelpress as mp
from modelpress.formats import bits_per_param

FORMATS = ["int8", "int8:tensor", "int6:g32", "int5:g32", "int4:g32", "int4:g32:asym", "int4:g128", "int3:g32",
           "int2:g16", "int2:g16:asym", "int1:g32", "ternary:g32", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3",
           "fp4_e2m1", "mxfp8", "mxfp6", "mxfp4", "mxint8", "nvfp4"]
TARGETS = {"int8": 38, "int4:g32": 18, "fp8_e4m3": 25, "nvfp4": 14, "mxfp4": 12, "int2:g16": 4}  # dB, issue 2


def mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 256, bias=False), nn.ReLU(), nn.Linear(256, 64, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(256, 128) / 128 ** 0.5)
        m[2].weight.copy_(torch.randn(64, 256) / 256 ** 0.5)
    return m.eval()


def measure(fmt: str, x: torch.Tensor, ref: torch.Tensor) -> dict:
    m = mlp()
    mp.quantize_(m, mp.QuantConfig(weights=fmt))
    mp.set_kernels(m, False)  # fidelity of the format itself (kernels compute with bf16 inputs)
    with torch.inference_mode():
        out = m(x)
    sqnr = 10 * math.log10(float(ref.pow(2).sum() / (ref - out).pow(2).sum()))
    accounted = sum(bits_per_param(fmt, tuple(s)) * math.prod(s) / 8 for s in [(256, 128), (64, 256)])
    with tempfile.TemporaryDirectory() as d:
        mp.save(m, Path(d) / "m")
        saved = json.loads((Path(d) / "m" / "modelpress.json").read_text())["tensors"]["tensor_bytes"]
    return {"format": fmt, "sqnr_db": sqnr, "target_db": TARGETS.get(fmt), "bits_per_param": bits_per_param(fmt, (256, 128)),
            "accounted_bytes": accounted, "saved_bytes": saved, "bytes_diff_pct": 100 * (saved - accounted) / accounted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    with torch.inference_mode():
        ref = mlp()(x)
    rows = [measure(f, x, ref) for f in FORMATS]
    print("| format | output SQNR (dB) | target | bits/param | accounted bytes | saved bytes | diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t = "" if r["target_db"] is None else f"≥ {r['target_db']} {'met' if r['sqnr_db'] >= r['target_db'] else 'MISSED'}"
        print(f"| `{r['format']}` | {r['sqnr_db']:.2f} | {t} | {r['bits_per_param']:.3f} | {r['accounted_bytes']:,.0f} | "
              f"{r['saved_bytes']:,} | {r['bytes_diff_pct']:+.2f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
