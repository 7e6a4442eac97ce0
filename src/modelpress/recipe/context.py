"""Context: what recipe steps may need, handed to every step's `run(model, ctx)`.

A plain object, built once per `compress` run (or by the user for a single step): calibration inputs,
training data, the evaluation task, the float reference the recipe started from (the teacher for
distillation), a progress callback, a time budget, and the records steps leave for the report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

# the end of every "needs training data" message: the CLI builds a Context with training data for zoo models only
NO_CLI_TRAIN = "on the command line only zoo models bring training data"

Progress = Callable[[str, int, int], None]  # (stage, done, total or 0)


@dataclass
class Context:
    calib: list[Any] | None = None  # model inputs: tensors, tuples, or dicts of keyword tensors
    train: Any = None  # training batches ((input, target) pairs or inputs), for recovery / QAT / distillation
    eval: Any = None  # an evaluation task (modelpress.evaluate.tasks)
    reference: nn.Module | None = None  # the float model before any step (teacher for distillation)
    progress: Progress | None = None
    deadline: float | None = None  # time.monotonic() value after which long steps should stop early
    records: list[dict[str, Any]] = field(default_factory=list)  # what steps did, for the report

    def report(self, step: str, **info: Any) -> None:
        """Leave a record for the report (e.g. the sparsity a prune step reached)."""
        self.records.append({"step": step, **info})

    def time_left(self) -> float | None:
        """Seconds before the deadline (None: no budget)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def tick(self, stage: str, done: int, total: int = 0) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def need_calib(self, step: str) -> list[Any]:
        if not self.calib:
            raise ValueError(f"recipe step {step!r} needs calibration data (calib=...)")
        return self.calib
