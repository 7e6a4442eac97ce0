"""Evaluation tasks on held-out data, and `evaluate_pair`: task metrics for a reference and a
compressed model plus behaviour metrics of the compressed model against the reference.

Data are lists of model inputs (a Tensor, a tuple of positional tensors, or a dict of keyword
tensors), paired with targets for the supervised tasks. Models are called as they are (put
them in eval mode), under torch.inference_mode().
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import metrics as M
from ..calibrate import call_model as _call
from .lm import ids_and_mask, logits_of, multiple_choice_accuracy, next_token_nll, predicted, predicted_positions

Progress = Callable[[int, "int | None"], None]  # (batches done, total or None)


def _logit_pieces(r: torch.Tensor, o: torch.Tensor) -> dict[str, torch.Tensor]:  # [N, V] each
    r, o = r.detach().double().cpu(), o.detach().double().cpu()
    return {
        "kl": M._kl_rows(r, o),  # [N]
        "agree": (r.argmax(-1) == o.argmax(-1)).double(),  # [N]
        "signal": (r**2).sum().reshape(1),
        "noise": ((r - o) ** 2).sum().reshape(1),
    }


def _logit_scores(p: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        "kl_divergence": float(p["kl"].mean()),
        "top1_agreement": float(p["agree"].mean()),
        "sqnr_db": M._db(float(p["signal"].sum()), float(p["noise"].sum())),
    }


def _target(y: Any) -> torch.Tensor:
    return torch.as_tensor(y).detach().reshape(-1).cpu()


class Task:
    """A task reduces each batch's output to small pieces (concatenated over batches), then scores them."""

    data: Sequence

    def batches(self) -> Sequence[tuple[Any, Any]]:  # (model input, target)
        return self.data

    def check(self, batches: Sequence[tuple[Any, Any]]) -> None:
        """Raise (ValueError) when the data can give no score at all; cheap, before any long work."""

    def forward(self, model: nn.Module, inp: Any) -> torch.Tensor:
        return logits_of(_call(model, inp))

    def record(self, out: torch.Tensor, target: Any) -> dict[str, torch.Tensor]:
        return {}

    def score(self, rec: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    def compare(self, ref: torch.Tensor, out: torch.Tensor, target: Any) -> dict[str, torch.Tensor]:
        return {}

    def compare_score(self, rec: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    def extra(self, model: nn.Module) -> dict[str, float]:  # metrics that need their own model calls
        return {}


@dataclass
class ClassificationTask(Task):
    """data: [(input, labels [B])]; the model returns logits [B, C]."""

    data: Sequence[tuple[Any, Any]]

    def record(self, out, target):
        return {"pred": out.argmax(-1).reshape(-1).cpu(), "y": _target(target)}

    def score(self, rec):
        y, p = rec["y"], rec["pred"]
        return {"accuracy": M.accuracy(y, p), "precision": M.precision(y, p), "recall": M.recall(y, p), "f1": M.f1(y, p)}

    def compare(self, ref, out, target):
        return _logit_pieces(ref, out)

    def compare_score(self, rec):
        return _logit_scores(rec)


@dataclass
class CTRTask(Task):
    """data: [(input, clicks [B] in {0, 1})]; the model returns click logits [B] or [B, 1]."""

    data: Sequence[tuple[Any, Any]]

    def forward(self, model, inp):
        return logits_of(_call(model, inp)).reshape(-1)

    def record(self, out, target):
        return {"prob": torch.sigmoid(out.detach().double()).cpu(), "y": _target(target)}

    def score(self, rec):
        return {"auc": M.roc_auc(rec["y"], rec["prob"]), "logloss": M.log_loss(rec["y"], rec["prob"])}

    def compare(self, ref, out, target):
        return {"ref": ref.detach().double().cpu(), "out": out.detach().double().cpu()}

    def compare_score(self, rec):
        r, o = rec["ref"], rec["out"]
        return {"sqnr_db": M.sqnr_db(r, o), "mean_abs_prob_diff": M.mean_abs_diff(torch.sigmoid(r), torch.sigmoid(o))}


NO_POSITIONS = ("the language-model evaluation data has no predicted position (a position counts when it and the "
                "next token are both real tokens): every sequence is padding or one token long")


@dataclass
class LanguageModelTask(Task):
    """data: [token ids [B, T] | dict(input_ids, attention_mask) | tuple(ids, ...)]; the model returns
    logits [B, T, V] (or `.logits`). `choices`: optional zero-shot items (context ids, [choice ids], answer)."""

    data: Sequence[Any]
    choices: Sequence[tuple] = ()
    normalize_choices: bool = False

    def batches(self):
        return [(inp, ids_and_mask(inp)) for inp in self.data]

    def check(self, batches) -> None:
        n = sum(int(predicted_positions(m).sum()) for _, (_, m) in batches)
        if not n:
            raise ValueError(NO_POSITIONS)

    def record(self, out, target):
        return {"nll": next_token_nll(out, *target).cpu()}  # [N predicted positions]

    def score(self, rec):
        if not rec["nll"].numel():  # (a mean of nothing: NaN, and an SQNR of nothing +inf, "identical")
            raise ValueError(NO_POSITIONS)
        return {"perplexity": float(rec["nll"].mean().exp())}

    def compare(self, ref, out, target):
        ids, mask = target
        return _logit_pieces(predicted(ref, ids, mask)[0], predicted(out, ids, mask)[0])

    def compare_score(self, rec):
        return _logit_scores(rec)

    def extra(self, model):
        if not self.choices:
            return {}
        return {"choice_accuracy": multiple_choice_accuracy(model, self.choices, self.normalize_choices)}


def _embedding_of(out: Any) -> torch.Tensor:
    if isinstance(out, Mapping) and "sentence_embedding" in out:  # sentence-transformers
        out = out["sentence_embedding"]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"an embedding model must return a Tensor [B, D], not {type(out).__name__}")
    return out


@dataclass
class EmbeddingTask(Task):
    """data: [input]; the model returns embeddings [B, D]. Only behaviour metrics (fidelity to the reference)."""

    data: Sequence[Any]
    k: int = 10  # neighbours for neighbour_overlap, capped at N-1

    def batches(self):
        return [(inp, None) for inp in self.data]

    def forward(self, model, inp):
        return _embedding_of(_call(model, inp))

    def compare(self, ref, out, target):
        return {"ref": ref.detach().double().cpu(), "out": out.detach().double().cpu()}

    def compare_score(self, rec):
        r, o = rec["ref"], rec["out"]
        return {
            "embedding_cosine": M.embedding_cosine(r, o),
            "neighbour_overlap": M.neighbour_overlap(r, o, self.k),
            "similarity_spearman": M.similarity_spearman(r, o),
            "sqnr_db": M.sqnr_db(r, o),
        }


def _cat(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in pieces]) for k in (pieces[0] if pieces else {})}


def _run(task: Task, models: list[nn.Module], progress: Progress | None):
    """One pass over the data, each model called once per batch: per-model records, comparison pieces."""
    batches = task.batches()
    total = len(batches) if hasattr(batches, "__len__") else None
    recs: list[list[dict]] = [[] for _ in models]
    comps: list[dict] = []
    with torch.inference_mode():
        for i, (inp, target) in enumerate(batches):
            outs = [task.forward(m, inp) for m in models]
            for rec, out in zip(recs, outs):
                rec.append(task.record(out, target))
            if len(outs) == 2:
                comps.append(task.compare(outs[0], outs[1], target))
            if progress is not None:
                progress(i + 1, total)
    if not recs[0]:
        raise ValueError(f"{type(task).__name__} has no data")
    return [_cat(r) for r in recs], _cat(comps)


def evaluate_model(task: Task, model: nn.Module, progress: Progress | None = None) -> dict[str, float]:
    """The task's own metrics for one model."""
    (rec,), _ = _run(task, [model], progress)
    return task.score(rec) | task.extra(model)


def evaluate_pair(
    task: Task, reference: nn.Module, compressed: nn.Module, progress: Progress | None = None
) -> dict[str, dict[str, float | None]]:
    """{metric: {"reference", "compressed", "delta"}}; behaviour metrics have reference/delta None."""
    (r, c), comp = _run(task, [reference, compressed], progress)
    ref, cmp = task.score(r) | task.extra(reference), task.score(c) | task.extra(compressed)
    result: dict[str, dict[str, float | None]] = {
        k: {"reference": ref[k], "compressed": cmp[k], "delta": cmp[k] - ref[k]} for k in ref
    }
    for k, v in task.compare_score(comp).items():
        result[k] = {"reference": None, "compressed": v, "delta": None}
    return result
