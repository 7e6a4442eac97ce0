"""Ten tiny Hugging Face architectures through quantize_ -> save -> load -> forward: what gets quantized, true
bytes before and after (tied weights stored once: the bytes a per-user copy would have cost are shown), output
cosine against the float model, and whether the reload is bit-exact.

    python benchmarks/architectures.py [--formats int4:g32,int8] [--arch gpt2 ...]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import modelpress as mp
from modelpress.quant import QuantMixin, quant_class
from modelpress.zoo.tiny_hf import ARCHS, build


def run(arch: str, fmt: str) -> dict:
    m, x = build(arch)
    with torch.no_grad():
        ref = m(**x).logits
    float_bytes = mp.inspect(m).total_bytes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.quantize_(m, fmt)
    with torch.no_grad():
        y = m(**x).logits
    with tempfile.TemporaryDirectory() as d:
        mp.save(m, Path(d) / "q")
        manifest = json.loads((Path(d) / "q" / "modelpress.json").read_text())
        fresh, _ = build(arch)
        with torch.no_grad():
            exact = torch.equal(mp.load(Path(d) / "q", fresh)(**x).logits, y)
    state = m.state_dict()
    tied = sum(state[a].numel() * state[a].element_size() for a in manifest["aliases"])
    types = sorted({type(q).__name__ for q in m.modules() if isinstance(q, QuantMixin)})
    left = [n for n, q in m.named_modules() if not isinstance(q, QuantMixin) and quant_class(q) is not None]
    return {"arch": arch, "format": fmt, "quantized": sum(isinstance(q, QuantMixin) for q in m.modules()),
            "types": types, "linear_like_left_float": left, "float_bytes": float_bytes,
            "bytes": mp.inspect(m).total_bytes, "tied_bytes_saved": tied,
            "cosine": F.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item(), "reload_bit_exact": exact,
            "warnings": [str(w.message) for w in caught if "layer" in str(w.message)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int4:g32,int8")
    ap.add_argument("--arch", nargs="*", default=ARCHS, choices=ARCHS)
    ap.add_argument("--json", help="also write every row to this file")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = [run(a, f) for a in args.arch for f in args.formats.split(",")]
    print("| arch | format | layers quantized (types) | Linear-like left float | float bytes | quantized bytes | "
          "tied bytes saved | cosine vs float | reload bit-exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['format']} | {r['quantized']} ({', '.join(t.removeprefix('Quant') for t in r['types'])}) "
              f"| {len(r['linear_like_left_float'])} | {r['float_bytes']:,} | {r['bytes']:,} "
              f"({r['float_bytes'] / r['bytes']:.1f}x) | {r['tied_bytes_saved']:,} | {r['cosine']:.4f} | "
              f"{'yes' if r['reload_bit_exact'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
