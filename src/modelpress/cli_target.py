"""`modelpress compress MODEL --target-ratio 8 [--max-drop 0.01] [--budget-minutes 20] --out DIR`: the flags that
turn a target into a recipe (a `target` step), and the files such a run leaves beside the model: `plan.yaml` (the
chosen per-layer formats as a recipe to edit and rerun), `sensitivity.json` and, for a study, `study.db`."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .cli_inputs import CLIError, UsageError

TARGET_FLAGS = ("target_ratio", "target_bytes", "target_bits")


def add_target_args(c) -> None:
    g = c.add_argument_group("target (instead of --recipe): analyse, allocate or search, apply, evaluate")
    g.add_argument("--target-ratio", type=float, metavar="X", help="reference bytes / compressed bytes to reach")
    g.add_argument("--target-bytes", type=int, metavar="N", help="true bytes of the compressed model to reach")
    g.add_argument("--target-bits", type=float, metavar="B", help="stored bits per quantizable weight (scales "
                                                                  "included) to reach")
    g.add_argument("--max-drop", metavar="D", help="allowed drop of the task metric (absolute, or '5%%' relative); "
                                                   "refused with the closest reachable ratio when not met")
    g.add_argument("--metric", help="the metric --max-drop is about (default: the task's headline metric)")
    g.add_argument("--budget-minutes", type=float, metavar="M", help="time budget of the whole run")
    g.add_argument("--search", choices=("allocate", "optuna", "random"),
                   help="allocate (knapsack over the sensitivity table, default), optuna (a study with the target "
                        "as a constraint) or random (the study's baseline)")
    g.add_argument("--trials", type=int, help="study trials (default: as many as the time budget allows, 20 "
                                              "without a budget)")
    g.add_argument("--storage", metavar="URL", help="Optuna storage (default: sqlite file study.db under --out); a "
                                                     "database URL lets several machines share a study")
    g.add_argument("--study-name", help="name of the Optuna study (to resume or share one)")
    g.add_argument("--formats", metavar="F,F,...", help="candidate weight formats (default: int8 ... int2 with groups)")
    g.add_argument("--method", help="quantization method for the plan (default: gptq with calibration data)")
    g.add_argument("--cost", choices=("measured", "hessian"),
                   help="layer costs: measured on held-out calibration batches, or the Hutchinson Hessian estimate")
    g.add_argument("--sensitivity", metavar="JSON", help="reuse the sensitivity.json of an earlier run on this model "
                                                          "(e.g. to try another ratio without measuring again)")


def check_target_usage(parser, args) -> None:
    """Target flags argparse cannot refuse by itself: usage errors (exit 2), before anything is loaded."""
    if args.search in (None, "allocate"):  # the knapsack runs no trials and keeps no study
        for flag, v in (("--trials", args.trials), ("--storage", args.storage), ("--study-name", args.study_name)):
            if v is not None:
                parser.error(f"{flag} only applies to a study: add --search optuna (or random)")
    if args.formats is not None and not any(f.strip() for f in args.formats.split(",")):
        parser.error(f"--formats needs at least one format (F,F,...), got {args.formats!r}")


def target_from_args(args):
    """A Target from the flags (None without --target-*), checked before any work."""
    import modelpress as mp

    given = [f for f in TARGET_FLAGS if getattr(args, f, None) is not None]
    extras = [f"--{k.replace('_', '-')}" for k in ("max_drop", "metric", "budget_minutes", "search", "trials",
                                                    "storage", "study_name", "formats", "method", "cost",
                                                    "sensitivity")
              if getattr(args, k, None) is not None]
    if args.recipe is not None and given:
        raise UsageError("give either --recipe or a target (--target-ratio / --target-bytes / --target-bits), not both")
    if args.budget_minutes is not None and not args.budget_minutes > 0:  # (with a recipe too: it limits training)
        raise UsageError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.recipe is None and not given:
        raise UsageError("give a recipe (--recipe NAME_OR_FILE) or a target (--target-ratio X, --target-bytes N or "
                       "--target-bits B)")
    if not given:
        flags = [e for e in extras if e != "--budget-minutes"]
        if flags:
            raise UsageError(f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'} only with a target "
                             "(--target-ratio / --target-bytes / --target-bits)")
        return None
    if len(given) > 1:
        raise UsageError("give one of --target-ratio, --target-bytes, --target-bits")
    if args.metric is not None and args.max_drop is None and args.search in (None, "allocate"):
        raise UsageError("--metric applies only with --max-drop or a study (--search optuna / random): the "
                         "allocation itself measures no task metric")
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip()) if args.formats else None
    if args.sensitivity is not None and not os.path.isfile(args.sensitivity):  # (an error, not a usage error)
        raise CLIError(f"--sensitivity {args.sensitivity} does not exist")
    try:
        return mp.Target(ratio=args.target_ratio, size_bytes=args.target_bytes, avg_bits=args.target_bits,
                         max_drop=args.max_drop, metric=args.metric, formats=formats,
                         method=args.method or "auto", search=args.search or "allocate", trials=args.trials,
                         storage=args.storage, study_name=args.study_name, cost=args.cost or "measured",
                         sensitivity=args.sensitivity)
    except ValueError as e:  # a value out of range (--trials 0, --max-drop 2 ...)
        raise UsageError(str(e)) from None


class StudyFolder:
    """Where a study run by the CLI keeps its SQLite file until the model is saved: a hidden sibling of --out,
    moved into --out at the end (the model's folder is written atomically, so it cannot hold files before). What
    the run records (the report's recipe and study, the model's metadata) names the file where it ends up."""

    def __init__(self, target, out: Path):
        self.path = None
        if target is None or target.search == "allocate" or target.storage:
            self.target = target
            return
        out = Path(os.path.realpath(os.path.expanduser(str(out))))
        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.study-", dir=out.parent))
        from dataclasses import replace

        self.url, self.final_url = f"sqlite:///{self.path / 'study.db'}", f"sqlite:///{out / 'study.db'}"
        self.target = replace(target, storage=self.url)

    def relocate(self, obj):
        """`obj` (dicts, lists, strings) with the temporary storage URL replaced by the final one."""
        if self.path is None:
            return obj
        if isinstance(obj, dict):
            return {k: self.relocate(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.relocate(v) for v in obj]
        return self.final_url if obj == self.url else obj

    def finish(self, out: Path, report=None) -> None:
        """study.db moved into `out` (the model's folder, saved), and `report` rewritten to name it there."""
        if self.path is None:
            return
        if (self.path / "study.db").exists():
            shutil.move(str(self.path / "study.db"), str(Path(out) / "study.db"))
        if report is not None:
            report.recipe, report.steps = self.relocate(report.recipe), self.relocate(report.steps)
        self.cleanup()

    def cleanup(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def write_target_files(report, out: Path) -> list[str]:
    """plan.yaml and sensitivity.json from a target (or sensimix) step's record, written atomically; their names."""
    import json

    from .report import _atomic_write

    written = []
    for rec in report.steps:
        if "plan_yaml" in rec and "plan.yaml" not in written:
            _atomic_write(Path(out) / "plan.yaml", rec["plan_yaml"])
            written.append("plan.yaml")
        sens = rec.get("sensitivity") or rec.get("plan", {}).get("sensitivity")
        if sens and "sensitivity.json" not in written:
            _atomic_write(Path(out) / "sensitivity.json", json.dumps(sens, indent=1))
            written.append("sensitivity.json")
    return written
