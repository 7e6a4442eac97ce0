"""`modelpress export SAVED --format compressed-tensors|onnx --out DIR`: a saved model in the next tool's format.

SAVED must rebuild without extra arguments: a Hugging Face model saved by modelpress (its folder has a
config.json), or a model whose `source` (recorded by `quantize` / `compress`) is `zoo:NAME` or
`package.module:factory`. ONNX needs example inputs: `--inputs FILE` (safetensors; keys named like the model's
keyword arguments, or a single tensor), else a zoo model's first calibration batch, else for Hugging Face models
random token ids of shape [2, 16] (and decoder_input_ids [2, 4] for encoder-decoders).
"""
from __future__ import annotations

import json
from pathlib import Path

from .report import dumps as json_dumps


def add_export_parser(sub) -> None:
    e = sub.add_parser("export", help="write a saved model as compressed-tensors or ONNX",
                       description="Export a model saved by modelpress to compressed-tensors (transformers, vLLM) "
                                   "or ONNX (ONNX Runtime, checked against PyTorch).")
    e.add_argument("saved", metavar="SAVED", help="folder written by modelpress quantize/compress or mp.save")
    e.add_argument("--format", required=True, choices=["compressed-tensors", "onnx"], help="output format")
    e.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    e.add_argument("--model", metavar="MODEL", help="the float model to rebuild SAVED on (zoo:NAME or "
                   "package.module:factory); needed when SAVED came from a factory: modelpress never imports code "
                   "that a file names")
    e.add_argument("--inputs", help="onnx: safetensors file of example inputs (keyword tensors, or one tensor)")
    e.add_argument("--min-cosine", type=float, default=0.999, help="onnx: parity threshold (default 0.999)")
    e.add_argument("--min-top1", type=float, default=0.99, help="onnx: top-1 agreement threshold for classifiers")
    e.add_argument("--linear", choices=["nbits", "qdq"], default="nbits",
                   help="onnx: weight-only Linear as MatMulNBits (default) or DequantizeLinear + MatMul")
    e.add_argument("--static", action="store_true",
                   help="onnx: fix every input dimension to the example's (default: batch, length, ... stay dynamic)")
    e.add_argument("--json", action="store_true", help="print machine-readable JSON")
    e.set_defaults(func=cmd_export, usage_check=lambda args: _check_thresholds(e, args))


def _check_thresholds(parser, args) -> None:
    """Parity thresholds in range (a NaN threshold had turned the check off), before any work."""
    import math

    for flag, v, lo in (("--min-cosine", args.min_cosine, -1.0), ("--min-top1", args.min_top1, 0.0)):
        if not (math.isfinite(v) and lo <= v <= 1.0):
            parser.error(f"{flag} must be a number in [{lo:g}, 1], got {v}")


def rebuild(saved: str, model_spec: str | None = None):
    """(quantized model, example inputs or None) from a saved folder: on `model_spec` (the MODEL argument) when
    given, else on what the folder says. A `package.module:factory` recorded in the folder is never imported on
    the file's word: the user names it with --model."""
    import modelpress as mp
    from .cli import CLIError, load_model
    from .io import read_manifest

    path = Path(saved)
    manifest = read_manifest(path)
    meta = manifest.get("metadata") or {}
    source = meta.get("source")
    if model_spec:
        model, calib, _ = load_model(model_spec, tiny=bool(meta.get("tiny")))
        return mp.load(path, model), (calib[0] if calib else None)
    if (path / "config.json").is_file():
        return mp.load(path), None
    if isinstance(source, str) and ":" in source and not source.startswith("zoo:") and not Path(source).is_dir():
        raise CLIError(f"{saved} was made from {source}; modelpress does not import code that a file names: pass "
                       f"--model {source} to rebuild on it")
    if not isinstance(source, str) or not source or Path(source).is_dir():
        raise CLIError(f"{saved} does not say how to rebuild its float model (no config.json, no zoo or factory "
                       "source): export it from Python with mp.export(mp.load(path, MyModel()), ...)")
    model, calib, entry = load_model(source, tiny=bool(meta.get("tiny")))
    return mp.load(path, model), (calib[0] if calib else None)


def read_inputs(file: str):
    from .cli_inputs import CLIError, read_tensor_file

    tensors = read_tensor_file(file, "--inputs", "the model's example inputs")
    for k, t in tensors.items():  # (the parity check compares outputs on them: they must say something)
        if t.numel() == 0:
            raise CLIError(f"--inputs {file}: tensor {k!r} of shape {list(t.shape)} is empty")
    return next(iter(tensors.values())) if len(tensors) == 1 else tensors


def _hf_inputs(model):
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        return None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):  # (T5, BART: the decoder's tokens too)
        feeds["decoder_input_ids"] = torch.randint(0, vocab, (2, 4), generator=g)
    return feeds


def cmd_export(args) -> int:
    import modelpress as mp
    from .cli import CLIError, check_out
    from .cli_inputs import input_paths

    from .io.atomic import real

    inputs = [("SAVED", real(args.saved))] + input_paths(args.model, inputs=args.inputs)
    out = check_out(args.out, args.overwrite, inputs)
    if args.format == "compressed-tensors" and args.inputs:
        raise CLIError("--inputs applies to --format onnx")
    model, example = rebuild(args.saved, args.model)
    if args.format == "compressed-tensors":
        tok = args.saved if (Path(args.saved) / "config.json").is_file() else None
        from .io.hf_folder import tokenizer_files

        mp.export(model, out, format="compressed-tensors", overwrite=args.overwrite,
                  tokenizer=tok if tok and tokenizer_files(tok) else None)
        result = {"out": str(out), "format": args.format}
    else:
        example = read_inputs(args.inputs) if args.inputs else example if example is not None else _hf_inputs(model)
        if example is None:
            raise CLIError("ONNX export needs example inputs: pass --inputs FILE.safetensors")
        mp.export(model, out, format="onnx", example_inputs=example, overwrite=args.overwrite, quiet=args.json,
                  min_cosine=args.min_cosine, min_top1=args.min_top1, linear=args.linear, dynamic=not args.static)
        result = {"out": str(out), "format": args.format,
                  "parity": json.loads((out / "parity.json").read_text())}
    print(json_dumps(result) if args.json else f"exported {args.format} to {out}")
    return 0
