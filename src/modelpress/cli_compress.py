"""`modelpress compress MODEL --recipe R --out DIR`: compress, evaluate, save the model and the report."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .cli_inputs import CLIError, first_line


def add_compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="run a recipe, evaluate, save model and report",
                       description="Compress MODEL with a recipe, evaluate reference and compressed on held-out data, "
                                   "save the model, report.json and report.html to --out.")
    c.add_argument("model", metavar="MODEL", help="zoo:NAME, a local Hugging Face folder, or package.module:factory")
    from .recipe.recipes import BUILTIN_RECIPES

    c.add_argument("--recipe", help=f"built-in recipe ({', '.join(BUILTIN_RECIPES)}) or a YAML file")
    c.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c.add_argument("--state-dict", help="weights for a package.module:factory model")
    c.add_argument("--calib", help="safetensors file of calibration batches (zoo models bring their own)")
    c.add_argument("--tiny", action="store_true", help="zoo models: the tiny variant (seconds; for smoke tests)")
    c.add_argument("--kernels", choices=("memory", "speed"), default=None,
                   help="kernel mode: memory = packed weights only (default); speed = also a dense float copy of a "
                        "weight unless a packed kernel is at least 10%% faster than it")
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                   help="log parameters, metrics and the report to MLflow (default: a local file store under --out)")
    from .cli_target import add_target_args, check_target_usage

    add_target_args(c)

    def usage(args) -> None:
        if args.tiny and not args.model.startswith("zoo:"):  # (it was ignored, and recorded in the saved manifest)
            c.error("--tiny applies only to zoo models (zoo:NAME)")
        check_target_usage(c, args)

    c.set_defaults(func=cmd_compress, usage_check=usage)


def cmd_compress(args) -> int:
    import modelpress as mp

    from .cli import _console, _progress_printer
    from .cli_inputs import check_batch, check_out, hf_source, input_paths, load_model, read_calib
    from .cli_target import StudyFolder, target_from_args, write_target_files
    from .pipeline import compress

    target = target_from_args(args)  # fail fast on bad target flags, before any work
    recipe_file = args.recipe if args.recipe and Path(args.recipe).is_file() else None
    recipe = mp.load_recipe(target if target is not None else args.recipe)  # fail fast on a bad recipe
    reads = {"state_dict": args.state_dict, "calib": args.calib, "recipe": recipe_file,  # (--sensitivity is read
             "storage": _sqlite_file(args.storage)}  # before the save: it may be --out's own; a resumed study's db)
    kept = [("a train step's checkpoint", Path(os.path.realpath(os.path.expanduser(s.checkpoint))))
            for s in recipe.steps if getattr(s, "checkpoint", None)]  # (written while training: the save would
    out = check_out(args.out, args.overwrite, input_paths(args.model, **reads) + kept)  # find --out not empty)
    if args.mlflow is not None:
        _require_mlflow(args.mlflow, out)
    model, calib, entry = load_model(args.model, args.state_dict, tiny=args.tiny)
    if args.calib:
        calib = read_calib(args.calib)
    needs = _needs_calib(recipe) if target is None else "the target's sensitivity analysis"
    if needs and not calib:
        raise CLIError(f"{'recipe ' + str(args.recipe) if target is None else 'a target'}: {needs} needs "
                       "calibration data: pass --calib FILE (a .safetensors file whose tensors are input batches)")
    if calib:
        check_batch(model, calib[0], args.calib or args.model)
    study = StudyFolder(target, out)
    if target is not None:
        recipe = mp.load_recipe(study.target)
    progress = _progress_printer(args.json or args.quiet)
    budget = args.budget_minutes * 60 if args.budget_minutes is not None else None
    try:
        report = compress(model, recipe, calib=calib, eval=entry.task if entry else None, progress=progress,
                          name=args.model, budget_seconds=budget, kernels=args.kernels,
                          train=entry.train if entry else None)
    except BaseException:
        study.cleanup()
        raise
    finally:
        if progress:
            progress.stop()
    extra: list[str] = []

    def add_files(folder: Path) -> list[str]:  # written into the folder being saved: one atomic step with the model
        study.finish(folder, report)  # before the report is written: it names study.db where it will be
        report.save(folder)
        extra.extend(write_target_files(report, folder))
        return [f for f in ("study.db", "report.json", "report.html", *extra) if (folder / f).is_file()]

    try:
        mp.save(model, out, overwrite=args.overwrite, metadata={
            "source": args.model, "recipe": study.relocate(recipe.to_dict()), **({"tiny": True} if args.tiny else {})},
            tokenizer=hf_source(args.model), extra=add_files)
    finally:
        study.cleanup()
    if args.mlflow is not None:
        _log_mlflow(report, out, args.mlflow)
    if args.json:
        print(report.to_json(indent=None))
    else:
        _console().print(report.table())
        for note in report.notes:
            print(f"note: {note}")
        if report.kernel_rows():
            _console().print(report.kernel_table())
        print(f"saved model and report.json / report.html{''.join(' / ' + f for f in extra)} to {out}")
    return 0


def _needs_calib(recipe) -> str | None:
    """The first recipe step that needs calibration data (a data-driven method, static activations), named."""
    from .quant.activation import parse_activation
    from .recipe.steps import QuantizeStep

    for i, step in enumerate(recipe.steps):
        if isinstance(step, QuantizeStep):
            act = parse_activation(step.config.activations)
            if getattr(step.method_config(), "needs_calib", False) or (act is not None and act.static):
                return f"step {i + 1} (quantize, method {step.method}, activations {step.config.activations})"
        elif getattr(step, "kind", None) == "factorize" and step.method != "svd":
            return f"step {i + 1} (factorize, method {step.method})"
    return None


DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _file_store(uri: str) -> bool:
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    return not uri or scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _sqlite_file(url: str | None) -> str | None:
    """The database file of an Optuna sqlite:/// storage URL (an input: resuming a study reads it), else None."""
    if not url or not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    return path if path and path != ":memory:" else None


def _store_path(uri: str) -> Path | None:
    """The folder of a local file store URI (a path or file://), resolved; None for other stores."""
    from urllib.parse import unquote, urlparse

    if not uri or not _file_store(uri):
        return None
    p = urlparse(uri)
    return Path(os.path.realpath(os.path.expanduser(unquote(p.path) if p.scheme == "file" else uri)))


def _inside(uri: str, out: Path) -> bool:
    """--mlflow is a file store in --out (or is --out): it is made when logging, after the model's folder is saved
    (which replaces that folder as a whole), like the default store --out/mlruns."""
    store, o = _store_path(uri), Path(os.path.realpath(os.path.expanduser(str(out))))
    return store is not None and (store == o or o in store.parents)


def _require_mlflow(uri: str = "", out: Path | None = None) -> None:
    """MLflow importable and, for an explicit --mlflow URI, a tracking store this MLflow has (before any work)."""
    import importlib.util
    from urllib.parse import urlparse

    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise CLIError("--mlflow needs MLflow: pip install 'modelpress[mlflow]'") from None
    if not uri or (out is not None and _inside(uri, out)):
        return  # a file store under --out (the default --out/mlruns): created when logging
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in DB_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        raise CLIError(f"--mlflow {uri}: a database tracking store needs the full MLflow package (mlflow-skinny, "
                       "which modelpress[mlflow] installs, has no SQL store): pip install mlflow, or give a folder "
                       "(a local file store) or an http(s):// tracking server")
    if _file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        mlflow.MlflowClient(tracking_uri=uri)
    except Exception as e:
        raise CLIError(f"--mlflow {uri}: MLflow cannot use this tracking URI ({first_line(e)})") from None


def _log_mlflow(report, out: Path, uri: str) -> None:
    import mlflow

    if _file_store(uri):  # a local file store (MLflow 3 wants an explicit opt-in for it; see the README)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    store = _store_path(uri) if uri else out.resolve() / "mlruns"
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(store.as_uri() if store is not None else uri)
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
