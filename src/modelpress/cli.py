"""The `modelpress` command. Exit codes: 0 success, 1 error (message on stderr), 2 usage error."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

EXIT_ERROR, EXIT_USAGE = 1, 2


class CLIError(Exception):
    """An error to report to the user in one line (exit code 1)."""


def load_model(spec: str, state_dict: str | None = None, tiny: bool = False):
    """MODEL argument -> (float nn.Module, calibration inputs or None, zoo entry or None).

    `zoo:NAME` builds a zoo model; a folder with config.json is a local Hugging Face model;
    `package.module:factory` calls factory() and loads `state_dict` (.safetensors, or .pt with weights_only=True).
    """
    if spec.startswith("zoo:"):
        from . import zoo

        entry = zoo.build(spec[4:], tiny=tiny)
        return entry.model, entry.calib, entry
    path = Path(spec)
    if path.is_dir():
        from .hf import load_pretrained

        if state_dict:
            raise CLIError("--state-dict applies to package.module:factory models, not to a Hugging Face folder")
        return load_pretrained(path), None, None
    if ":" not in spec:
        raise CLIError(f"MODEL {spec!r} is not a folder, a zoo:NAME nor a package.module:factory")
    mod, _, fn = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise CLIError(f"cannot import {spec!r}: {e}") from None
    import torch

    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{spec} returned {type(model).__name__}, not a torch nn.Module")
    if state_dict:
        try:
            model.load_state_dict(read_state_dict(state_dict))
        except RuntimeError as e:
            raise CLIError(f"state dict {state_dict} does not fit {spec}: {e}") from None
    return model.eval(), None, None


def hf_source(spec: str) -> str | None:
    """A Hugging Face source folder with tokenizer files (they travel with the saved model), else None."""
    from .io.hf_folder import tokenizer_files

    return spec if (Path(spec) / "config.json").is_file() and tokenizer_files(spec) else None


def check_out(path: str, overwrite: bool) -> Path:
    """The --out folder, refused (before any work) when it exists and is not empty, unless --overwrite."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CLIError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return out


def read_state_dict(file: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    p = Path(file)
    if not p.is_file():
        raise CLIError(f"state dict file {file} does not exist")
    if p.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise CLIError(f"state dict {file}: use a .safetensors file (or .pt/.pth saved tensors)")
    try:
        if p.suffix == ".safetensors":
            return load_file(str(p))
        return torch.load(str(p), map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
    except Exception as e:  # corrupt file, or a pickle holding more than tensors (refused by weights_only)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0] if lines else repr(e))
        raise CLIError(f"cannot read state dict {file}: {why.split(' Please use')[0]}") from None


def read_calib(file: str) -> list:
    """A safetensors file of calibration batches: each tensor (in key order) is one model input."""
    from safetensors.torch import load_file

    tensors = load_file(file)
    return [tensors[k] for k in sorted(tensors)]


def _progress_printer(quiet: bool):
    if quiet:
        return None
    from rich.progress import BarColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   transient=True, console=_console(stderr=True))
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total or None)
        bar.update(tasks[stage], completed=done, total=total or None)

    report.stop = bar.stop
    return report


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def cmd_quantize(args) -> int:
    import modelpress as mp

    model, calib, _ = load_model(args.model, args.state_dict)
    if args.calib:
        calib = read_calib(args.calib)
    out = check_out(args.out, args.overwrite)
    config = mp.QuantConfig(weights=args.weights, activations=args.activations, include=args.include or None,
                            exclude=args.exclude or None)
    progress = _progress_printer(args.json or args.quiet)
    try:
        mp.quantize_(model, config, calib=calib, method=args.method, progress=progress)
    finally:
        if progress:
            progress.stop()
    mp.save(model, out, overwrite=args.overwrite, metadata={"source": args.model, "config": config.to_dict()},
            tokenizer=hf_source(args.model))
    table = mp.inspect_saved(out)
    if args.json:
        print(json.dumps({"out": str(out), "config": config.to_dict(), **table.to_dict()}))
    else:
        print(table)
        print(f"saved to {out}")
    return 0


def cmd_inspect(args) -> int:
    import modelpress as mp

    table = mp.inspect_saved(args.path)
    print(json.dumps(table.to_dict()) if args.json else table)
    return 0


def cmd_zoo(args) -> int:
    from . import zoo

    if args.action == "list":
        rows = [{"name": n, "description": zoo.describe(n)} for n in zoo.list_models()]
        print(json.dumps(rows) if args.json else "\n".join(f"{r['name']:16s} {r['description']}" for r in rows))
        return 0
    if not args.name:
        raise CLIError("zoo build needs a NAME (see `modelpress zoo list`)")
    entry = zoo.build(args.name, rebuild=args.rebuild)
    n = sum(p.numel() for p in entry.model.parameters())
    info = {"name": entry.name, "parameters": n, "calibration_batches": len(entry.calib), "cache": str(zoo.default_cache_dir())}
    print(json.dumps(info) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelpress", description="Compress PyTorch models and measure what it cost.")
    p.add_argument("--version", action="version", version="modelpress 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model and save it", description="Quantize MODEL and save it to --out.")
    q.add_argument("model", metavar="MODEL", help="zoo:NAME, a local Hugging Face folder, or package.module:factory")
    q.add_argument("--weights", required=True, help="weight format spec, e.g. int8, int4:g32, mxfp4, nvfp4")
    q.add_argument("--activations", default=None, help="activation format: int8, int8:static, fp8_e4m3")
    q.add_argument("--method", default="rtn", help="quantization algorithm (default: rtn)")
    q.add_argument("--include", action="append", help="only layers matching this pattern (repeatable)")
    q.add_argument("--exclude", action="append", help="skip layers matching this pattern (repeatable)")
    q.add_argument("--state-dict", help="weights for a package.module:factory model (.safetensors or .pt)")
    q.add_argument("--calib", help="safetensors file of calibration batches (for static activations)")
    q.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.add_argument("--json", action="store_true", help="print machine-readable JSON")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="per-layer table of a saved model", description="Show layers, formats and true bytes.")
    i.add_argument("path", metavar="PATH", help="folder written by modelpress")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    i.set_defaults(func=cmd_inspect)

    z = sub.add_parser("zoo", help="reference models that run offline", description="List or build zoo models.")
    z.add_argument("action", choices=["list", "build"])
    z.add_argument("name", nargs="?", help="zoo model name (for build)")
    z.add_argument("--rebuild", action="store_true", help="retrain even if cached")
    z.add_argument("--json", action="store_true", help="print machine-readable JSON")
    z.set_defaults(func=cmd_zoo)

    from .cli_compress import add_compress_parser
    from .cli_export import add_export_parser

    add_compress_parser(sub)
    add_export_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"modelpress: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
