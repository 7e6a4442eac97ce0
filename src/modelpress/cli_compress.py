"""`modelpress compress MODEL --recipe R --out DIR`: compress, evaluate, save the model and the report."""
from __future__ import annotations

import json
from pathlib import Path


def add_compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="run a recipe, evaluate, save model and report",
                       description="Compress MODEL with a recipe, evaluate reference and compressed on held-out data, "
                                   "save the model, report.json and report.html to --out.")
    c.add_argument("model", metavar="MODEL", help="zoo:NAME, a local Hugging Face folder, or package.module:factory")
    c.add_argument("--recipe", required=True, help="built-in recipe (w8, w8a8, w8a8-static, w4-g32, w4-g128, fp8, "
                                                   "mxfp4, nvfp4) or a YAML file")
    c.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c.add_argument("--state-dict", help="weights for a package.module:factory model")
    c.add_argument("--calib", help="safetensors file of calibration batches (zoo models bring their own)")
    c.add_argument("--tiny", action="store_true", help="zoo models: the tiny variant (seconds; for smoke tests)")
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                   help="log parameters, metrics and the report to MLflow (default: a local file store under --out)")
    c.set_defaults(func=cmd_compress)


def cmd_compress(args) -> int:
    import modelpress as mp

    from .cli import _console, check_out, _progress_printer, load_model, read_calib
    from .pipeline import compress

    out = check_out(args.out, args.overwrite)
    recipe = mp.load_recipe(args.recipe)  # fail fast on a bad recipe, before any work
    if args.mlflow is not None:
        _require_mlflow()
    progress = _progress_printer(args.json or args.quiet)
    try:
        model, calib, entry = load_model(args.model, args.state_dict, tiny=args.tiny)
        if args.calib:
            calib = read_calib(args.calib)
        report = compress(model, recipe, calib=calib, eval=entry.task if entry else None, progress=progress,
                          name=args.model, train=entry.train if entry else None)
    finally:
        if progress:
            progress.stop()
    mp.save(model, out, overwrite=args.overwrite, metadata={"source": args.model, "recipe": recipe.to_dict()})
    report.save(out)
    if args.mlflow is not None:
        _log_mlflow(report, out, args.mlflow)
    if args.json:
        print(report.to_json(indent=None))
    else:
        _console().print(report.table())
        print(f"saved model and report.json / report.html to {out}")
    return 0


def _require_mlflow():
    try:
        import mlflow  # noqa: F401
    except ImportError:
        from .cli import CLIError

        raise CLIError("--mlflow needs MLflow: pip install 'modelpress[mlflow]'") from None


def _log_mlflow(report, out: Path, uri: str) -> None:
    import os

    import mlflow

    if not uri:  # the default: a local file store under --out (MLflow 3 wants an explicit opt-in for it)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri or (out.resolve() / "mlruns").as_uri())
    mlflow.set_experiment("modelpress")
    with mlflow.start_run(run_name=f"{report.model} {report.recipe.get('name', '')}"):
        mlflow.log_params({"model": report.model, "recipe": report.recipe.get("name", ""),
                           "recipe_json": json.dumps(report.recipe)[:500]})
        for name, v in report.metrics.items():
            mlflow.log_metric(f"{_key(name)}", v["compressed"])
            if v.get("reference") is not None:
                mlflow.log_metric(f"{_key(name)}_reference", v["reference"])
        mlflow.log_metric("size_ratio", report.size["ratio"])
        mlflow.log_metric("compressed_bytes", report.size["compressed_bytes"])
        if report.latency:
            mlflow.log_metric("latency_speedup", report.latency["speedup"])
        mlflow.log_artifact(str(out / "report.json"))
        mlflow.log_artifact(str(out / "report.html"))


def _key(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./" else "_" for ch in name)
