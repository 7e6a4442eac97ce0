"""The `modelpress` command. Exit codes: 0 success, 1 error (message on stderr), 2 usage error."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from .cli_inputs import (CLIError, UsageError, check_batch, check_out, first_line, hf_source, input_paths,  # noqa: F401
                         load_model, read_calib, read_state_dict)
from .report import dumps as json_dumps

EXIT_ERROR, EXIT_USAGE = 1, 2
TRACEBACK_ENV = "MODELPRESS_TRACEBACK"  # set to 1 to see the traceback of an unexpected error

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

    out = check_out(args.out, args.overwrite, input_paths(args.model, state_dict=args.state_dict, calib=args.calib))
    config = mp.QuantConfig(weights=args.weights, activations=args.activations, include=args.include or None,
                            exclude=args.exclude or None)
    from .algorithms import get_method

    _, method = get_method(args.method)
    model, calib, _ = load_model(args.model, args.state_dict)
    if args.calib:
        calib = read_calib(args.calib)
    _preflight(model, config, method, calib, args.calib or args.model, args)
    progress = _progress_printer(args.json or args.quiet)
    try:
        mp.quantize_(model, config, calib=calib, method=method, progress=progress)
    finally:
        if progress:
            progress.stop()
    mp.save(model, out, overwrite=args.overwrite, metadata={"source": args.model, "config": config.to_dict()},
            tokenizer=hf_source(args.model))
    table = mp.inspect_saved(out)
    if args.json:
        print(json_dumps({"out": str(out), "config": config.to_dict(), **table.to_dict()}))
    else:
        print(table)
        print(f"saved to {out}")
    return 0


def _preflight(model, config, method, calib, calib_file: str, args) -> None:
    """What quantize_ would refuse, in the command's words, before any work: a model that is one bare layer,
    --include matching nothing, nothing to quantize, missing or unfit calibration data."""
    from .plan import plan_layers
    from .quant import quant_class
    from .select import matches_any

    if quant_class(model) is not None:
        raise CLIError(f"MODEL {args.model} is a bare {type(model).__name__}: modelpress quantizes the layers inside "
                       "a model; return a container (e.g. nn.Sequential(layer))")
    names = [n for n, _ in model.named_modules() if n]
    if config.include and not any(matches_any(n, config.include) for n in names):
        raise CLIError(f"--include {' '.join(config.include)} matches no layer of MODEL (names look like "
                       f"{', '.join(names[:3])})")
    plans, skipped, _ = plan_layers(model, config)
    if not plans:
        why = "; ".join(f"{n}: {w}" for n, w in skipped[:3]) or "no Linear, Conv1d/2d or Embedding layer selected"
        raise CLIError(f"nothing to quantize in MODEL {args.model} ({why})")
    needs = [f"--activations {config.activations}"] if any(p.activations and p.activations.static for p in plans) else []
    if getattr(method, "needs_calib", False):
        needs.append(f"--method {args.method}")
    if args.calib and not needs:
        warnings.warn(f"--calib {args.calib} is not used: --method {args.method} without static activations needs "
                      "no calibration data")
    if needs and not calib:
        raise CLIError(f"{' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} calibration data: pass "
                       "--calib FILE (a .safetensors file whose tensors are input batches)")
    if needs:
        check_batch(model, calib[0], calib_file)


def cmd_inspect(args) -> int:
    import modelpress as mp

    table = mp.inspect_saved(args.path)
    print(json_dumps(table.to_dict()) if args.json else table)
    return 0


def cmd_zoo(args) -> int:
    from . import zoo

    if args.action == "list":
        rows = [{"name": n, "description": zoo.describe(n)} for n in zoo.list_models()]
        print(json_dumps(rows) if args.json else "\n".join(f"{r['name']:16s} {r['description']}" for r in rows))
        return 0
    if not args.name:
        raise UsageError("zoo build needs a NAME (see `modelpress zoo list`)")
    entry = zoo.build(args.name, rebuild=args.rebuild)
    n = sum(p.numel() for p in entry.model.parameters())
    info = {"name": entry.name, "parameters": n, "calibration_batches": len(entry.calib), "cache": str(zoo.default_cache_dir())}
    print(json_dumps(info) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
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


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwound as an interrupt (a save in progress removes its temporary folder); exit 128 + 15."""


def _interrupted(signum, frame):
    raise _Terminated


def _stdout_closed() -> bool:
    """Whether standard output is the pipe that broke (its reader is gone: poll reports an error on it), not a
    socket or a subprocess's pipe of the command's own work."""
    try:
        import select

        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # (no poll on Windows; no real stdout in a test)
        return False


def _quiet_stdout() -> None:
    """After a broken pipe (`modelpress inspect DIR | head -1`): nothing more to write, and no error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _warn_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"modelpress: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _cli_words(msg: str) -> str:
    """One line, in the command's words."""
    msg = " ".join(msg.split())
    return (msg.replace("(calib=...)", "(--calib FILE)").replace("overwrite=True", "--overwrite")
            .replace("pass eval=", "MODEL brings none (zoo models do): leave max_drop / --max-drop out"))


def _quiet_progress_bars(process: bool):
    """--quiet / --json: no Hugging Face progress bars (transformers' "Loading weights"); returns what restores
    the setting. In the command's own process (`process`) the env variable, read when transformers is imported;
    called from Python (main([...]) in a notebook or a test), only transformers' switch if it is imported already,
    since an import during the command would keep the variable's setting for the rest of the process."""
    key, old = "HF_HUB_DISABLE_PROGRESS_BARS", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    if process:
        os.environ[key] = "1"
    tl = sys.modules.get("transformers.utils.logging")
    was = tl is not None and tl.is_progress_bar_enabled()
    if was:
        tl.disable_progress_bar()

    def restore() -> None:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
        if was:
            tl.enable_progress_bar()
    return restore


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "usage_check", None):  # a command's flag combinations: parser.error, exit 2
        args.usage_check(args)
    old_term = old_show = None
    try:  # SIGTERM unwinds like Ctrl-C: a save in progress removes its temporary folder
        old_term = signal.signal(signal.SIGTERM, _interrupted)
    except ValueError:  # not the main thread
        pass
    old_show, warnings.showwarning = warnings.showwarning, _warn_one_line
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    restore_bars = _quiet_progress_bars(process=argv is None) if quiet else None
    try:
        return args.func(args)
    except BrokenPipeError as e:
        if _stdout_closed():  # the reader went away (| head): exit quietly, as command-line tools do
            _quiet_stdout()
            return 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else EXIT_ERROR
        print(f"modelpress: error: {_cli_words(str(e) or type(e).__name__)}", file=sys.stderr)  # another pipe's
        return EXIT_ERROR
    except UsageError as e:
        print(f"modelpress: error: {_cli_words(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except (CLIError, ValueError, TypeError, OSError, ImportError, MemoryError, NotImplementedError) as e:
        print(f"modelpress: error: {_cli_words(str(e) or type(e).__name__)}", file=sys.stderr)
        return EXIT_ERROR
    except _Terminated:
        print("modelpress: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("modelpress: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unforeseen failure: still one line, the traceback on request
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"modelpress: error: {type(e).__name__}: {_cli_words(first_line(e))} (set {TRACEBACK_ENV}=1 for the "
              "traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        warnings.showwarning = old_show
        if restore_bars is not None:
            restore_bars()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
