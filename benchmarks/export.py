"""Export targets (issue 8): ONNX parity and latency of zoo models in ONNX Runtime, and compressed-tensors logits
through transformers.from_pretrained.

    python benchmarks/export.py [--only onnx|ct] [--json out.json]

- ONNX: minilm W8A8 (int8 + dynamic int8 activations) and int4 g32 weight-only, digits-cnn W8A8; each exported
  with mp.export(..., format="onnx") on evaluation batches, which also runs ONNX Runtime next to PyTorch
  (parity.json: cosine, max abs error, top-1 agreement, median latency of each, interleaved). Targets: cosine
  >= 0.999 (minilm), top-1 agreement >= 0.995 (digits).
- compressed-tensors: a tiny LlamaForCausalLM (from a config, seeded) at int4 g128 and int8, exported and
  reloaded with AutoModelForCausalLM.from_pretrained; logits cosine against modelpress's model (default kernel
  path and reference path). Target: >= 0.9999.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import modelpress as mp
from modelpress import zoo


def onnx_case(name: str, recipe_weights: str, act: str | None, batches: int, tmp: Path) -> dict:
    entry = zoo.build(name)
    model = entry.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.quantize_(model, mp.QuantConfig(weights=recipe_weights, activations=act))
    inputs = [inp for inp, _ in list(entry.task.batches())[:batches]]  # held-out evaluation batches
    example = _concat(inputs)
    out = tmp / f"{name}-{recipe_weights}-{act}".replace(":", "_")
    t0 = time.perf_counter()
    mp.export(model, out, format="onnx", example_inputs=example, quiet=True)
    p = json.loads((out / "parity.json").read_text())
    size = (out / "model.onnx").stat().st_size
    return {"model": name, "weights": recipe_weights, "activations": act, "cosine": p["cosine"],
            "max_abs_error": p["max_abs_error"], "top1_agreement": p["top1_agreement"],
            "ort_ms": p["latency_ms"]["onnxruntime"], "pytorch_ms": p["latency_ms"]["pytorch"],
            "inputs": p["inputs"], "onnx_bytes": size, "export_s": time.perf_counter() - t0}


def _concat(batches):
    """One example batch from several (same keys / shapes padded by the zoo already)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        keys = first.keys()
        if all(b[k].shape[1:] == first[k].shape[1:] for b in batches for k in keys):
            return {k: torch.cat([b[k] for b in batches]) for k in keys}
        return first
    return first


def ct_case(weights: str, tmp: Path) -> dict:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.quantize_(model, mp.QuantConfig(weights=weights, exclude=["lm_head"]))
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kernel = model(ids).logits
        ref = mp.set_kernels(model, False)(ids).logits
        out = tmp / f"ct-{weights}".replace(":", "_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp.export(model, out, format="compressed-tensors")
            back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        got = back(ids).logits
    cos = lambda a, b: F.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()  # noqa: E731
    return {"weights": weights, "cosine_vs_reference_path": cos(got, ref), "cosine_vs_kernel_path": cos(got, kernel),
            "max_abs_error_vs_reference": (got - ref).abs().max().item(),
            "file_bytes": (out / "model.safetensors").stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["onnx", "ct"])
    ap.add_argument("--batches", type=int, default=4, help="evaluation batches in the ONNX example input")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = {"threads": torch.get_num_threads(), "onnx": [], "compressed_tensors": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "onnx"):
            for case in [("minilm", "int8", "int8"), ("minilm", "int4:g32", None), ("digits-cnn", "int8", "int8")]:
                r = onnx_case(*case, args.batches, tmp)
                results["onnx"].append(r)
                top1 = f" top-1 {r['top1_agreement']:.4f}" if r["top1_agreement"] is not None else ""
                print(f"onnx {r['model']:11s} {r['weights']:9s} act={r['activations']!s:5s} cosine {r['cosine']:.6f} "
                      f"max|err| {r['max_abs_error']:.3g}{top1}  ORT {r['ort_ms']:.1f} ms  PyTorch "
                      f"{r['pytorch_ms']:.1f} ms  inputs {r['inputs']}", flush=True)
        if args.only in (None, "ct"):
            for w in ["int4:g128", "int8"]:
                r = ct_case(w, tmp)
                results["compressed_tensors"].append(r)
                print(f"compressed-tensors {w:9s} from_pretrained cosine vs modelpress reference "
                      f"{r['cosine_vs_reference_path']:.7f}, vs kernel path {r['cosine_vs_kernel_path']:.7f}, "
                      f"max|err| {r['max_abs_error_vs_reference']:.3g}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
